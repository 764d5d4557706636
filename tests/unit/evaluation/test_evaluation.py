"""Sampling and evaluation apps: memorisation, seeds, per-checkpoint FID with the best marked, t_switch sweep."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from knn_cm.cli import compose_app
from knn_cm.data import DataStore, load_digits
from knn_cm.estimators import make_estimator
from knn_cm.evaluation import feature_extractors, run_evaluation
from knn_cm.evaluation.feature_extractors import INCEPTION_FILENAME, InceptionWeightsUnavailable
from knn_cm.evaluation.memorisation import memorisation
from knn_cm.models import EDMPrecond, SongUNet, load_network, load_network_file, save_network
from knn_cm.runs.layout import RunLayout
from knn_cm.sampling import heun_sample, noise_for_seeds

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _compose(config_name: str, overrides: list[str]):
    return compose_app(config_name, overrides)


def test_memorisation_of_exact_pf_ode_samples_and_of_noise():
    """Section 6: integrating the PF-ODE with the exact posterior mean reproduces training images."""
    images = np.random.default_rng(0).integers(0, 256, (40, 1, 4, 4), dtype=np.uint8)
    store = DataStore.from_array(images)
    samples = heun_sample(make_estimator("exact", store), noise_for_seeds(range(32), (1, 4, 4)), num_steps=18)
    copies = memorisation(samples, store)
    assert copies["fraction_memorised"] == 1.0 and copies["mean_nearest_distance"] < 1e-3
    fresh = memorisation(torch.rand(32, 1, 4, 4) * 2 - 1, store)
    assert fresh["fraction_memorised"] < 0.2 and fresh["mean_nearest_distance"] > 0.5
    with pytest.raises(ValueError, match="samples must be"):
        memorisation(torch.zeros(2, 1, 8, 8), store)


def test_sample_app_is_reproducible_and_knn_pf_ode_memorises(tmp_path):
    overrides = ["sampler.kind=pf_ode", "estimator.k=64", "estimator.n=32", "num_samples=12", "batch_size=5"]
    first = sample.run(_compose("sample", overrides), tmp_path / "a")
    second = sample.run(_compose("sample", overrides), tmp_path / "b")
    assert torch.equal(first, second)
    saved = np.load(tmp_path / "a" / "samples.npz")
    assert saved["images"].shape == (12, 1, 8, 8) and saved["seeds"].tolist() == list(range(12))
    assert (tmp_path / "a" / "grid.png").exists()
    assert memorisation(first, load_digits())["fraction_memorised"] >= 0.9


def _tiny_edm_network(path: Path) -> Path:
    torch.manual_seed(0)
    network = EDMPrecond(SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=16,
                                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]))
    return save_network(path, network)


def test_evaluate_every_snapshot_marks_the_best_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    train_overrides = ["run_name=test", "model=ncsnpp_tiny", "trainer.max_steps=4", "trainer.batch_size=8",
                       "trainer.snapshot_every=2", "trainer.sample_every=null", "trainer.num_sample_images=4",
                       "trainer.progress=false", "trainer.device=cpu", "trainer.objective.s1=20",
                       "estimator.k=32", "estimator.n=8"]
    train.run(compose_app("train", train_overrides), run_dir)
    overrides = [f"run_dir={run_dir}", "num_samples=64", "metrics.feature_extractor=digits", "progress=false"]
    records = evaluate.run(_compose("evaluate", overrides), tmp_path / "eval")
    assert [r["step"] for r in records] == [2, 4] and all(r["num_samples"] == 64 for r in records)
    assert all(r["fid"] is not None and r["isc_mean"] is not None and r["sampler"] == "consistency" for r in records)
    rows = list(csv.DictReader(open(run_dir / "evaluation.csv")))
    best = [row for row in rows if row["best"] == "1"]
    assert len(best) == 1 and float(best[0]["fid"]) == min(r["fid"] for r in records)
    lines = (run_dir / "evaluation.jsonl").read_text().splitlines()
    evaluate.run(_compose("evaluate", overrides), tmp_path / "eval")  # already evaluated: nothing recomputed
    assert (run_dir / "evaluation.jsonl").read_text().splitlines() == lines
    assert json.loads(lines[0])["images_seen"] == 16


def test_tswitch_sweep_task(tmp_path):
    network = _tiny_edm_network(tmp_path / "edm.pt")
    overrides = ["experiment=tswitch_sweep", "dataset=digits", f"tswitch.network={network}", "num_samples=16",
                 "tswitch.t_switch=[0.0,2.0]", "tswitch.estimators.knn.k=64", "tswitch.estimators.knn.n=16",
                 "tswitch.estimators.stf.n=16", "metrics.feature_extractor=digits", "sampler.num_steps=4",
                 "progress=false"]
    rows = evaluate.run(_compose("evaluate", overrides), tmp_path / "sweep")
    assert {(r["method"], r["t_switch"]) for r in rows} == {(m, t) for m in ("knn", "stf", "forward") for t in (0, 2)}
    by = {(r["method"], r["t_switch"]): r for r in rows}
    # t_switch = 0: KNN integrates alone and reproduces training images; forward returns them exactly.
    assert by[("knn", 0.0)]["fraction_memorised"] >= 0.9 and by[("forward", 0.0)]["fraction_memorised"] == 1.0
    assert (tmp_path / "sweep" / "tswitch.csv").exists() and (tmp_path / "sweep" / "tswitch.png").exists()


def test_tswitch_takes_the_dataset_its_network_was_trained_on(tmp_path):
    """tswitch_sweep names CIFAR-10; a network whose file records digits is swept on digits without dataset=."""
    torch.manual_seed(0)
    network = EDMPrecond(SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=16,
                                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]))
    trained_on = {"dataset": {"name": "digits", "store": {"_target_": "knn_cm.data.load_digits", "xflip": False}}}
    path = save_network(tmp_path / "run" / "snapshots" / "network-000000002.pt", network,
                        metadata={"config": OmegaConf.to_yaml(trained_on)})
    overrides = ["experiment=tswitch_sweep", f"tswitch.network={path.parent.parent}", "num_samples=8",
                 "tswitch.t_switch=[0.0]", "tswitch.estimators.knn.k=16", "tswitch.estimators.knn.n=4",
                 "tswitch.estimators.stf.n=4", "tswitch.include_forward=false", "metrics.feature_extractor=digits",
                 "metrics.isc=false", "sampler.num_steps=2", "progress=false"]
    rows = evaluate.run(_compose("evaluate", overrides), tmp_path / "sweep")  # the run folder's newest snapshot
    assert {row["method"] for row in rows} == {"knn", "stf"} and all(row["fid"] is not None for row in rows)


def test_evaluation_configs_compose():
    config = _compose("evaluate", ["experiment=tswitch_sweep"])
    assert config.task == "tswitch" and config.num_samples == 50000 and config.dataset.name == "cifar10"
    assert set(config.tswitch.estimators) == {"knn", "stf"} and config.tswitch.include_forward
    assert _compose("evaluate", []).metrics.feature_extractor == "auto"  # digits features for digits, else Inception
    with pytest.raises(ValueError, match="unknown task"):
        evaluate.run(_compose("evaluate", ["task=nope"]), Path("/tmp/unused"))


# ------------------------------------------------------------------------------ trustworthy evaluations
TINY_RUN = ["run_name=trust", "model=ncsnpp_tiny", "trainer.max_steps=2", "trainer.batch_size=8",
            "trainer.snapshot_every=null", "trainer.sample_every=null", "trainer.num_sample_images=4",
            "trainer.progress=false", "trainer.device=cpu", "trainer.objective.s1=20", "estimator.k=32",
            "estimator.n=8"]
FAST = ["num_samples=32", "metrics.feature_extractor=digits", "metrics.isc=false", "metrics.memorisation=false",
        "progress=false", "device=cpu"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, one_torch_thread):
    """A tiny iCT run folder (2 steps, one snapshot), trained once per module."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train.run(compose_app("train", TINY_RUN), run_dir)
    return run_dir


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def _evaluate(run_dir: Path, *overrides: str, fast: bool = True) -> list[dict]:
    config = _compose("evaluate", [f"run_dir={run_dir}", *(FAST if fast else []), *overrides])
    return evaluate.run(config, run_dir.parent / "eval")


