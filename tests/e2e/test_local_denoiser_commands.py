"""The local denoisers' commands end to end on digits at tiny size: patch-size calibration against a network, and
the denoiser bench, both against a tiny EDM network trained for a few steps here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from knn_cm.data import DataStore, load_digits
from knn_cm.estimators import build_estimator
from knn_cm.models import build_denoiser, save_network

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_denoisers
import calibrate_patch_size

TINY = {"img_resolution": 8, "in_channels": 1, "out_channels": 1, "label_dim": 0, "augment_dim": 0,
        "model_channels": 4, "channel_mult": [1, 1], "channel_mult_emb": 1, "num_blocks": 1, "attn_resolutions": [],
        "dropout": 0.0, "label_dropout": 0.0, "embedding_type": "positional", "channel_mult_noise": 1,
        "encoder_type": "standard", "decoder_type": "standard", "resample_filter": [1, 1]}


@pytest.fixture(scope="module")
def network_file(tmp_path_factory) -> Path:
    """A tiny EDM denoiser trained for 10 steps of EDM's loss on digits (enough to be a network, not a good one)."""
    torch.manual_seed(0)
    denoiser = build_denoiser(TINY, "edm", {"sigma_data": 0.5, "amp_dtype": None})
    data = load_digits().float()
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=1e-2)
    for _ in range(10):
        x = data[torch.randint(0, data.shape[0], (64,))]
        sigma = (torch.randn(64) * 1.2 - 1.2).exp()
        weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        loss = (weight.view(-1, 1, 1, 1) * (denoiser(x + sigma.view(-1, 1, 1, 1) * torch.randn_like(x), sigma)
                                           - x).square()).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_network(tmp_path_factory.mktemp("network") / "network.pt", denoiser.eval())


def test_calibration_writes_a_schedule_config_that_builds(network_file, tmp_path, capsys):
    out = tmp_path / "els_digits.yaml"
    records = calibrate_patch_size.main(["--network", str(network_file), "--dataset", "digits", "--subset", "200",
                                         "--sizes", "3", "5", "--seeds", "0", "1", "2", "--steps", "4",
                                         "--out", str(out)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [record["sigma"] for record in printed] == pytest.approx([record["sigma"] for record in records])
    assert len(records) == 4 and records[0]["sigma"] == pytest.approx(80.0)
    for record in records:
        assert len(record["choices"]) == 3 and record["size"] in (3, 5)
        assert record["size"] == sorted(record["choices"])[1]  # the median of three seeds' choices
        assert set(record["cosine"]) == {3, 5} and all(-1 <= c <= 1 for c in record["cosine"].values())
    spec = yaml.safe_load(out.read_text())
    assert spec["name"] == "els" and spec["k"] is None
    assert [size for _, size in spec["patch_size"]] == [record["size"] for record in records]
    assert "scripts/calibrate_patch_size.py" in out.read_text().splitlines()[3]
    store = DataStore.from_array(load_digits().images[:50].copy())
    estimator = build_estimator(spec, store)
    assert estimator.schedule.sizes_for(torch.tensor([records[0]["sigma"]])) == [records[0]["size"]]


def test_calibration_refuses_padding_for_another_estimator(network_file, tmp_path):
    with pytest.raises(SystemExit):
        calibrate_patch_size.main(["--network", str(network_file), "--estimator", "ls", "--padding", "zero",
                                   "--out", str(tmp_path / "x.yaml")])


def test_the_denoiser_bench_runs_every_estimator_on_digits(network_file, tmp_path, capsys):
    out = tmp_path / "bench"
    records = bench_denoisers.main([
        "--network", str(network_file), "--dataset", "digits", "--subset", "100", "--images", "4",
        "--sigmas", "5.0", "0.5", "--spec", 'knn={"name": "knn", "k": 16, "n": 16}',
        "--spec", 'els={"name": "els", "patch_size": 3}', "--spec", 'cfdm={"name": "cfdm", "draws": 2}',
        "--spec", 'els_knn={"name": "els", "patch_size": 3, "k": 8, "n": 8}', "--out", str(out)])
    labels = ["single", "exact", "knn", "gaussian", "ls", "els", "pspc_square", "cfdm", "els_knn"]
    assert [(r["estimator"], r["sigma"]) for r in records] == [(label, s) for s in (5.0, 0.5) for label in labels]
    assert all(r["mse_to_network"] >= 0 and r["mse_to_x"] >= 0 for r in records)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(printed) == len(records)
    saved = json.loads((out / "results.json").read_text())
    assert saved["N"] == 100 and saved["records"] == records and "bench_denoisers.py" in saved["command"]
    table = (out / "table.md").read_text().splitlines()
    assert table[2] == "| sigma | " + " | ".join(labels) + " |" and len(table) == 4 + 2
    assert (out / "mse_to_network.png").stat().st_size > 0
