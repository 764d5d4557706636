"""scripts/device_check.py and scripts/device_bundle.py on a machine without a GPU: the runner (one JSON line
per part, flushed; budgets; kills), the no-CUDA exit, every part rehearsed on the CPU at toy sizes, the
sync counter's windows, and the offline install of the bundle.

The GPU-only measurements themselves (CUDA resume, sync counts, NCSN++ step times, the 1.28M-row store)
need a GPU: ``bash scripts/device_run.sh`` there (docs/benchmarks.md, "Device check")."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "device_check.py"
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_bundle  # noqa: E402
import device_check  # noqa: E402

# What the GPU image provides (issue 19): these distributions and everything they require.
IMAGE_DISTRIBUTIONS = ["torch", "torchvision", "numpy", "scipy", "scikit-learn", "matplotlib", "tqdm", "pillow",
                       "pytest"]


# The ddp part's two processes each import torch and torch._dynamo (the optimizer's first use) and build a
# Trainer: on a GPU node's 16 cores within the part's budget, on two shared cores beside other jobs not always.
DDP_ON_A_SHARED_CPU = ("--budget", "ddp=150")


# ------------------------------------------------------------------------------------------ helpers
def _start(*arguments, env=None) -> subprocess.Popen:
    """The real script as its own process group (the test kills the group, never anything else)."""
    return subprocess.Popen([sys.executable, str(SCRIPT), *arguments], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)


def _children(pid: int) -> dict[int, str]:
    """Processes whose parent is ``pid``: {pid: command line}."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _gone_soon(pids, seconds: float = 30.0) -> bool:
    """Whether every pid has ended within ``seconds`` (a bound on waiting, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(_alive(pid) for pid in pids):
            return True
        time.sleep(0.1)
    return False


def _kill(process: subprocess.Popen, pids=()) -> None:
    """End the runner's process group and any part it started (tests leave no process behind)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)


def _read_line(process: subprocess.Popen) -> dict:
    line = process.stdout.readline()
    assert line, f"the check ended early: {process.stderr.read()[-2000:]}"
    return json.loads(line)


