"""One short offline run that checks a GPU machine: ``bash scripts/device_run.sh`` (or ``make device-check``).

Parts, each in its own process with its own time budget, each printing ONE JSON line (flushed) as soon as
it ends, so a run cut short keeps every line written before the cut:

- ``environment``: GPU, driver, torch and its CUDA, faiss, hydra (the bundle's imports);
- ``tests``: the CUDA tests (``-k cuda`` in the test files that skip without CUDA), pytest's output
  streamed, not captured; counts in the line;
- ``resume``: the real Trainer with a small iCT + KNN model on the GPU: 3 steps, stop (checkpoint), 3
  more in a new Trainer from the checkpoint, bit-identical to 6 straight steps (fp32 and fp16);
- ``syncs``: host synchronisations per training step under ``torch.cuda.set_sync_debug_mode("warn")``,
  counted over steps that neither log nor checkpoint, with the source lines that synchronised, for iCT + KNN,
  EDM + KNN with EDM's augmentation pipe and flow matching + KNN (on the CPU: two steps of each, uncounted);
- ``ddp``: two DDP ranks with the real Trainer, 3 steps, a resume, a 4th step; both ranks end on the same
  weights. With one GPU both ranks run on it over gloo (NCCL refuses two ranks on one GPU); with two or more, one
  GPU each over NCCL; on the CPU, two gloo processes;
- ``training``: iCT (Euler, single-sample targets) against iCT + KNN (Heun, k 2,048, n 256) with the
  paper's NCSN++ (``configs/train/model/ncsnpp_ict.yaml``, 56M parameters) at batch 128 and 512, float32 and
  bf16: seconds per step, their ratio, the estimator's share (CUDA events), peak memory;
- ``estimators``: ``benchmarks/bench_estimators.py`` on the GPU at CIFAR-10 size (50,000 x 3,072;
  synthetic when ``../shared`` is absent, as the line says);
- ``store``: 1.28M x 12,288 uint8 rows (ImageNet-64 size) resident on the GPU, a torch-index search
  and one ``knn`` call (k 2,048, n 256): times and peak memory.

Then a ``summary`` line. Exit status 0 when every part ran and its checks held, 1 otherwise, 2 without
CUDA (after the environment line). Targets (e.g. iCT + KNN at most 1.05x an iCT step) are reported in
``targets`` and never fail the check. Every part trains and computes on ``--device`` (cuda by default:
the Trainer gets ``DistributedContext(device=cuda)``); ``--device cpu --quick`` runs every part on the
CPU at toy sizes, which is how the tests exercise this script.

Budgets (seconds, ``--budget PART=S`` to change) bound each part; a part over its budget is killed with
its process group and reported as ``cut`` with whatever it had reported so far. ``--deadline`` bounds
the whole run (default 340 s: under 6 minutes with the machine's start). The default parts run most important
first, and their budgets plus :data:`RESERVE_SECONDS` (preconditions, the offline install) add up to at most the
deadline, so every part gets its whole budget; a shorter ``--deadline`` cuts the last parts first.

Preconditions, checked first: the wheel bundle (``--bundle``, else ``.whl``) holds wheels, and ``python3 -m pip``
works (the install needs it). A missing one is said in one line on stderr and recorded in the summary; the check
then goes on with what is installed (the environment line names what does not import).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # part_runner beside this script
from part_runner import Interrupted, Runner, check_preconditions, raise_interrupted, third_party_imports, write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
NO_CUDA_MESSAGE = ("device-check: CUDA is not available on this machine (torch.cuda.is_available() is False; "
                   "the environment line says which torch and driver); run it on a GPU node, or pass "
                   "--device cpu --quick for a CPU rehearsal. Nothing else was checked.")
# The parts a default run makes, most important first: whether the GPU works with the bundle at all, the CUDA
# tests, bit-identical resume, host syncs of every objective, DDP, then the speed measurements.
DEFAULT_PARTS = ["environment", "tests", "resume", "syncs", "ddp", "training", "estimators", "store"]
# Part name -> budget in seconds on one H200. The speed parts are sized to their budgets (steps, batches),
# not the other way round: what does not fit is measured less, not cut.
BUDGETS = {"environment": 20, "tests": 55, "resume": 30, "syncs": 45, "ddp": 40, "training": 75, "estimators": 30,
           "store": 35, "stall": 30}
RESERVE_SECONDS = 10.0  # the preconditions, the bundle's offline install and the runner's own start
DEFAULT_DEADLINE = 340.0
if sum(BUDGETS[part] for part in DEFAULT_PARTS) + RESERVE_SECONDS > DEFAULT_DEADLINE:
    raise AssertionError("the default parts' budgets exceed the default deadline")


# ============================================================================================ parts
class PartContext:
    """What a part gets: where to compute, toy sizes or real ones, and ``report`` for partial results.

    ``report(**values)`` merges values into the part's partial result and writes it to disk at once
    (atomically), so a part cut for time still tells what it had measured.
    """

    def __init__(self, device: str, quick: bool, data: str, synthetic: bool, result_file: Path | None):
        self.device = device
        self.quick = quick
        self.data = data
        self.synthetic = synthetic or not Path(data).exists()
        self.result_file = result_file
        self.partial: dict = {}

    def report(self, **values) -> None:
        self.partial.update(values)
        if self.result_file is not None:
            write_json(self.result_file, {"complete": False, "partial": self.partial})

    @property
    def data_note(self) -> str:
        if not self.synthetic:
            return f"CIFAR-10 ({self.data})"
        reason = "--synthetic" if Path(self.data).exists() else f"{self.data} absent"
        return f"synthetic uint8 images ({reason})"


def part_environment(ctx: PartContext) -> dict:
    """GPU, driver, torch / CUDA versions, and whether the bundle's modules import."""
    import platform

    import numpy
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "numpy": numpy.__version__, "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
            "loadavg": os.getloadavg()}
    if info["cuda_available"]:
        properties = torch.cuda.get_device_properties(0)
        info |= {"gpu": properties.name, "gpu_count": torch.cuda.device_count(),
                 "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
                 "capability": f"{properties.major}.{properties.minor}",
                 "multiprocessors": properties.multi_processor_count,
                 "cudnn": torch.backends.cudnn.version()}
    info["nvidia_smi"] = _nvidia_smi()
    missing = []
    for module in ("faiss", "hydra", "omegaconf", "yaml"):
        try:
            imported = __import__(module)
            info[module] = getattr(imported, "__version__", "?")
        except ImportError as error:
            info[module], _ = None, missing.append(f"{module} ({error})")
    if info.get("faiss"):
        import faiss

        info["faiss_gpu"] = hasattr(faiss, "StandardGpuResources")
        info["faiss_from"] = str(Path(faiss.__file__).parent.parent)
    return info | {"missing": missing, "checks": {"bundle_modules_import": not missing}}


