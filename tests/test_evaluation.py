"""Sampling and evaluation apps: memorisation, seeds, per-checkpoint FID with the best marked, t_switch sweep."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from knn_cm.data import DataStore, load_digits
from knn_cm.estimators import make_estimator
from knn_cm.evaluation.memorisation import memorisation
from knn_cm.models import EDMPrecond, SongUNet, save_network
from knn_cm.sampling import heun_sample, noise_for_seeds

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


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
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        train.run(compose(config_name="train", overrides=train_overrides), run_dir)
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


def test_evaluation_configs_compose():
    config = _compose("evaluate", ["experiment=tswitch_sweep"])
    assert config.task == "tswitch" and config.num_samples == 50000 and config.dataset.name == "cifar10"
    assert set(config.tswitch.estimators) == {"knn", "stf"} and config.tswitch.include_forward
    assert _compose("evaluate", []).metrics.feature_extractor == "inception"
    with pytest.raises(ValueError, match="unknown task"):
        evaluate.run(_compose("evaluate", ["task=nope"]), Path("/tmp/unused"))
