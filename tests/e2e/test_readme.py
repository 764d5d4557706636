"""The README's commands, run as written: every command of its ```bash blocks and every `python ...`, `make ...`
(and the like) it quotes, in a copy of this checkout, each once.

Each command has an entry in COMMANDS saying how it is checked: it runs and its output is checked (RUN), it is
refused on this machine with the project's one-line error and writes nothing (REFUSED: a GPU experiment without
CUDA, data that is not beside the copy, a run folder a GPU run would have made), or it cannot run in a test, with
the reason (SKIP). A README command without an entry fails the test, so a new command is tested from the day it is
written. The full quickstart (``make run``, 1,600 steps) is stood in for by a four-step one in its folder
(``outputs/train/quickstart``, bound to a config other than the two-step try's, as the full run's is), so the
README's commands after it run in order after a quickstart; a digits_fm run of ``trainer.max_steps=2`` makes the run
folder its flow-matching sampling command reads.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.processes import copy_checkout, run_process

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PROGRAMS = ("python ", "make ", "bash ", "torchrun ", "sbatch ", "pip ", "pre-commit ", "source ", "git ")
NO_CUDA = "error: trainer.device=cuda but torch sees no usable CUDA device"
NO_CIFAR = "error: dataset.store: image folder or archive "  # the copy has no ../shared/data beside it


def readme_commands(text: str) -> list[str]:
    """The commands of ```bash blocks (a line without its comment) and the quoted commands of the prose, once each,
    in the order the README gives them."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            command = re.split(r"\s#", line, maxsplit=1)[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())  # a quoted command may wrap across lines
        if span.startswith(PROGRAMS):
            commands.append(span)
    return list(dict.fromkeys(commands))


def readme_python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


RUN, REFUSED, SKIP = "run", "refused", "skip"
QUICKSTART = "python train.py trainer.max_steps=4"  # the full quickstart's stand-in (the module docstring)
# command -> (how, what: the stdout lines to find for RUN, the first stderr line's start for REFUSED, the reason
# for SKIP). Commands of one chain run in order in one copy; chains run side by side.
COMMANDS = {
    "git clone <this repository> knn-cm && cd knn-cm": (SKIP, "a placeholder address; the test runs in a copy"),
    "make venv": (RUN, []),
    "source .venv/bin/activate": (RUN, []),
    "pip uninstall -y faiss-cpu && pip install '.[gpu]'": (SKIP, "replaces faiss-cpu and needs the network"),
    "make run": (SKIP, f"1,600 steps (6 minutes): stood in for by `{QUICKSTART}`, the quickstart's folder bound to "
                       "another config than the two-step try's, as the full run's is"),
    "make test": (SKIP, "the suite this test is part of"),
    'make run ARGS="trainer.max_steps=2 run_name=quickstart_try"': (
        RUN, ["finished: step 2 of 2", "  run folder:      outputs/train/quickstart_try",
              "  sample:          python sample.py network=outputs/train/quickstart_try sampler.sigmas=[80,0.821]"]),
    "python train.py --cfg job": (RUN, ["  optimizer:", "    lr: 0.0005"]),
    "python sample.py network=outputs/train/quickstart sampler.sigmas=[80,0.821]": (
        RUN, ["64 samples of digits with the 'consistency' sampler in "]),
    "python evaluate.py run_dir=outputs/train/quickstart num_samples=2000": (
        RUN, ["evaluated 1 snapshot(s) of outputs/train/quickstart (2000 samples each, consistency sampler, "
              "digits features)", "table: outputs/train/quickstart/evaluation.csv"]),
    "python train.py experiment=NAME [key=value ...]": (SKIP, "a template"),
    "python train.py experiment=ict_knn debug=default": (RUN, ["finished: step 2 of 2"]),
    "python train.py experiment=ict_knn": (REFUSED, NO_CUDA),
    "torchrun --nproc_per_node 8 train.py experiment=ict_knn": (REFUSED, NO_CUDA),
    "python train.py -m experiment=quickstart estimator.k=16,32 trainer.max_steps=2": (
        RUN, ["sweep: 2 of 2 jobs completed"]),
    "sbatch --nodes=4 slurm/train.sbatch experiment=ict_knn": (
        SKIP, "four GPU nodes; tests/slurm submits slurm/train.sbatch to the local cluster"),
    "python train.py experiment=ict_knn dataset=cifar10_jpeg trainer.device=cpu trainer.max_steps=2 "
    "trainer.batch_size=8": (REFUSED, NO_CIFAR),
    "python sample.py network=outputs/train/ict_knn sampler.sigmas=[80,0.821]": (
        REFUSED, "error: network outputs/train/ict_knn does not exist (expected a network file or a run folder)"),
    "python sample.py network=edm.pt sampler.kind=hybrid sampler.t_switch=2": (
        REFUSED, "error: network edm.pt does not exist (expected a network file or a run folder)"),
    "python sample.py network=outputs/train/digits_fm sampler.kind=flow_heun sampler.num_steps=8": (
        RUN, ["64 samples of digits with the 'flow_heun' sampler in "]),
    "python evaluate.py run_dir=outputs/train/ict_knn": (
        REFUSED, "error: run_dir=outputs/train/ict_knn is not a folder"),
    "python evaluate.py experiment=tswitch_sweep tswitch.network=edm.pt": (
        REFUSED, "error: tswitch.network=edm.pt: network edm.pt does not exist"),
    "python evaluate_estimators.py experiment=cifar10_reduced": (REFUSED, NO_CIFAR),
    "python scripts/campaign.py --dry-run": (RUN, []),
    "python scripts/report.py": (RUN, []),
    "bash scripts/digits_seeds.sh table1": (SKIP, "9 runs of 1,600 steps, about an hour on 2 cores"),
    "python scripts/seeded_report.py": (REFUSED, "error: no finished run under "),
    "bash scripts/device_run.sh": (SKIP, "the GPU machine's check; tests/e2e/test_device_check.py rehearses it"),
    "make bench": (SKIP, "benchmarks print measurements, minutes long; they are not tests"),
    "make lint": (RUN, []),
    "make format": (RUN, []),
    "pre-commit install": (SKIP, "installs a git hook into a checkout"),
}
# The commands whose refusal lists, before its error line, what is missing (lines starting so).
LISTED = {"python scripts/seeded_report.py": "not written: "}
# What a command needs first, run in the same copy: the two-step digits_fm run the flow-matching sampling reads.
BEFORE = {"python sample.py network=outputs/train/digits_fm sampler.kind=flow_heun sampler.num_steps=8":
          "python train.py experiment=digits_fm trainer.max_steps=2",
          'make run ARGS="trainer.max_steps=2 run_name=quickstart_try"': QUICKSTART}
CHAINS = [  # commands in the order they must run; the chains themselves are independent
    ["make venv", "source .venv/bin/activate", 'make run ARGS="trainer.max_steps=2 run_name=quickstart_try"',
     "python sample.py network=outputs/train/quickstart sampler.sigmas=[80,0.821]",
     "python evaluate.py run_dir=outputs/train/quickstart num_samples=2000", "make lint", "make format"],
    ["python sample.py network=outputs/train/digits_fm sampler.kind=flow_heun sampler.num_steps=8",
     "python train.py -m experiment=quickstart estimator.k=16,32 trainer.max_steps=2",
     "python train.py experiment=ict_knn debug=default", "python scripts/campaign.py --dry-run",
     "python scripts/report.py", "python train.py --cfg job"],
    ["python train.py experiment=ict_knn", "torchrun --nproc_per_node 8 train.py experiment=ict_knn",
     "python train.py experiment=ict_knn dataset=cifar10_jpeg trainer.device=cpu trainer.max_steps=2 "
     "trainer.batch_size=8",
     "python sample.py network=outputs/train/ict_knn sampler.sigmas=[80,0.821]",
     "python sample.py network=edm.pt sampler.kind=hybrid sampler.t_switch=2",
     "python evaluate.py run_dir=outputs/train/ict_knn",
     "python evaluate.py experiment=tswitch_sweep tswitch.network=edm.pt",
     "python evaluate_estimators.py experiment=cifar10_reduced", "python scripts/seeded_report.py"],
]


def test_every_readme_command_has_an_entry():
    commands = readme_commands(README.read_text())
    assert "make run" in commands and "python scripts/report.py" in commands  # the extraction finds both kinds
    assert sorted(set(commands) - set(COMMANDS)) == [], "README commands this test does not know"
    assert sorted(set(COMMANDS) - set(commands)) == [], "entries for commands the README no longer has"
    chained = [command for chain in CHAINS for command in chain]
    assert sorted(chained) == sorted(command for command, (how, _) in COMMANDS.items() if how != SKIP)


def _shell(command: str, cwd: Path, timeout: float = 600) -> tuple[int | None, str, str]:
    """(exit status, stdout, stderr) of ``command`` in bash from ``cwd`` with the venv active
    (tests.processes.run_process)."""
    venv = ROOT / ".venv"
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("HYDRA_FULL_ERROR", "KNN_CM_SHORT_ERRORS", "PYTHONPATH")}
    environment |= {"OMP_NUM_THREADS": "1", "TMPDIR": str(cwd / ".tmp"), "VIRTUAL_ENV": str(venv),
                    "PATH": f"{venv / 'bin'}:{environment.get('PATH', '')}"}
    (cwd / ".tmp").mkdir(exist_ok=True)
    return run_process(["bash", "-c", command], cwd, environment, timeout)


def _files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if ".tmp" not in path.parts}


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> list[Path]:
    """One copy of the checkout per chain (so a refusal's "writes nothing" is not muddled by another chain)."""
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("needs the checkout's .venv (make venv)")
    if Path(sys.executable).resolve() != (ROOT / ".venv" / "bin" / "python").resolve():
        pytest.skip("the README's commands run .venv's python; this suite runs another")
    folders = []
    for number in range(len(CHAINS)):
        copy = tmp_path_factory.mktemp(f"readme{number}") / "knn-cm"
        copy.mkdir()
        copy_checkout(copy)
        folders.append(copy)
    if subprocess.run(["make", "-q", ".venv/.installed"], cwd=folders[0]).returncode != 0:
        pytest.skip(".venv is older than pyproject.toml: make venv would reinstall it from a copy")
    return folders


@pytest.fixture(scope="module")
def outcomes(copies) -> dict[str, tuple[int | None, str, str, set[str], set[str]]]:
    """command -> (status, stdout, stderr, files before, files after) for every command of CHAINS."""
    def run_chain(chain: list[str], copy: Path) -> dict:
        results = {}
        for command in chain:
            if command in BEFORE:
                status, stdout, stderr = _shell(BEFORE[command], copy)
                if status != 0:  # reported as the command's own failure
                    results[command] = (status, stdout, f"{BEFORE[command]} failed:\n{stderr}", set(), set())
                    continue
            before = _files(copy)
            results[command] = (*_shell(command, copy), before, _files(copy))
        return results

    with ThreadPoolExecutor(max_workers=2) as pool:
        return {command: result for chained in pool.map(run_chain, CHAINS, copies)
                for command, result in chained.items()}


@pytest.mark.parametrize("command", [command for command, (how, _) in COMMANDS.items() if how == RUN])
def test_a_readme_command_runs_as_written(outcomes, command):
    status, stdout, stderr, _, _ = outcomes[command]
    assert status == 0, f"{command}\n{stderr[-3000:]}"
    for expected in COMMANDS[command][1]:
        assert any(line.startswith(expected) for line in stdout.splitlines()), f"{command}: {expected!r}\n{stdout}"


@pytest.mark.parametrize("command", [command for command, (how, _) in COMMANDS.items() if how == REFUSED])
def test_a_readme_command_that_cannot_run_here_says_why_in_one_line_and_writes_nothing(outcomes, command):
    if COMMANDS[command][1] == NO_CUDA and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU experiment would train")
    status, _, stderr, before, after = outcomes[command]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert status not in (0, None), f"{command}\n{stderr[-3000:]}"
    assert lines and lines[0].startswith(COMMANDS[command][1]), f"{command}\n{stderr[-3000:]}"
    if not command.startswith("torchrun"):  # torchrun adds its own report of the failed workers
        # seeded_report.py first says, per table, what it lacks ("not written: table1: ...")
        own = [line for line in stderr.splitlines() if not line.startswith(LISTED.get(command, "\0"))]
        assert "Traceback" not in stderr and len(own) <= 2, stderr
    assert after == before, f"{command} wrote {sorted(after - before)}"


def test_the_quickstart_commands_leave_what_they_say(outcomes, copies):
    quickstart = copies[0]  # the first chain: make run, then its sampling and evaluation
    run = quickstart / "outputs" / "train" / "quickstart"
    assert (run / "evaluation.csv").is_file() and list((run / "snapshots").glob("network-*.pt"))
    assert not (quickstart / "outputs" / "evaluate").exists()  # evaluate.py's log went into the run folder
    assert len(list((quickstart / "outputs" / "sample").glob("*/grid.png"))) == 1


def test_the_readme_python_blocks_run(one_torch_thread, monkeypatch):
    """The estimator in your own code as written; the CIFAR-10 block with the development archive for its file name
    (when ../shared has it)."""
    estimator_block, cifar_block = readme_python_blocks(README.read_text())
    namespace = {}
    exec(compile(estimator_block, "README.md python block", "exec"), namespace)
    assert namespace["x_hat"].shape == namespace["z"].shape == namespace["score"].shape == (4, 1, 8, 8)
    archive = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"the CIFAR-10 block needs {archive}")
    monkeypatch.chdir(archive.parent)  # the block names the archive by its file name
    namespace = {}
    exec(compile(cifar_block, "README.md CIFAR-10 block", "exec"), namespace)
    assert len(namespace["store"]) == 50_000 and namespace["store"].shape == (3, 32, 32)