def _nvidia_smi() -> str | None:
    """``name, driver_version, memory.total`` from nvidia-smi, or None where it is absent."""
    try:
        completed = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return completed.stdout.strip() or completed.stderr.strip()[-300:]


def cuda_test_files() -> list[str]:
    """Test files holding CUDA-only tests (they test ``torch.cuda.is_available()``), except this script's own."""
    files = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        if path.name != "test_device_check.py" and "cuda.is_available()" in path.read_text():
            files.append(str(path.relative_to(ROOT)))
    return files


def part_tests(ctx: PartContext) -> dict:
    """The CUDA tests (names containing 'cuda'), output streamed: ``pytest -v -s -k cuda FILES``."""
    import pytest

    class Outcomes:
        def __init__(self):
            self.counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
            self.failures: list[str] = []

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or (report.when == "setup" and not report.passed):
                key = {"passed": "passed", "failed": "failed", "skipped": "skipped"}[report.outcome]
                if report.when == "setup" and report.failed:
                    key = "errors"
                self.counts[key] += 1
                if report.failed:
                    self.failures.append(f"{report.nodeid}: {str(report.longrepr).strip().splitlines()[-1][:300]}")
            elif report.when == "teardown" and report.failed:
                self.counts["errors"] += 1
                self.failures.append(f"{report.nodeid} (teardown)")

    # The image's own pytest plugins (coverage, benchmark, xdist, ...) stay out: the project's tests need none.
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    files = cuda_test_files()
    outcomes = Outcomes()
    arguments = ["-v", "-s", "-rfEs", "-p", "no:cacheprovider", "-k", "cuda", *files]
    print(f"device-check tests: pytest {' '.join(arguments)}", flush=True)
    exit_code = int(pytest.main(arguments, plugins=[outcomes]))
    ran = outcomes.counts["passed"] + outcomes.counts["failed"]
    checks = {"no_failures": outcomes.counts["failed"] == 0 and outcomes.counts["errors"] == 0}
    if ctx.device == "cuda":
        checks["cuda_tests_ran"] = ran > 0 and exit_code == 0
    return {"command": "pytest " + " ".join(arguments), "exit_code": exit_code, **outcomes.counts,
            "failures": outcomes.failures[:10], "checks": checks}


# ---------------------------------------------------------------------------- small training runs
# The objectives the small trainer runs: the paper's iCT + KNN (Heun), EDM + KNN with EDM's augmentation pipe
# (the edm experiments' recipe, configs/train/augment/edm_cifar10.yaml) and flow matching + KNN.
SMALL_OBJECTIVES = ("ict_knn", "edm_augment_knn", "fm_knn")


def edm_augment_pipe():
    """The augmentation pipe of ``experiment=edm`` (p 0.12, 9 labels), as train.py builds it."""
    from hydra.utils import instantiate

    from knn_cm.cli import compose_app

    return instantiate(compose_app("train.py", ["experiment=edm"]).trainer.objective.augment)


