"""The device check's offline bundle: wheels of what a GPU image lacks, made where PyPI is reachable.

    python scripts/device_bundle.py make .whl [--python-version 3.12]     # `make device-bundle`
    python scripts/device_bundle.py install .whl SITE_FOLDER              # on the GPU machine, no network

A GPU machine's image brings Python 3.12 with torch, torchvision, numpy, scipy, scikit-learn, matplotlib,
tqdm, pillow, pytest (and usually PyYAML, packaging); it cannot reach a package index. The device check
(``scripts/device_check.py``) also imports faiss (the environment part, the CUDA tests, the estimator
benchmark) and hydra with omegaconf (the paper's NCSN++ config); nothing it runs imports submitit,
wandb or torch-fidelity. ``make`` downloads manylinux x86-64 wheels of those for the target Python
(``--only-binary``; antlr4-python3-runtime, an sdist only on PyPI, is built into a py3-none-any wheel),
pinned to the versions tested here. faiss-cpu, not faiss-gpu: on CUDA the flat index is the torch
index, and everything sent to a GPU machine travels in at most 64 MiB with the working tree.

``install`` puts into ``SITE_FOLDER`` (``pip install --no-index --no-deps --target``) the wheels whose
modules this interpreter cannot import yet, so the image's own packages are never shadowed; the caller
then prepends ``SITE_FOLDER`` to ``PYTHONPATH``. Standard library only: it runs before anything is
installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Binary wheels (distribution==version, as tested with this repository).
BINARY_REQUIREMENTS = ["faiss-cpu==1.15.1", "hydra-core==1.3.8", "omegaconf==2.3.1", "PyYAML==6.0.4",
                       "packaging==26.4"]
# PyPI has only an sdist: built here into a pure-Python wheel (hydra-core and omegaconf need it).
SOURCE_REQUIREMENTS = ["antlr4-python3-runtime==4.9.3"]
# pip matches a platform tag exactly: the manylinux levels these wheels are published under.
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
# What travels to a GPU machine (working tree + carried paths) is limited to this many bytes.
TRANSFER_LIMIT = 64 << 20


def bundle_distributions() -> list[str]:
    """Distribution names (lower case, '-' separated) the bundle holds."""
    return [requirement.split("==")[0].lower().replace("_", "-")
            for requirement in BINARY_REQUIREMENTS + SOURCE_REQUIREMENTS]


def make_bundle(destination: str | Path, python_version: str = "3.12", pip: list[str] | None = None) -> dict:
    """Download / build the bundle's wheels into ``destination`` (replaced whole, only once complete).

    Returns {"wheels": {file name: bytes}, "bytes": total, "tracked_tree_bytes": ..., "python_version": ...}.
    """
    destination = Path(destination)
    pip = pip or [sys.executable, "-m", "pip"]
    staging = destination.with_name(destination.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                    "--implementation", "cp", *platforms, "-d", str(staging), *BINARY_REQUIREMENTS], check=True)
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(staging), *SOURCE_REQUIREMENTS], check=True)
    wheels = sorted(staging.glob("*.whl"))
    names = {wheel_distribution(path) for path in wheels}
    if missing := set(bundle_distributions()) - names:
        raise SystemExit(f"device bundle: no wheel for {', '.join(sorted(missing))} in {staging}")
    for path in wheels:
        if wheel_distribution(path) in {r.split("==")[0].lower() for r in SOURCE_REQUIREMENTS} \
                and not path.name.endswith("-py3-none-any.whl"):
            raise SystemExit(f"device bundle: {path.name} is not a pure-Python (py3-none-any) wheel")
    shutil.rmtree(destination, ignore_errors=True)
    staging.rename(destination)
    sizes = {path.name: path.stat().st_size for path in sorted(destination.glob("*.whl"))}
    return {"python_version": python_version, "wheels": sizes, "bytes": sum(sizes.values()),
            "tracked_tree_bytes": tracked_tree_bytes(), "transfer_limit_bytes": TRANSFER_LIMIT}


def tracked_tree_bytes() -> int | None:
    """Bytes of the git-tracked working tree (what travels with the bundle), or None outside git."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum((ROOT / name).stat().st_size for name in listed.decode().split("\0") if name and (ROOT / name).is_file())


def wheel_distribution(path: str | Path) -> str:
    """The normalised distribution name of a wheel file (``faiss_cpu-1.15.1-...whl`` -> ``faiss-cpu``)."""
    return Path(path).name.split("-")[0].lower().replace("_", "-")


def wheel_modules(path: str | Path) -> list[str]:
    """Top-level importable names a wheel installs (packages and modules; not .dist-info / .libs folders)."""
    names = set()
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            top, _, rest = member.partition("/")
            if top.endswith((".dist-info", ".data", ".libs")):
                continue
            if rest:  # a folder: a package when it has an __init__ anywhere below (namespace packages too)
                names.add(top)
            elif top.endswith((".py", ".so", ".pyd")):
                names.add(top.split(".")[0])
    return sorted(names)


def install_bundle(bundle: str | Path, site: str | Path) -> dict:
    """Install the wheels of ``bundle`` whose modules this interpreter cannot import into ``site``, offline.

    ``site`` is emptied first (a rerun starts clean). Returns {"installed": [wheel names], "already_there":
    [wheel names], "site": ..., "seconds": ...}; raises ``FileNotFoundError`` when ``bundle`` holds no wheels
    and ``subprocess.CalledProcessError`` when pip fails.
    """
    started = time.perf_counter()
    wheels = sorted(Path(bundle).glob("*.whl"))
    if not wheels:
        raise FileNotFoundError(f"no wheels in {bundle}: run `make device-bundle` where PyPI is reachable "
                                f"(PYTHON_VERSION=3.12 for the GPU image)")
    site = Path(site)
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    importlib.invalidate_caches()
    missing, present = [], []
    for wheel in wheels:
        modules = [name for name in wheel_modules(wheel) if not name.startswith("_")] or wheel_modules(wheel)
        (present if all(importlib.util.find_spec(name) is not None for name in modules) else missing).append(wheel)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--quiet",
                        "--disable-pip-version-check", "--target", str(site), *map(str, missing)], check=True)
    return {"installed": [path.name for path in missing], "already_there": [path.name for path in present],
            "site": str(site), "seconds": time.perf_counter() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make", help="download / build the wheels (needs PyPI)")
    make.add_argument("destination")
    make.add_argument("--python-version", default=os.environ.get("PYTHON_VERSION") or "3.12",
                      help="target Python, e.g. 3.12 (the GPU image) or 3.11 (a local offline-install test)")
    install = commands.add_parser("install", help="install what this interpreter lacks, offline")
    install.add_argument("bundle")
    install.add_argument("site")
    args = parser.parse_args(argv)
    if args.command == "make":
        report = make_bundle(args.destination, args.python_version)
        for name, size in report["wheels"].items():
            print(f"{size / 2**20:8.2f} MiB  {name}")
        tree = report["tracked_tree_bytes"] or 0
        print(f"{report['bytes'] / 2**20:8.2f} MiB  {args.destination}/ ({len(report['wheels'])} wheels, Python "
              f"{args.python_version}); with the tracked tree ({tree / 2**20:.2f} MiB): "
              f"{(report['bytes'] + tree) / 2**20:.2f} of the {TRANSFER_LIMIT >> 20} MiB a GPU machine receives")
        if report["bytes"] + tree > TRANSFER_LIMIT:
            print("device bundle: too large to travel to a GPU machine", file=sys.stderr)
            return 1
        return 0
    print(json.dumps(install_bundle(args.bundle, args.site)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