def _table(run_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "evaluation.csv")))


def test_changed_sampler_settings_and_seeds_are_new_evaluations(run_copy):
    """Two-step sampling after one-step evaluation of the same snapshot is scored afresh (the issue: the
    one-step FID was reported), as are other seeds; settings the sampler does not read are not."""
    one = _evaluate(run_copy)[0]
    two = _evaluate(run_copy, "sampler.sigmas=[80,0.821]")[0]
    seeds = _evaluate(run_copy, "seed_start=100")[0]
    assert one["sampler_settings"] == {"sigmas": [80.0], "sigma_min": 0.002}
    assert two["sampler_settings"] == {"sigmas": [80.0, 0.821], "sigma_min": 0.002}
    assert len({one["fid"], two["fid"], seeds["fid"]}) == 3
    assert _evaluate(run_copy, "sampler.sigmas=[80.0,0.821]")[0] == two  # the same settings: read back
    assert _evaluate(run_copy, "sampler.num_steps=4")[0] == one  # consistency sampling does not read num_steps
    assert len((run_copy / "evaluation.jsonl").read_text().splitlines()) == 3
    rows = _table(run_copy)
    assert sorted(row["sampler_settings"] for row in rows) == ['{"sigma_min":0.002,"sigmas":[80.0,0.821]}',
                                                               '{"sigma_min":0.002,"sigmas":[80.0]}',
                                                               '{"sigma_min":0.002,"sigmas":[80.0]}']
    assert all(row["best"] == "1" for row in rows)  # each setting is its own comparison