def _wait_for_child(process: subprocess.Popen, part: str) -> int:
    """The pid of the runner's child running ``part`` (it is started right after the previous line)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for pid, command in _children(process.pid).items():
            if f"--child {part} " in command:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no child process for part {part}")


# ------------------------------------------------------------------------------------------ runner
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_it_prints_the_environment_says_so_and_exits_2(tmp_path):
    completed = subprocess.run([sys.executable, str(SCRIPT), "--jsonl", str(tmp_path / "out.jsonl")], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "CUDA is not available" in completed.stderr and "--device cpu --quick" in completed.stderr
    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [line["part"] for line in lines] == ["environment", "summary"]
    assert lines[0]["cuda_available"] is False and lines[0]["torch"] == torch.__version__
    assert lines[1]["status"] == "no_cuda"
    assert (tmp_path / "out.jsonl").read_text().splitlines() == completed.stdout.splitlines()


def test_killed_midway_the_finished_parts_lines_survive(tmp_path):
    """kill -9 of the runner while its second part runs: the first part's line, printed and written to the
    --jsonl file as soon as that part ended, parses; the running part dies with the runner."""
    jsonl = tmp_path / "out.jsonl"
    process = _start("--device", "cpu", "--quick", "--parts", "environment", "stall", "--jsonl", str(jsonl))
    stall = None
    try:
        first = _read_line(process)
        assert first["part"] == "environment" and first["status"] == "ok"
        stall = _wait_for_child(process, "stall")  # the next part runs: the line came before the check ended
        assert process.poll() is None
        os.killpg(process.pid, signal.SIGKILL)  # the runner's group; the part is in a session of its own
        process.wait(timeout=30)
        assert process.stdout.read() == ""  # nothing after the kill
        written = [json.loads(line) for line in jsonl.read_text().splitlines()]
        assert written == [first]
        assert _gone_soon([stall]), "the running part outlived the killed runner"
    finally:
        _kill(process, [stall] if stall else [])


def test_a_part_over_its_budget_is_cut_reported_and_the_check_goes_on(tmp_path):
    jsonl = tmp_path / "out.jsonl"
    process = _start("--device", "cpu", "--quick", "--parts", "environment", "stall", "syncs",
                     "--budget", "stall=5", "--jsonl", str(jsonl))
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        _kill(process)
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [line["part"] for line in lines] == ["environment", "stall", "syncs", "summary"], stderr[-2000:]
    cut = lines[1]
    assert cut["status"] == "cut" and "budget of 5 s" in cut["reason"]
    assert cut["partial"]["note"] == "waiting to be cut"  # what the part had reported before the cut
    assert _gone_soon([cut["partial"]["pid"]])
    assert lines[2]["status"] == "skipped" and "needs CUDA" in lines[2]["not_run"]
    assert lines[2]["rehearsed_steps"] == {objective: 2 for objective in device_check.SMALL_OBJECTIVES}
    assert lines[3]["status"] == "failed" and lines[3]["failed_parts"] == ["stall"]
    assert process.returncode == 1
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == lines


def test_sigterm_cuts_the_running_part_and_writes_the_summary(tmp_path):
    process = _start("--device", "cpu", "--quick", "--parts", "environment", "stall")
    stall = None
    try:
        assert _read_line(process)["part"] == "environment"
        stall = _wait_for_child(process, "stall")
        os.kill(process.pid, signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        lines = [json.loads(line) for line in stdout.splitlines()]
        assert [line["part"] for line in lines] == ["stall", "summary"], stderr[-2000:]
        assert lines[0]["status"] == "cut" and "SIGTERM" in lines[0]["reason"]
        assert lines[1]["status"] == "interrupted"
        assert process.returncode == 128 + signal.SIGTERM
        assert _gone_soon([stall])
    finally:
        _kill(process, [stall] if stall else [])


def _allowed_modules() -> set[str]:
    """Top-level modules of the image's distributions and the bundle's, with everything they require."""
    from importlib import metadata

    from packaging.requirements import Requirement

    pending = IMAGE_DISTRIBUTIONS + device_bundle.bundle_distributions()
    seen = set()
    while pending:
        name = pending.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        with contextlib.suppress(metadata.PackageNotFoundError):
            for text in metadata.requires(name) or []:
                requirement = Requirement(text)
                if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                    pending.append(requirement.name)
    modules = set()
    for module, distributions in metadata.packages_distributions().items():
        if any(d.lower().replace("_", "-") in seen for d in distributions):
            modules.add(module)
    return modules


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_part_in_order_on_the_cpu(tmp_path):
    """``--device cpu --quick``: each part's line in order, each part on the CPU and in its own process
    (the benchmark's thread count cannot leak into the training parts), resume bit-identical, and every
    module the parts import is the GPU image's or the bundle's."""
    jsonl = tmp_path / "out.jsonl"
    process = _start("--device", "cpu", "--quick", "--jsonl", str(jsonl), *DDP_ON_A_SHARED_CPU)
    try:
        stdout, stderr = process.communicate(timeout=900)
    finally:
        _kill(process)
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [line["part"] for line in lines] == [*device_check.DEFAULT_PARTS, "summary"], stderr[-3000:]
    status = {line["part"]: line["status"] for line in lines}
    assert status == {**{part: "ok" for part in device_check.DEFAULT_PARTS}, "syncs": "skipped",
                      "summary": "ok"}, [line.get("error") for line in lines]
    parts = {line["part"]: line for line in lines}
    assert parts["tests"]["failed"] == 0
    assert parts["tests"]["skipped"] > 0 or torch.cuda.is_available()  # the CUDA tests skip without CUDA
    assert parts["resume"]["runs"]["fp32"]["vs_straight"]["bit_identical"]
    assert parts["resume"]["runs"]["fp32"]["resumed_at_step"] == 3
    assert {run[name]["device"] for run in parts["training"]["runs"].values() for name in ("ict", "ict_knn")} == {"cpu"}
    assert set(parts["training"]["runs"]) == {"batch4_fp32", "batch4_bf16", "batch8_fp32", "batch8_bf16"}
    assert parts["store"]["checks"]["knn_finite"] and parts["store"]["dim"] == 12_288
    assert parts["ddp"]["mode"] == "two CPU processes over gloo" and all(parts["ddp"]["checks"].values())
    measured = [line for line in lines if line["part"] != "summary"]
    assert len({line["pid"] for line in measured}) == len(measured)
    assert len({line["torch_threads_at_start"] for line in measured}) == 1
    imported = set().union(*(line["imports"] for line in measured))
    assert {"faiss", "hydra", "omegaconf"} <= imported
    assert imported - _allowed_modules() == set(), "a part imports what neither the image nor the bundle has"
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == lines


def test_the_default_parts_budgets_fit_the_deadline_most_important_first():
    """The budgets summed to 435 s against a 340 s deadline, so whichever part came last was cut whenever earlier
    ones used their budgets. Now they fit with the install's reserve, in order of importance."""
    parts = device_check.DEFAULT_PARTS
    assert sum(device_check.BUDGETS[part] for part in parts) + device_check.RESERVE_SECONDS \
        <= device_check.DEFAULT_DEADLINE
    assert parts[:5] == ["environment", "tests", "resume", "syncs", "ddp"]  # works at all, then correctness
    assert parts[5:] == ["training", "estimators", "store"]  # speed last: a short --deadline cuts these first
    assert {"ddp", "syncs"} <= set(device_check.PARTS)


def test_preconditions_name_a_bundle_without_wheels_and_a_python_without_pip(tmp_path):
    found = device_check.check_preconditions(tmp_path)
    assert found["wheels"] == 0 and found["pip"] is not None
    assert found["missing"] == [f"no wheels in {tmp_path} (make device-bundle where PyPI is reachable, and carry "
                                f"the folder)"]
    no_pip = tmp_path / "python3"
    no_pip.write_text("#!/bin/sh\necho 'No module named pip' >&2\nexit 1\n")
    no_pip.chmod(0o755)
    (tmp_path / "x-1.0-py3-none-any.whl").write_bytes(b"")
    found = device_check.check_preconditions(tmp_path, python=str(no_pip))
    assert found["wheels"] == 1 and found["missing"] == ["python3 -m pip does not work (No module named pip)"]


def test_missing_preconditions_are_said_in_one_line_and_the_check_goes_on(tmp_path):
    completed = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--parts", "environment",
                                "--bundle", str(tmp_path / "empty")], cwd=ROOT, capture_output=True, text=True,
                               timeout=300)
    said = [line for line in completed.stderr.splitlines() if "preconditions missing" in line]
    assert said == [f"device-check: preconditions missing: no wheels in {tmp_path / 'empty'} (make device-bundle "
                    f"where PyPI is reachable, and carry the folder); going on with what is installed"]
    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [line["part"] for line in lines] == ["install", "environment", "summary"], completed.stderr[-2000:]
    assert lines[0]["status"] == "skipped" and "no wheels" in lines[0]["reason"]
    assert lines[2]["status"] == "ok" and lines[2]["preconditions"]["wheels"] == 0
    assert completed.returncode == 0


