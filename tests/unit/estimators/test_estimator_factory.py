"""One factory, one schema: every estimator spec in the configs builds through knn_cm.estimators.factory, and the
same spec gives the same estimator whichever app reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from knn_cm.estimators import KNN, build_estimator, build_estimator_set, make_estimator
from knn_cm.search import build_index

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def _specs_in(path: Path, key: str | None = None) -> dict:
    config = OmegaConf.load(path)
    return OmegaConf.to_container(config if key is None else OmegaConf.select(config, key), resolve=True)


def _small_ivf(spec: dict) -> dict:
    """IVF cells sized for a test store (the sets' nlist 1,024 needs far more training data)."""
    index = spec.get("index") or {}
    if str(index.get("kind", "")).startswith("ivf"):
        return {**spec, "index": {**index, "nlist": 8, "nprobe": 4}}
    return spec


def _estimate(estimator, store, sigma=0.7):
    x = store.float(torch.arange(6))
    z = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return estimator(z, sigma, x=x, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("path", sorted((CONFIGS / "estimator_study" / "estimator_set").glob("*.yaml")),
                         ids=lambda path: path.stem)
def test_every_estimator_set_builds(clustered_store, path):
    specs = {label: _small_ivf(spec) for label, spec in _specs_in(path).items()}
    built = build_estimator_set(specs, clustered_store)
    assert set(built) == set(specs)
    for label, estimator in built.items():
        assert estimator.name == specs[label]["name"]
        assert bool(torch.isfinite(_estimate(estimator, clustered_store)).all()), label


def test_app_specs_build(clustered_store):
    """sample.yaml's estimator and evaluate.yaml's t_switch set are specs of the same schema."""
    sample = _specs_in(CONFIGS / "sample" / "sample.yaml", "estimator")
    assert isinstance(build_estimator({**sample, "k": 64, "n": 8}, clustered_store), KNN)
    tswitch = _specs_in(CONFIGS / "evaluate" / "evaluate.yaml", "tswitch.estimators")
    assert set(build_estimator_set(tswitch, clustered_store)) == set(tswitch)


def test_a_spec_builds_the_estimator_make_estimator_builds(clustered_store):
    """Bit for bit the estimator of the by-name constructor: the factory adds nothing to the numerics."""
    index = build_index(clustered_store, "flat")
    by_name = make_estimator("knn", clustered_store, index=index, k=64, n=8)
    from_spec = build_estimator({"name": "knn", "k": 64, "n": 8, "index": {"kind": "flat"}}, clustered_store)
    assert torch.equal(_estimate(from_spec, clustered_store), _estimate(by_name, clustered_store))
    stf = build_estimator({"name": "stf", "n": 16, "variant": "shared"}, clustered_store)
    assert torch.equal(_estimate(stf, clustered_store),
                       _estimate(make_estimator("stf", clustered_store, n=16, variant="shared"), clustered_store))


def test_equal_index_specs_share_one_index_and_a_missing_index_is_flat(clustered_store):
    built = build_estimator_set({"a": {"name": "knn", "k": 32, "n": 4, "index": {"kind": "flat"}},
                                 "b": {"name": "knn", "k": 64, "n": 8, "index": {"kind": "flat"}},
                                 "c": {"name": "knn", "k": 64, "n": 8, "index": {"kind": "torch"}},
                                 "knn": {"k": 16, "n": 4}},  # name from the label, default index
                                clustered_store)
    assert built["a"].index is built["b"].index and built["c"].index is not built["a"].index
    assert built["c"].index.kind == "torch" and built["knn"].index.kind == "flat"


def test_a_null_index_device_searches_where_the_estimator_computes(clustered_store, monkeypatch):
    import knn_cm.search

    seen = []
    original = knn_cm.search.build_index

    def recording(store, **kwargs):
        seen.append(kwargs)
        return original(store, **kwargs)

    monkeypatch.setattr(knn_cm.search, "build_index", recording)
    build_estimator({"name": "knn", "k": 8, "n": 4, "index": {"kind": "torch", "device": None}}, clustered_store, "cpu")
    build_estimator({"name": "knn", "k": 8, "n": 4, "index": {"kind": "torch"}}, clustered_store, "cpu")
    assert seen == [{"kind": "torch", "device": torch.device("cpu")}, {"kind": "torch"}]


def test_estimators_that_do_not_search_ignore_the_index(clustered_store):
    """train.py's index group is there whatever the estimator; only KNN builds it."""
    single = build_estimator({"name": "single", "index": {"kind": "no-such-kind"}}, clustered_store)
    assert single.name == "single" and not hasattr(single, "index")


@pytest.mark.parametrize("spec, setting, message", [
    ({"name": "kNN"}, "estimators.mine", r"estimators.mine.name must be one of .*knn.*single.*, got 'kNN'"),
    ({"k": 3}, "estimator", r"estimator.name must be one of .* got None"),
    ({"name": "network"}, "tswitch.estimators.edm", r"tswitch.estimators.edm: a network estimator needs checkpoint"),
    ({"name": "knn", "k": 0}, "estimator", r"k must be an integer >= 1, got 0"),
])
def test_bad_specs_name_the_setting(clustered_store, spec, setting, message):
    with pytest.raises(ValueError, match=message):
        build_estimator(spec, clustered_store, setting=setting)


def _compose_train(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS / "train"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_train_configs_are_specs_of_the_same_schema(clustered_store):
    """train.py's estimator group plus its index group is the spec an estimator set would hold; the documented
    overrides (estimator.k, index=...) keep working."""
    import train

    config = _compose_train(["experiment=ict_knn", "estimator.k=64", "estimator.n=8", "index=torch"])
    spec = train.estimator_spec(config)
    assert spec["name"] == "knn" and spec["k"] == 64 and spec["index"]["kind"] == "torch"
    from_train = build_estimator(spec, clustered_store)
    from_set = build_estimator_set({"knn": {"name": "knn", "k": 64, "n": 8, "index": {"kind": "torch"}}},
                                   clustered_store)["knn"]
    assert torch.equal(_estimate(from_train, clustered_store), _estimate(from_set, clustered_store))
    for name in ("single", "stf"):
        spec = train.estimator_spec(_compose_train([f"estimator={name}"]))
        assert build_estimator(spec, clustered_store).name == name


def test_a_run_folder_bound_before_the_factory_resumes(tmp_path):
    """Folders bound while the estimator and index groups carried Hydra's _target_ / _partial_ keys resume; any
    other change is still refused."""
    from knn_cm.runs.binding import RunFolder, RunFolderError

    config = OmegaConf.to_container(_compose_train(["experiment=quickstart"]), resolve=False)
    before = {**config, "estimator": {"_target_": "knn_cm.estimators.make_estimator", "_partial_": True,
                                      **config["estimator"]},
              "index": {"_target_": "knn_cm.index.build_index", "_partial_": True, **config["index"]}}
    folder = RunFolder(tmp_path)
    folder.write_binding(folder.check_binding(before, "fingerprint"))
    assert folder.check_binding(config, "fingerprint") is None  # nothing changed
    changed = {**config, "estimator": {**config["estimator"], "k": 7}}
    with pytest.raises(RunFolderError, match=r"estimator.k: 256 \(run\) -> 7"):
        folder.check_binding(changed, "fingerprint")