def test_a_retrained_snapshot_is_scored_again(run_copy):
    first = _evaluate(run_copy)[0]
    ((_, path),) = RunLayout(run_copy).list_snapshots()
    network = load_network(path)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.mul_(0.5)
    save_network(path, network, metadata=load_network_file(path)["metadata"])  # same name, other content
    second = _evaluate(run_copy)[0]
    assert second["network"] == first["network"] and second["network_digest"] != first["network_digest"]
    assert second["fid"] != first["fid"]
    assert [row["network_digest"] for row in _table(run_copy)] == [second["network_digest"]]  # the old one is gone


def test_fid_false_then_true_computes_the_fid(run_copy):
    without = _evaluate(run_copy, "metrics.fid=false", "metrics.memorisation=true")[0]
    assert without["fid"] is None and without["fraction_memorised"] is not None
    assert _evaluate(run_copy)[0]["fid"] is not None


@pytest.fixture
def no_sampling(monkeypatch):
    """Any sample generated by the checkpoint evaluation fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a sample was generated before the metric settings were checked")

    monkeypatch.setattr(run_evaluation, "generate", refuse)


def test_missing_inception_weights_fail_before_any_sample(run_copy, tmp_path, no_sampling):
    """`python evaluate.py run_dir=... metrics.inception_weights=PATH` (default: 50,000 samples) with no file."""
    with pytest.raises(InceptionWeightsUnavailable) as error:
        _evaluate(run_copy, "metrics.feature_extractor=inception",
                  f"metrics.inception_weights={tmp_path / 'absent.pth'}", fast=False)
    assert "metrics.inception_weights=PATH" in str(error.value) and "download it once" in str(error.value)
    assert not (run_copy / "evaluation.jsonl").exists()


def test_offline_inception_download_fails_before_any_sample(run_copy, tmp_path, monkeypatch, no_sampling):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(feature_extractors, "INCEPTION_URL", f"http://127.0.0.1:9/{INCEPTION_FILENAME}")
    with pytest.raises(InceptionWeightsUnavailable) as error:
        _evaluate(run_copy, "metrics.feature_extractor=inception", fast=False)
    assert "metrics.inception_weights=PATH" in str(error.value) and "downloading it failed" in str(error.value)
    assert not (run_copy / "evaluation.jsonl").exists()


class CreatesMarker:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a crafted file could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _crafted_store(kind: str, marker: Path) -> dict:
    """A dataset.store section whose _target_ creates ``marker`` when instantiated."""
    if kind == "open":
        return {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
    buffer = io.BytesIO()
    torch.save({"images": CreatesMarker(marker)}, buffer)  # the issue's example: torch.load of embedded bytes
    return {"_target_": "torch.load", "f": {"_target_": "io.BytesIO", "_args_": [buffer.getvalue()]},
            "weights_only": False}


@pytest.mark.parametrize("kind", ["open", "torch_load"])
def test_a_crafted_run_config_runs_no_code(run_copy, tmp_path, kind):
    config = OmegaConf.load(run_copy / "config.yaml")
    live = tmp_path / "live-marker"  # the payload is real: Hydra's instantiate runs it
    instantiate(OmegaConf.create(_crafted_store(kind, live)))
    assert live.exists()
    marker = tmp_path / "marker"
    config.dataset.store = _crafted_store(kind, marker)
    (run_copy / "config.yaml").write_text(OmegaConf.to_yaml(config))
    target = "builtins.open" if kind == "open" else "torch.load"
    with pytest.raises(ValueError, match=rf"config.yaml: dataset.store._target_='{target}' is refused"):
        _evaluate(run_copy)
    assert not marker.exists()


@pytest.mark.parametrize("override, message", [
    ("num_samples=0", "num_samples must be an integer >= 1"), ("num_samples=-5", "num_samples must be an integer >= 1"),
    ("num_samples=1.5", "num_samples must be an integer >= 1, got 1.5"),
    ("num_samples=abc", "num_samples must be an integer >= 1, got 'abc'"),
    ("batch_size=0", "batch_size must be an integer >= 1"), ("seed_start=-1", "seed_start must be an integer >= 0"),
    ("metrics.fid=maybe", "metrics.fid must be true or false"),
    ("metrics.feature_extractor=vgg", "metrics.feature_extractor: unknown feature_extractor 'vgg'"),
    ("num_samples=5", "num_samples must be >= 10 for metrics.isc=true")])
def test_bad_evaluation_values_name_the_setting(run_copy, no_sampling, override, message):
    overrides = ["metrics.feature_extractor=digits", "progress=false", override]
    with pytest.raises(ValueError, match=message):
        _evaluate(run_copy, *overrides, fast=False)


@pytest.mark.parametrize("override, message", [
    ("num_samples=0", "num_samples must be an integer >= 1"),
    ("num_samples=2.5", "num_samples must be an integer >= 1"),
    ("num_samples=abc", "num_samples must be an integer >= 1"), ("batch_size=0", "batch_size must be an integer >= 1"),
    ("batch_size=-2", "batch_size must be an integer >= 1"), ("grid_images=-1", "grid_images must be an integer >= 0")])
def test_bad_sample_values_name_the_setting(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        sample.run(_compose("sample", ["sampler.kind=pf_ode", override]), tmp_path / "out")
    assert not (tmp_path / "out" / "samples.npz").exists()