def test_two_ddp_ranks_train_resume_and_agree_on_the_cpu(tmp_path):
    """The DDP part as the rehearsal runs it: two gloo processes, the real Trainer, 3 steps, a resume, a 4th."""
    completed = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--parts", "environment",
                                "ddp", *DDP_ON_A_SHARED_CPU], cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = {json.loads(line)["part"]: json.loads(line) for line in completed.stdout.splitlines()}
    ddp = lines["ddp"]
    assert ddp["status"] == "ok", (ddp.get("error"), completed.stderr[-3000:])
    assert ddp["mode"] == "two CPU processes over gloo"
    assert [rank["resumed_at"] for rank in ddp["ranks"]] == [3, 3]
    assert all(ddp["checks"].values())


def test_the_ddp_mode_says_how_the_ranks_share_the_machine():
    assert device_check.ddp_mode("cuda", 1) == "two ranks on cuda:0 over gloo (NCCL refuses two ranks on one GPU)"
    assert device_check.ddp_mode("cuda", 8).startswith("one GPU per rank")
    assert device_check.ddp_mode("cpu", 0) == "two CPU processes over gloo"


# ------------------------------------------------------------------------------------------ parts
class _FakeTrainer:
    """fit() runs train_step (two syncs each), a loop sync between steps, then a final checkpoint (five)."""

    def __init__(self, stop_after_steps):
        self.config = type("Config", (), {"stop_after_steps": stop_after_steps})()

    def _sync(self):
        warnings.warn(f"called a {device_check.SYNC_MESSAGE}", stacklevel=2)

    def train_step(self):
        self._sync()
        self._sync()
        return {}

    def fit(self):
        for _ in range(self.config.stop_after_steps):
            self.train_step()
            self._sync()
            warnings.warn("an unrelated warning", stacklevel=2)
        for _ in range(5):
            self._sync()


