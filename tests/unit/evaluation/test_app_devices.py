"""``device=auto`` in sample.py, evaluate.py and evaluate_estimators.py refuses the CPU when GPUs were allocated.

The trainer already refused to train on the CPU when the job was given GPUs that torch cannot use; the other apps
went on on the CPU without a word. The check is one (``knn_cm.device.auto_uses_cuda``, behind ``as_device``),
shown here with an allocation in the environment and no usable CUDA (this machine's torch sees none).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import knn_cm.device as device_module
from knn_cm.cli import compose_app, is_known
from knn_cm.device import GPU_ALLOCATION_VARIABLES, as_device

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import evaluate_estimators  # noqa: E402
import sample  # noqa: E402

# Each app with settings that reach its device check; the settings after it would stop the call anyway (no
# network, no times), so a run that got past the check ends at once instead of working on the CPU.
APPS = {
    "sample": (sample, ["device=auto", "network=null"], "device"),
    "evaluate": (evaluate, ["task=tswitch", "device=auto", "tswitch.network=null"], "device"),
    "estimator_study": (evaluate_estimators, ["study.device=auto", "study.times=[]"], "study.device"),
}


@pytest.fixture
def gpus_given_but_unusable(monkeypatch):
    for name in GPU_ALLOCATION_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "nvidia_smi_driver", lambda: "535.104.05")
    return monkeypatch


@pytest.mark.parametrize("app", sorted(APPS))
def test_device_auto_refuses_the_cpu_when_the_job_was_given_gpus(gpus_given_but_unusable, tmp_path, app):
    module, overrides, setting = APPS[app]
    with pytest.raises(ValueError) as raised:
        module.run(compose_app(app, overrides), tmp_path / "out")
    message = str(raised.value)
    assert message.startswith(f"{setting}=auto: this job was given GPUs (SLURM_JOB_GPUS=0) but torch sees no "
                              f"usable CUDA device"), message
    assert "NVIDIA driver 535.104.05" in message and f"set {setting}=cpu" in message and "\n" not in message
    assert is_known(raised.value)  # the apps print it as one line
    assert not (tmp_path / "out").exists()


def test_device_auto_is_the_cpu_when_no_gpu_was_allocated(monkeypatch):
    for name in GPU_ALLOCATION_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert as_device("auto") == torch.device("cpu")
    assert as_device("cpu") == torch.device("cpu")  # cpu on purpose: no refusal


def test_the_trainer_and_the_apps_share_one_check(gpus_given_but_unusable):
    """The trainer's refusal is the same function, under its own setting's name."""
    from knn_cm.training.distributed import DistributedContext

    with pytest.raises(RuntimeError, match=r"^trainer\.device=auto: this job was given GPUs \(SLURM_JOB_GPUS=0\)"):
        DistributedContext.from_env("auto")
    with pytest.raises(device_module.UnusableGPUsError, match=r"^estimator device=auto: "):
        as_device("auto", "estimator device")
