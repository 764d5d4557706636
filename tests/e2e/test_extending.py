"""docs/extending.md as written: its files written into a package beside a copy of the checkout, its commands run.

The package is installed (``pip install --no-build-isolation -e``, as the page says) into a virtual environment of
its own that sees the project's packages, so its entry points never reach the project's environment; every command
then runs from the copy with that environment first on PATH. knn-cm's own files are not touched: the copy is
compared with the checkout afterwards, outputs aside.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.processes import copy_checkout, run_process

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "extending.md"
# What each command must print (stdout) besides exiting 0.
EXPECTED = {
    "python train.py estimator=nearest_image debug=default": "finished: step 2 of 2",
    "python sample.py sampler.kind=pf_ode sampler.num_steps=4 '~estimator' '+estimator={name: nearest_image}' "
    "num_samples=4": "4 samples of digits with the 'pf_ode' sampler",
    "python train.py experiment=digits_edm objective=one_sigma debug=default": "finished: step 2 of 2",
    "python train.py experiment=digits_edm objective=one_sigma trainer.objective.sigma=2.0 estimator=knn_digits "
    "debug=default": "finished: step 2 of 2",
    "python train.py experiment=nearest_image_ict debug=default": "finished: step 2 of 2",
}


def page_files(text: str) -> dict[str, str]:
    """path -> content of every "File `path`:" followed by a fenced block."""
    return dict(re.findall(r"^File `([^`]+)`:\n\n```\w*\n(.*?)^```", text, flags=re.S | re.M))


def page_commands(text: str) -> list[str]:
    return [line.strip() for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
            for line in block.splitlines() if line.strip()]


def _environment(folder: Path) -> dict:
    """A virtual environment of its own (pip included) that sees the project's installed packages: those of the
    environment running the tests."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True)
    # ensurepip's setuptools would shadow the project's (which builds wheels without the wheel package)
    subprocess.run([folder / "bin" / "python", "-m", "pip", "uninstall", "-q", "-y", "setuptools"],
                   capture_output=True)
    site = next((folder / "lib").glob("python*/site-packages"))
    (site / "knn_cm_project.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return dict(os.environ, PATH=f"{folder / 'bin'}:{os.environ['PATH']}", VIRTUAL_ENV=str(folder),
                PIP_NO_INDEX="1", TMPDIR=str(folder.parent / "tmp"))


def test_the_page_names_its_files_and_commands():
    text = PAGE.read_text()
    files = page_files(text)
    assert sorted(files) == ["my_extensions/my_extensions/__init__.py",
                             "my_extensions/my_extensions/configs/train/estimator/nearest_image.yaml",
                             "my_extensions/my_extensions/configs/train/experiment/nearest_image_ict.yaml",
                             "my_extensions/my_extensions/configs/train/objective/one_sigma.yaml",
                             "my_extensions/my_extensions/estimators.py", "my_extensions/my_extensions/objectives.py",
                             "my_extensions/pyproject.toml"]
    commands = page_commands(text)
    assert commands[0] == "pip install --no-build-isolation -e ../my_extensions"
    assert set(commands[1:]) - {"python evaluate_estimators.py '+estimators.nearest_image={name: nearest_image}' "
                                "study.num_sources=8 study.repeats=2 'study.times=[0.5,5.0]'"} == set(EXPECTED)


@pytest.mark.slow
def test_the_walkthroughs_run_as_written(tmp_path):
    text = PAGE.read_text()
    copy = tmp_path / "knn-cm"
    copy.mkdir()
    copy_checkout(copy)
    for name, content in page_files(text).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    (tmp_path / "tmp").mkdir()
    env = _environment(tmp_path / "env")
    tracked = {path: path.read_bytes() for path in copy.rglob("*") if path.is_file() and ".venv" not in path.parts}
    for command in page_commands(text):
        code, stdout, stderr = run_process(["bash", "-c", command], cwd=copy, env=env, timeout=600)
        assert code == 0, f"{command}\n{stdout[-2000:]}\n{stderr[-3000:]}"
        if command in EXPECTED:
            assert EXPECTED[command] in stdout, f"{command}\n{stdout[-2000:]}"
        if command.startswith("python evaluate_estimators.py"):
            results = list((copy / "outputs" / "estimator_study").rglob("results.csv"))
            assert len(results) == 1 and "nearest_image" in results[0].read_text()
    changed = [str(path.relative_to(copy)) for path, content in tracked.items() if path.read_bytes() != content]
    assert changed == [], "the walkthroughs touched knn-cm's files"