def test_sync_counter_counts_per_step_and_per_loop_iteration_without_the_final_checkpoint():
    counted = device_check.count_syncs_per_step(_FakeTrainer(2 + 3 + 1), warmup=2, counted=3,
                                                sync_warnings=contextlib.nullcontext)
    assert counted["per_train_step"] == [2, 2, 2]
    assert counted["per_fit_iteration"] == [3, 3, 3]
    sites = counted["sites_per_step"]
    assert sum(sites.values()) == 3 and all("test_device_check.py:" in site for site in sites)
    with pytest.raises(ValueError, match="stop_after_steps"):
        device_check.count_syncs_per_step(_FakeTrainer(4), warmup=2, counted=3, sync_warnings=contextlib.nullcontext)


def test_estimator_part_reads_the_benchmark_json(monkeypatch):
    """The GPU estimator part's summary from a benchmark result of the real script's shape (run on CPU)."""
    import bench_estimators

    real_main = bench_estimators.main
    captured = {}

    def cpu_main(argv):
        captured["argv"] = argv
        return real_main(["--synthetic", "1500", "--k", "32", "--n", "8", "--batch", "4", "--times", "0.5", "20",
                          "--repeats", "1", "--mse-repeats", "1", "--peak-shapes", "small", "--methods"])

    monkeypatch.setattr(bench_estimators, "main", cpu_main)
    previous = torch.get_num_threads()
    try:
        context = device_check.PartContext("cuda", False, str(ROOT / "absent.tar.gz"), False, None)
        summary = device_check.part_estimators(context)
    finally:
        torch.set_num_threads(previous)
    assert captured["argv"][:2] == ["--device", "cuda"]
    assert captured["argv"][captured["argv"].index("--synthetic") + 1] == "50000" and summary["synthetic"]
    assert set(summary["knn_vs_search_per_t"]) == {"0.5", "20"}
    assert {"faiss_cpu", "torch"} <= set(summary["search_ms_per_query"]["20"])
    assert summary["matmul_peak_gflops"] > 0 and "knn_at_most_1.10x_search" in summary["targets"]


def test_training_part_composes_the_papers_ncsnpp():
    """The model config the training comparison instantiates is NCSN++ at 56M parameters."""
    from hydra.utils import instantiate

    network = instantiate(device_check.ncsnpp_config(quick=False))
    parameters = sum(p.numel() for p in network.parameters())
    assert 55e6 < parameters < 57e6, parameters


def test_cuda_test_selection_holds_the_sync_free_tests_and_not_this_file():
    files = device_check.cuda_test_files()
    assert "tests/unit/estimators/test_sync_free.py" in files and "tests/unit/training/test_stage_timer.py" in files
    assert "tests/e2e/test_device_check.py" not in files  # its tests start the check itself