def small_trainer(device: str, run_dir: Path, *, objective: str = "ict_knn", precision: str = "fp32",
                  max_steps: int = 6, stop_after_steps: int | None = None, init_seed: int = 0, log_every: int = 1,
                  checkpoint_every: int = 1000, images: int = 2048, quick: bool = False, context=None):
    """A real Trainer on ``device`` with a small NCSN-style U-Net (16 x 16, dropout and attention on) on synthetic
    images, x-flips included, and a KNN estimator (k 64, n 16): ``objective`` is one of :data:`SMALL_OBJECTIVES`.
    ``init_seed`` seeds the weights; ``context`` is the DistributedContext (one process on ``device`` when None)."""
    import numpy as np
    import torch

    from knn_cm.data import DataStore
    from knn_cm.estimators import make_estimator
    from knn_cm.models import CMPrecond, EDMPrecond, FMPrecond, SongUNet
    from knn_cm.search import build_index
    from knn_cm.training import (
        DistributedContext,
        EDMObjective,
        FlowMatchingObjective,
        ICTObjective,
        Trainer,
        TrainerConfig,
    )

    if objective not in SMALL_OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(SMALL_OBJECTIVES)}, got {objective!r}")
    resolution, count = (8, 256) if quick else (16, images)
    pixels = np.random.default_rng(0).integers(0, 256, (count, 3, resolution, resolution), dtype=np.uint8)
    store = DataStore.from_array(pixels, name="device_check_small", xflip=True)
    estimator = make_estimator("knn", store, index=build_index(store, "torch", device=device), k=64, n=16,
                               device=device)
    augment = edm_augment_pipe() if objective == "edm_augment_knn" else None
    torch.manual_seed(init_seed)
    unet = SongUNet(img_resolution=resolution, in_channels=3, out_channels=3, model_channels=16 if quick else 32,
                    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[resolution // 2], dropout=0.2,
                    augment_dim=augment.label_dim if augment is not None else 0)
    if objective == "ict_knn":
        network, loss = CMPrecond(unet), ICTObjective(estimator, total_steps=max_steps, solver="heun")
    elif objective == "edm_augment_knn":
        network, loss = EDMPrecond(unet), EDMObjective(estimator, augment=augment)
    else:
        network, loss = FMPrecond(unet), FlowMatchingObjective(estimator)
    config = TrainerConfig(max_steps=max_steps, stop_after_steps=stop_after_steps, batch_size=8 if quick else 32,
                           precision=precision, checkpoint_every=checkpoint_every, log_every=log_every,
                           num_sample_images=4, progress=False, resume="auto", device=torch.device(device).type)
    return Trainer(config, run_dir, store, network, loss, lambda params: torch.optim.RAdam(params, lr=1e-3),
                   context=context or DistributedContext(device=torch.device(device)), estimator_device=device)


def small_ict_knn(device: str, run_dir: Path, **settings):
    """:func:`small_trainer` with iCT + KNN (Heun, k 64, n 16)."""
    return small_trainer(device, run_dir, objective="ict_knn", **settings)


def _weights(trainer) -> dict:
    """Model and EMA tensors on the CPU, by name."""
    state = {f"model.{name}": value for name, value in trainer.model.state_dict().items()}
    state |= {f"ema.{name}": value for name, value in trainer.ema.model.state_dict().items()}
    return {name: value.detach().cpu().clone() for name, value in state.items()}


def _difference(a: dict, b: dict) -> dict:
    import torch

    equal = all(torch.equal(a[name], b[name]) for name in a)
    largest = max(float((a[name].double() - b[name].double()).abs().max()) if a[name].numel() else 0.0 for name in a)
    return {"bit_identical": equal, "max_abs_difference": largest}


def part_resume(ctx: PartContext) -> dict:
    """3 steps, stop (checkpoint), 3 more from the checkpoint in a new Trainer == 6 straight steps."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (read at first use)
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    precisions = ["fp32", "fp16"] if ctx.device == "cuda" else ["fp32"]
    results, checks = {}, {}
    for precision in precisions:
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            straight = small_ict_knn(ctx.device, folder / "straight", precision=precision, quick=ctx.quick)
            straight.fit()
            again = small_ict_knn(ctx.device, folder / "again", precision=precision, quick=ctx.quick)
            again.fit()
            first = small_ict_knn(ctx.device, folder / "resumed", precision=precision, stop_after_steps=3,
                                  quick=ctx.quick)
            first.fit()
            stopped_at = first.step
            # Other initial weights: only a checkpoint that is really loaded can end on the straight run's.
            second = small_ict_knn(ctx.device, folder / "resumed", precision=precision, init_seed=1,
                                   quick=ctx.quick)
            resumed_at = second.step
            second.fit()
            result = {"stopped_at_step": stopped_at, "resumed_at_step": resumed_at, "final_step": second.step,
                      "resumed_from": Path(str(getattr(second, "resumed_from", None))).name,
                      "device": str(second.device), "vs_straight": _difference(_weights(second), _weights(straight)),
                      "straight_runs_agree": _difference(_weights(again), _weights(straight))}
        results[precision] = result
        checks[f"{precision}_resumed_equals_straight"] = (
            stopped_at == 3 and resumed_at == 3 and result["final_step"] == 6
            and result["vs_straight"]["bit_identical"] and result["device"].startswith(ctx.device))
        ctx.report(runs=dict(results), checks=dict(checks))
    return {"runs": results, "checks": checks, "steps": "3 + 3 against 6",
            "model": "SongUNet 16x16 (32 channels, attention, dropout 0.2), iCT + KNN Heun k 64 n 16"}


# ------------------------------------------------------------------------------------ host syncs
SYNC_MESSAGE = "synchronizing CUDA operation"


def count_syncs_per_step(trainer, warmup: int, counted: int, sync_warnings) -> dict:
    """Warnings per ``fit`` iteration and per ``train_step`` under ``sync_warnings`` (a context manager that
    makes each host synchronisation issue a warning containing :data:`SYNC_MESSAGE`).

    Runs ``fit`` for warmup + counted + 1 steps with logging and checkpoints far away. Iteration i spans from
    the start of step i to the start of step i + 1 (the loop's own work included); the last iteration (the
    final checkpoint) and the first ``warmup`` (first-use work) are not counted.
    """
    import linecache
    import warnings
    from collections import Counter

    if trainer.config.stop_after_steps != warmup + counted + 1:
        raise ValueError(f"the trainer must stop after warmup + counted + 1 = {warmup + counted + 1} steps, got "
                         f"trainer.stop_after_steps={trainer.config.stop_after_steps}")
    starts, ends = [], []
    original = trainer.train_step

    def marked_step():
        starts.append(len(caught))
        try:
            return original()
        finally:
            ends.append(len(caught))

    trainer.train_step = marked_step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sync_warnings():
            trainer.fit()
    syncs = [i for i, warning in enumerate(caught) if SYNC_MESSAGE in str(warning.message)]
    per_iteration, per_step, sites = [], [], Counter()
    for step in range(warmup, warmup + counted):
        window = [i for i in syncs if starts[step] <= i < starts[step + 1]]
        per_iteration.append(len(window))
        per_step.append(sum(starts[step] <= i < ends[step] for i in syncs))
        for i in window:
            warning = caught[i]
            line = linecache.getline(warning.filename, warning.lineno).strip()
            sites[f"{Path(warning.filename).name}:{warning.lineno} {line[:100]}"] += 1
    return {"per_fit_iteration": per_iteration, "per_train_step": per_step,
            "sites_per_step": {site: count / counted for site, count in sites.most_common(20)}}


@contextlib.contextmanager
def cuda_sync_warnings():
    import torch

    previous, always = torch.cuda.get_sync_debug_mode(), torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # every synchronisation warns, not only the first at each place
    torch.cuda.set_sync_debug_mode("warn")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.set_warn_always(always)


# (objective, precision) pairs the sync part counts; fp16 needs its grad scaler's read of found-inf.
SYNC_RUNS = [("ict_knn", "fp32"), ("ict_knn", "bf16"), ("ict_knn", "fp16"), ("edm_augment_knn", "fp32"),
             ("edm_augment_knn", "bf16"), ("fm_knn", "fp32"), ("fm_knn", "bf16")]


def part_syncs(ctx: PartContext) -> dict:
    """Host synchronisations per training step on steps that neither log nor checkpoint, for iCT + KNN, EDM + KNN
    with EDM's augmentation pipe, and flow matching + KNN (small model); target 0 except fp16 (its grad scaler
    reads found-inf). Without CUDA there is nothing to count: each objective runs two steps as a rehearsal."""
    if ctx.device != "cuda":
        rehearsed = {}
        for objective in SMALL_OBJECTIVES:
            with tempfile.TemporaryDirectory() as folder:
                trainer = small_trainer(ctx.device, Path(folder), objective=objective, max_steps=2,
                                        checkpoint_every=10_000, log_every=10_000, quick=ctx.quick)
                trainer.fit()
                rehearsed[objective] = trainer.step
            ctx.report(rehearsed=dict(rehearsed))
        return {"not_run": "counting host synchronisations needs CUDA (torch.cuda.set_sync_debug_mode); each "
                           "objective trained 2 steps instead", "rehearsed_steps": rehearsed}
    results = {}
    for objective, precision in SYNC_RUNS:
        with tempfile.TemporaryDirectory() as folder:
            trainer = small_trainer(ctx.device, Path(folder), objective=objective, precision=precision,
                                    max_steps=10_000, stop_after_steps=2 + 4 + 1, log_every=10_000,
                                    checkpoint_every=10_000, quick=ctx.quick)
            results[f"{objective}_{precision}"] = count_syncs_per_step(trainer, warmup=2, counted=4,
                                                                       sync_warnings=cuda_sync_warnings)
        ctx.report(runs=dict(results))
    targets = {f"{name}_no_sync_per_step": max(run["per_fit_iteration"]) == 0
               for name, run in results.items() if not name.endswith("fp16")}
    return {"runs": results, "targets": targets, "warmup_steps": 2, "counted_steps": 4}


# ------------------------------------------------------------------------------------ two-process DDP
def ddp_mode(device: str, gpu_count: int) -> str:
    """How the two ranks share this machine: one GPU each over NCCL with two or more GPUs; both on GPU 0 over gloo
    with one (NCCL refuses two ranks on one GPU); two CPU processes over gloo on the CPU."""
    if device != "cuda":
        return "two CPU processes over gloo"
    if gpu_count >= 2:
        return "one GPU per rank (cuda:0, cuda:1) over NCCL, with the gloo host group"
    return "two ranks on cuda:0 over gloo (NCCL refuses two ranks on one GPU)"


def _ddp_rank(rank: int, device: str, port: int, folder: str, quick: bool) -> None:
    """One rank of the DDP part: 3 steps (a checkpoint at step 2 and at the end), then a new Trainer resumes from
    the newest checkpoint (rank 0 chooses it) and trains a 4th; leaves its weights' digest in ``folder``."""
    import hashlib

    import torch
    import torch.distributed as dist

    from knn_cm.training import DistributedContext

    world = 2
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    if device == "cuda" and torch.cuda.device_count() < 2:
        torch.cuda.set_device(0)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        context = DistributedContext(rank, world, rank, torch.device("cuda", 0))
    else:
        context = DistributedContext.from_env(device, timeout_minutes=2)
    try:
        run_dir = Path(folder) / "run"
        first = small_trainer(str(context.device), run_dir, max_steps=3, checkpoint_every=2, log_every=1,
                              quick=quick, context=context)
        first.fit()
        second = small_trainer(str(context.device), run_dir, max_steps=4, checkpoint_every=2, log_every=1,
                               init_seed=1, quick=quick, context=context)
        resumed_at = second.step
        second.fit()
        digest = hashlib.blake2b(digest_size=16)
        for name, value in sorted(_weights(second).items()):
            digest.update(name.encode() + value.numpy().tobytes())
        result = {"rank": rank, "device": str(context.device), "first_steps": first.step, "resumed_at": resumed_at,
                  "final_step": second.step, "weights_digest": digest.hexdigest()}
        context.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        context.close()
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(result))