# ------------------------------------------------------------------------------------------ bundle
def _wheel(folder: Path, distribution: str, module: str) -> Path:
    """A minimal pure-Python wheel installing ``module`` (a package with one attribute)."""
    path = folder / f"{distribution}-1.0-py3-none-any.whl"
    info = f"{distribution}-1.0.dist-info"
    files = {f"{module}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def test_bundle_install_puts_only_what_the_interpreter_lacks_into_the_site_offline(tmp_path):
    bundle = tmp_path / "whl"
    bundle.mkdir()
    _wheel(bundle, "kc_device_fake", "kc_device_fake")
    _wheel(bundle, "numpy_stand_in", "numpy")  # numpy imports here: its wheel must not shadow it
    assert device_bundle.wheel_modules(bundle / "numpy_stand_in-1.0-py3-none-any.whl") == ["numpy"]
    site = tmp_path / "site"
    (site / "stale").mkdir(parents=True)
    result = device_bundle.install_bundle(bundle, site)
    assert result["installed"] == ["kc_device_fake-1.0-py3-none-any.whl"]
    assert result["already_there"] == ["numpy_stand_in-1.0-py3-none-any.whl"]
    assert (site / "kc_device_fake" / "__init__.py").exists() and not (site / "numpy").exists()
    assert not (site / "stale").exists()  # a rerun starts from an empty site
    probe = subprocess.run([sys.executable, "-c", "import kc_device_fake; print(kc_device_fake.VALUE)"],
                           env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True)
    assert probe.stdout.strip() == "42"
    with pytest.raises(FileNotFoundError, match="make device-bundle"):
        device_bundle.install_bundle(tmp_path / "empty", site)


def test_bundle_lists_the_modules_the_check_needs_and_fits_the_transfer():
    assert {"faiss-cpu", "hydra-core", "omegaconf", "antlr4-python3-runtime", "pyyaml"} <= \
        set(device_bundle.bundle_distributions())
    assert not {"faiss-gpu", "wandb", "torch-fidelity", "submitit"} & set(device_bundle.bundle_distributions())
    tree = device_bundle.tracked_tree_bytes()
    assert tree is None or tree < device_bundle.TRANSFER_LIMIT // 4  # room left for the ~20 MiB of wheels


def _image_like_python(tmp_path: Path) -> Path:
    """A fresh venv that sees this environment's packages except the bundle's (and wandb, torch-fidelity,
    submitit): what the GPU image holds, for this Python version."""
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    excluded = set()
    for distribution in device_bundle.bundle_distributions() + ["wandb", "torch-fidelity", "submitit",
                                                               "hydra-submitit-launcher", "knn-cm"]:
        from importlib import metadata

        with contextlib.suppress(metadata.PackageNotFoundError):
            for file in metadata.distribution(distribution).files or []:
                excluded.add(file.parts[0])
    image = tmp_path / "image-site"
    image.mkdir()
    source = Path(sysconfig.get_paths()["purelib"])
    for entry in source.iterdir():
        if entry.name not in excluded and not entry.name.endswith(".pth") and entry.name != "__pycache__":
            (image / entry.name).symlink_to(entry)
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    (target / "image.pth").write_text(f"{image}\n")
    return python


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("KNN_CM_DEVICE_BUNDLE"),
                    reason="needs a bundle for this Python: PYTHON_VERSION=3.x make device-bundle, then "
                           "KNN_CM_DEVICE_BUNDLE=.whl (docs/benchmarks.md, Device check)")
def test_offline_install_of_the_bundle_into_an_image_like_environment(tmp_path):
    """scripts/device_run.sh with a fresh venv that lacks the bundle's packages, with no network (a network
    namespace of its own where ``unshare`` allows it; pip --no-index in any case): the install line, and
    every part's line from the CPU rehearsal with the bundle's modules loaded from the site folder.

    Run it with a bundle for this Python: ``PYTHON_VERSION=3.11 make device-bundle`` (needs PyPI), then
    ``KNN_CM_DEVICE_BUNDLE=.whl pytest tests/e2e/test_device_check.py -k image_like``."""
    bundle = Path(os.environ["KNN_CM_DEVICE_BUNDLE"]).resolve()
    python = _image_like_python(tmp_path)
    probe = subprocess.run([str(python), "-c", "import faiss"], capture_output=True, text=True)
    assert probe.returncode != 0, "the image-like environment must lack faiss"
    env = dict(os.environ, PYTHON=str(python), DEVICE_BUNDLE=str(bundle), DEVICE_SITE=str(tmp_path / "site"),
               DEVICE_CHECK_ARGS="--device cpu --quick")
    env.pop("PYTHONPATH", None)
    can_unshare = subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0
    offline = ["unshare", "-rn"] if can_unshare else []
    completed = subprocess.run([*offline, "bash", str(ROOT / "scripts" / "device_run.sh"), str(tmp_path / "out")],
                               env=env, capture_output=True, text=True, timeout=900, start_new_session=True)
    lines = [json.loads(line) for line in (tmp_path / "out" / "device_check.jsonl").read_text().splitlines()]
    parts = {line["part"]: line for line in lines}
    assert list(parts) == ["install", *device_check.DEFAULT_PARTS, "summary"], completed.stderr[-3000:]
    installed = {device_bundle.wheel_distribution(name) for name in parts["install"]["installed"]}
    assert {"faiss-cpu", "hydra-core", "omegaconf", "antlr4-python3-runtime"} <= installed
    assert parts["environment"]["faiss_from"] == str(tmp_path / "site")
    assert parts["summary"]["status"] == "ok", [line.get("error") for line in lines]
    assert completed.returncode == 0