def part_ddp(ctx: PartContext) -> dict:
    """Two DDP ranks on this machine (:func:`ddp_mode` says how), each with the real Trainer: after 3 steps and a
    resume for a 4th both ranks hold the same weights, and the resume started where the first run stopped."""
    import socket

    import torch
    import torch.multiprocessing as mp

    gpus = torch.cuda.device_count() if ctx.device == "cuda" else 0
    mode = ddp_mode(ctx.device, gpus)
    ctx.report(mode=mode)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_ddp_rank, args=(ctx.device, port, folder, ctx.quick), nprocs=2, join=True)
        ranks = [json.loads((Path(folder) / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    checks = {"ranks_hold_the_same_weights": ranks[0]["weights_digest"] == ranks[1]["weights_digest"],
              "resumed_where_it_stopped": all(r["first_steps"] == 3 and r["resumed_at"] == 3 and
                                              r["final_step"] == 4 for r in ranks),
              "trained_on_device": all(r["device"].startswith(ctx.device) for r in ranks)}
    return {"mode": mode, "ranks": ranks, "checks": checks,
            "model": "SongUNet 16x16 (32 channels), iCT + KNN Heun k 64 n 16, 3 steps + 1 after a resume"}


# ------------------------------------------------------------------------------ training speed
def ncsnpp_config(quick: bool):
    """The paper's NCSN++ config (configs/train/model/ncsnpp_ict.yaml at CIFAR-10 size); a narrow one when quick."""
    from knn_cm.cli import compose_app

    overrides = ["dataset=cifar10_jpeg", "model=ncsnpp_ict"]
    if quick:
        overrides += ["model.network.model_channels=16", "model.network.channel_mult=[1,1]",
                      "model.network.num_blocks=1", "model.network.attn_resolutions=[]"]
    return compose_app("train.py", overrides).model


def part_training(ctx: PartContext) -> dict:
    """Seconds per step of iCT and iCT + KNN with NCSN++ on ``ctx.device``, at two batches and precisions."""
    import numpy as np
    import torch
    from hydra.utils import instantiate

    from knn_cm.data import DataStore, load_image_folder
    from knn_cm.estimators import make_estimator
    from knn_cm.search import build_index
    from knn_cm.training import DistributedContext, ICTObjective, Trainer, TrainerConfig

    device = torch.device(ctx.device)
    cuda = device.type == "cuda"
    batches, k, n = ((4, 8), 32, 8) if ctx.quick else ((128, 512), 2048, 256)
    warmup, steps = (1, 1) if ctx.quick else (2, 3)  # 8 settings of a 56M network within the part's budget
    if ctx.synthetic or ctx.quick:
        count = 512 if ctx.quick else 50_000
        images = np.random.default_rng(0).integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
        store = DataStore.from_array(images, name=f"synthetic{count}", xflip=True)
        source = f"{count:,} synthetic uint8 images ({'--quick' if ctx.quick else ctx.data_note}), x-flips"
    else:
        store = load_image_folder(ctx.data, subfolder="train", progress=False).with_xflip(True)
        source = f"{ctx.data_note}, x-flips"
    model_config = ncsnpp_config(ctx.quick)
    estimators = {"ict": ("euler", make_estimator("single", store, device=device)),
                  "ict_knn": ("heun", make_estimator("knn", store, index=build_index(store, "torch", device=device),
                                                     k=k, n=n, device=device))}
    ctx.report(data=source, batches=list(batches), k=k, n=n)
    runs, parameters = {}, None
    for batch in batches:
        for precision in ("fp32", "bf16"):
            entry = {}
            for name, (solver, estimator) in estimators.items():
                torch.manual_seed(0)
                network = instantiate(model_config)
                parameters = sum(p.numel() for p in network.parameters())
                config = TrainerConfig(max_steps=400_000, batch_size=batch, precision=precision, progress=False,
                                       resume="never", preemption_signals=(), device=device.type)
                with tempfile.TemporaryDirectory() as folder:
                    try:
                        trainer = Trainer(config, Path(folder), store, network,
                                          ICTObjective(estimator, total_steps=400_000, solver=solver),
                                          lambda params: torch.optim.RAdam(params, lr=1e-4),
                                          context=DistributedContext(device=device), estimator_device=device)
                        entry[name] = time_train_steps(trainer, warmup, steps)
                    except torch.cuda.OutOfMemoryError as error:  # the other settings still run
                        entry[name] = {"error": f"OutOfMemoryError: {str(error)[:300]}"}
                    trainer = network = None
                if cuda:
                    torch.cuda.empty_cache()
            if all("seconds_per_step" in entry[name] for name in estimators):
                entry["time_vs_ict"] = entry["ict_knn"]["seconds_per_step"] / entry["ict"]["seconds_per_step"]
            runs[f"batch{batch}_{precision}"] = entry
            ctx.report(runs=dict(runs), parameters=parameters)
    ratios = {name: entry["time_vs_ict"] for name, entry in runs.items() if "time_vs_ict" in entry}
    devices = {entry[name]["device"] for entry in runs.values() for name in estimators if "device" in entry[name]}
    model = "NCSN++ (configs/train/model/ncsnpp_ict.yaml)" + (" narrowed (--quick)" if ctx.quick else "")
    return {"data": source, "model": model,
            "parameters": parameters, "k": k, "n": n, "warmup": warmup, "steps": steps, "runs": runs,
            "time_vs_ict": ratios, "paper_table4_time_vs_ict": 1.17,
            "checks": {"every_setting_ran": len(ratios) == len(runs),
                       "trained_on_device": all(name.startswith(device.type) for name in devices)},
            "targets": {"knn_step_at_most_1.05x_ict": bool(ratios) and max(ratios.values()) <= 1.05}}


def time_train_steps(trainer, warmup: int, steps: int) -> dict:
    """Seconds per ``train_step`` after ``warmup`` steps (the GPU drained before and after the timed ones),
    the estimator's seconds per step (the objective's ``estimator_seconds``: CUDA events on a GPU, read
    after the drain) and the peak memory of the timed steps."""
    import torch

    cuda = trainer.device.type == "cuda"
    for _ in range(warmup):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    records = [trainer.train_step() for _ in range(steps)]
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    timed = [record.get("estimator_seconds") for record in records]
    estimator_seconds = sum(float(value) for value in timed) / steps if None not in timed else None
    return {"seconds_per_step": seconds, "images_per_s": trainer.config.batch_size / seconds,
            "estimator_seconds_per_step": estimator_seconds,
            "estimator_share": estimator_seconds / seconds if estimator_seconds is not None else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "device": str(trainer.device)}


# ------------------------------------------------------------------------------ estimator bench
def part_estimators(ctx: PartContext) -> dict:
    """``benchmarks/bench_estimators.py`` on ``ctx.device``: searches, knn against its search, per t."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_estimators

    if ctx.quick:
        argv = ["--synthetic", "1500", "--k", "32", "--n", "8", "--batch", "4", "--times", "0.5", "20",
                "--repeats", "1", "--mse-repeats", "1", "--peak-shapes", "small"]
    else:
        argv = ["--repeats", "3", "--mse-repeats", "1", "--threads", str(os.cpu_count() or 1)]  # within its budget
        argv += ["--synthetic", "50000"] if ctx.synthetic else ["--data", ctx.data]
    argv = ["--device", ctx.device, *argv, "--methods"]
    result = bench_estimators.main(argv)
    per_t = result["per_t"]
    ratios = result["targets"]["knn_vs_flat_search_per_t (target <= 1.10)"]
    return {
        "data": result["data"], "synthetic": ctx.synthetic or ctx.quick, "argv": argv,
        "search_ms_per_query": {t: {name.removeprefix("search_"): entry[name]["ms_per_query"]
                                    for name in entry if name.startswith("search_")} for t, entry in per_t.items()},
        "knn_vs_search_per_t": ratios,
        "knn_ms_per_query": {t: entry["knn_flat"]["ms_per_query"] for t, entry in per_t.items()},
        "exact_fraction_of_peak_min": result["targets"]["exact_fraction_of_peak_min"],
        "matmul_peak_gflops": result["matmul_peak"]["gflops"],
        "targets": {"knn_at_most_1.10x_search": max(ratios.values()) <= 1.10},
    }


# ------------------------------------------------------------------------------ ImageNet-size store
def part_store(ctx: PartContext) -> dict:
    """1.28M x 12,288 uint8 rows resident on ``ctx.device``; a torch-index search and one knn call."""
    import resource

    import numpy as np
    import torch

    from knn_cm.data import DataStore
    from knn_cm.estimators import make_estimator
    from knn_cm.search import build_index

    device = torch.device(ctx.device)
    cuda = device.type == "cuda"
    size, shape = (4096 if ctx.quick else 1_280_000), (3, 64, 64)
    batch, k, n = (8, 64, 16) if ctx.quick else (128, 2048, 256)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def peak_gib(reset: bool = False):
        if not cuda:
            return None
        value = torch.cuda.max_memory_allocated() / 2**30
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return value

    started = time.perf_counter()
    images = np.empty((size, *shape), dtype=np.uint8)
    generator = torch.Generator(device=device).manual_seed(0)
    for start in range(0, size, 65_536):  # drawn on the device: 15.7 GB of random bytes in seconds
        stop = min(start + 65_536, size)
        images[start:stop] = torch.randint(0, 256, (stop - start, *shape), dtype=torch.uint8, device=device,
                                           generator=generator).cpu().numpy()
    store = DataStore.from_array(images, name=f"synthetic{size}")
    # Hashing 15.7 GB (~20 s on one core) is not what this part measures: a synthetic store's own label.
    store._base_fingerprint = f"synthetic-{size}x{'x'.join(map(str, shape))}-seed0"
    result = {"rows": size, "dim": int(np.prod(shape)), "store_gib": images.nbytes / 2**30,
              "generate_s": time.perf_counter() - started}
    ctx.report(**result)

    started = time.perf_counter()
    index = build_index(store, "torch", device=device)
    sync()
    result |= {"resident_s": time.perf_counter() - started, "resident_storage": str(index.rows.rows.dtype),
               "resident_peak_gib": peak_gib(reset=True)}
    ctx.report(**result)

    rows = index.rows
    picks = torch.randperm(size, generator=torch.Generator().manual_seed(1))[:batch].to(device)
    x = rows.gather(picks)
    noise = torch.randn(x.shape, generator=generator, device=device)
    searches = {}
    for t in (1.0, 20.0):
        z = x + t * noise
        index.search(z, k)  # first use of this shape
        sync()
        started = time.perf_counter()
        for _ in range(3):
            index.search(z, k)
        sync()
        searches[str(t)] = (time.perf_counter() - started) / 3
    result |= {"search_s": searches, "search_peak_gib": peak_gib(reset=True)}
    ctx.report(**result)

    knn = make_estimator("knn", store, index=index, k=k, n=n, device=device)
    estimator_generator = torch.Generator(device=device).manual_seed(2)
    z = (x + 1.0 * noise).reshape(batch, *shape)
    sync()
    started = time.perf_counter()
    first = knn(z, 1.0, generator=estimator_generator)
    sync()
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    out = knn(z, 1.0, generator=estimator_generator)
    sync()
    knn_s = time.perf_counter() - started
    finite = bool(torch.isfinite(out).all() and torch.isfinite(first).all())
    result |= {"batch": batch, "k": k, "n": n, "knn_first_call_s": first_s, "knn_s": knn_s,
               "knn_vs_search_t1": knn_s / searches["1.0"], "knn_peak_gib": peak_gib(),
               "host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               "checks": {"knn_finite": finite},
               "targets": {"knn_at_most_1.10x_search": knn_s / searches["1.0"] <= 1.10}}
    return result


def part_stall(ctx: PartContext) -> dict:
    """Not a check (never run by default): reports its pid, then waits until it is cut. The tests use it to
    exercise budgets and kills without a GPU."""
    ctx.report(pid=os.getpid(), note="waiting to be cut")
    while True:
        time.sleep(0.5)


PARTS = {"environment": part_environment, "tests": part_tests, "resume": part_resume, "syncs": part_syncs,
         "ddp": part_ddp, "training": part_training, "estimators": part_estimators, "store": part_store,
         "stall": part_stall}


# ============================================================================================ child
def child_main(args) -> int:
    """Run one part in this process and leave its result (or error) in ``args.result``."""
    result_file = Path(args.result)
    ctx = PartContext(args.device, args.quick, args.data, args.synthetic, result_file)
    threads = None
    try:
        if args.child != "stall":  # (the stall part reports at once, before any import)
            import torch

            threads = torch.get_num_threads()
            if args.quick:  # toy networks run fastest on one thread, and a shared CPU is not oversubscribed
                torch.set_num_threads(1)
        result = PARTS[args.child](ctx)
        payload = {"complete": True, "result": result}
    except Exception as error:  # the line names the error; the traceback goes to the log
        traceback.print_exc()
        payload = {"complete": False, "partial": ctx.partial, "error": f"{type(error).__name__}: {error}"[:2000]}
    payload |= {"pid": os.getpid(), "torch_threads_at_start": threads, "imports": third_party_imports(ROOT)}
    write_json(result_file, payload)
    return 0


def _budgets(values: list[str]) -> dict:
    budgets = {}
    for value in values:
        name, _, seconds = value.partition("=")
        if name not in PARTS or not seconds:
            raise SystemExit(f"--budget {value!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        budgets[name] = float(seconds)
    return budgets


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=DEFAULT_PARTS, choices=list(PARTS),
                        help="parts to run, in order (environment always runs first)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="where every part computes (cpu: a rehearsal, with --quick)")
    parser.add_argument("--quick", action="store_true", help="toy sizes (CPU rehearsal and tests)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 archive or folder (else synthetic)")
    parser.add_argument("--synthetic", action="store_true", help="synthetic data even when --data exists")
    parser.add_argument("--budget", nargs="*", default=[], metavar="PART=SECONDS", help="override part budgets")
    parser.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE, help="seconds for the whole check")
    parser.add_argument("--jsonl", help="also keep the JSON lines in this file (rewritten atomically per line)")
    parser.add_argument("--bundle", help="folder of wheels to install first, offline (scripts/device_bundle.py)")
    parser.add_argument("--site", default=str(Path(tempfile.gettempdir()) / "knn-cm-device-site"),
                        help="where --bundle is installed (prepended to PYTHONPATH for the parts)")
    parser.add_argument("--child", choices=list(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.budget = _budgets(args.budget)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))  # knn_cm.io (standard library only) in the runner; everything in a part
    if args.child:
        return child_main(args)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, raise_interrupted)
    with tempfile.TemporaryDirectory(prefix="device-check-") as workdir:
        runner = Runner(Path(__file__), BUDGETS, args, env, Path(workdir))
        try:
            runner.preconditions = check_preconditions(Path(args.bundle) if args.bundle else ROOT / ".whl")
            if runner.preconditions["missing"]:
                print(f"device-check: preconditions missing: {'; '.join(runner.preconditions['missing'])}; going "
                      f"on with what is installed", file=sys.stderr, flush=True)
            if args.bundle and runner.preconditions["missing"]:
                runner.emit({"part": "install", "status": "skipped",
                             "reason": "; ".join(runner.preconditions["missing"])})
            elif args.bundle:
                sys.path.insert(0, str(Path(__file__).resolve().parent))
                import device_bundle

                try:
                    installed = device_bundle.install_bundle(args.bundle, args.site)
                    runner.emit({"part": "install", "status": "ok", **installed})
                except (OSError, subprocess.CalledProcessError) as error:
                    runner.emit({"part": "install", "status": "error", "error": str(error)})
                paths.insert(0, args.site)
            env["PYTHONPATH"] = os.pathsep.join(paths)
            environment = runner.run_part("environment")
            if environment["status"] in ("error", "cut"):  # torch itself does not work here
                why = environment.get("error") or environment.get("reason")
                print(f"device-check: the environment part did not finish ({why}); nothing else was checked",
                      file=sys.stderr)
                runner.summary()
                return 1
            if args.device == "cuda" and not environment.get("cuda_available"):
                print(NO_CUDA_MESSAGE, file=sys.stderr)
                runner.summary({"status": "no_cuda"})
                return 2
            for name in args.parts:
                if name != "environment":
                    runner.run_part(name)
                if runner.interrupted:
                    break
        except Interrupted as interrupted:
            runner.interrupted = interrupted
        if runner.interrupted:
            runner.summary({"status": "interrupted", "reason": str(runner.interrupted)})
            return 128 + runner.interrupted.signum
        return 0 if runner.summary()["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
