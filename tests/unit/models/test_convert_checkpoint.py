"""EDM pickle conversion and our network files.

The synthetic pickles below are written the way EDM's ``torch_utils.persistence`` writes them: every
persistent module is pickled as ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
``meta = {'type': 'class', 'version': 6, 'module_src': ..., 'class_name': ..., 'state': __dict__}``
(plus the recorded ``_init_args`` / ``_init_kwargs``), torch containers such as ``ModuleDict`` are
pickled normally, and the top level is ``{'ema': ..., 'loss_fn': ..., 'augment_pipe': ...,
'dataset_kwargs': dnnlib.EasyDict(...)}``. The embedded source raises if it is ever executed.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from knn_cm.models import (
    CMPrecond,
    EDMPrecond,
    SongUNet,
    UntrustedPickleError,
    load_edm_pickle,
    load_network,
    save_network,
)

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "convert_edm_checkpoint.py"
NEVER_EXECUTE = "raise RuntimeError('embedded EDM source must never be executed')\n"
TINY_NCSNPP = dict(
    img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1, 2], channel_mult_emb=2,
    num_blocks=1, attn_resolutions=[4], dropout=0.13, embedding_type="fourier", channel_mult_noise=2,
    encoder_type="residual", resample_filter=[1, 3, 3, 1], augment_dim=9,
)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_script():
    spec = importlib.util.spec_from_file_location("convert_edm_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class EDMLoss:
    """Plays EDM's persistent EDMLoss (a plain object with three attributes)."""

    def __init__(self):
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5


@pytest.fixture
def edm_modules(monkeypatch):
    """Fake ``torch_utils.persistence`` and ``dnnlib.util`` so pickle can name EDM's globals."""
    torch_utils = types.ModuleType("torch_utils")
    persistence = types.ModuleType("torch_utils.persistence")
    dnnlib = types.ModuleType("dnnlib")
    dnnlib_util = types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("only named while pickling")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    torch_utils.persistence = persistence

    class EasyDict(dict):
        pass

    EasyDict.__module__ = "dnnlib.util"
    EasyDict.__qualname__ = "EasyDict"
    dnnlib_util.EasyDict = EasyDict
    dnnlib.util = dnnlib_util
    for name, module in [("torch_utils", torch_utils), ("torch_utils.persistence", persistence),
                         ("dnnlib", dnnlib), ("dnnlib.util", dnnlib_util)]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(reconstruct=_reconstruct_persistent_obj, EasyDict=EasyDict)


def write_edm_pickle(
    path: Path, ema: EDMPrecond, edm_modules, record_model_kwargs: bool = True, legacy_storage: bool = False
) -> None:
    """Pickle ``ema`` as EDM does; ``legacy_storage`` stores tensors like torch 1.x (pre-zip format)."""

    class EDMStylePickler(pickle.Pickler):
        def reducer_override(self, obj):
            if legacy_storage and isinstance(obj, torch.TypedStorage):
                buffer = io.BytesIO()
                torch.save(obj, buffer, _use_new_zipfile_serialization=False)
                return torch.storage._load_from_bytes, (buffer.getvalue(),)
            persistent = isinstance(obj, EDMLoss) or (
                isinstance(obj, nn.Module) and type(obj).__module__.startswith("knn_cm.models")
            )
            if not persistent:
                return NotImplemented
            state = dict(vars(obj))
            if isinstance(obj, SongUNet):
                kwargs = {k: v for k, v in obj.init_kwargs.items() if k != "fourier_scale"}
                state["_init_kwargs"] = kwargs if record_model_kwargs else None
            elif isinstance(obj, EDMPrecond):
                # EDMPrecond records img_channels and forwards the other SongUNet arguments.
                model_kwargs = dict(getattr(obj.model, "init_kwargs", {}))
                for key in ("fourier_scale", "out_channels"):
                    model_kwargs.pop(key, None)
                img_channels = model_kwargs.pop("in_channels", 3)
                recorded = dict(img_channels=img_channels, use_fp16=False, model_type="SongUNet", **model_kwargs)
                state["_init_kwargs"] = recorded
                state.update(use_fp16=False, img_channels=img_channels)
            else:
                state["_init_kwargs"] = {}
            state["_init_args"] = ()
            meta = dict(type="class", version=6, module_src=NEVER_EXECUTE, class_name=type(obj).__name__, state=state)
            return edm_modules.reconstruct, (meta,)

    contents = dict(
        ema=ema,
        loss_fn=EDMLoss(),
        augment_pipe=None,
        dataset_kwargs=edm_modules.EasyDict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip"),
    )
    with path.open("wb") as file:
        EDMStylePickler(file).dump(contents)


def make_ema(seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    ema = EDMPrecond(SongUNet(**TINY_NCSNPP)).eval()
    with torch.no_grad():
        for parameter in ema.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return ema


@pytest.mark.parametrize("record_model_kwargs, legacy_storage", [(True, False), (False, True)])
def test_converter_round_trips_edm_style_pickle(tmp_path, edm_modules, record_model_kwargs, legacy_storage):
    ema = make_ema()
    source, target = tmp_path / "network-snapshot.pkl", tmp_path / "converted.pt"
    write_edm_pickle(source, ema, edm_modules, record_model_kwargs=record_model_kwargs, legacy_storage=legacy_storage)

    assert load_script().main([str(source), str(target), "--trust-pickle"]) == 0

    payload = torch.load(target, weights_only=True)
    expected = ema.state_dict()
    assert list(payload["state_dict"]) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(payload["state_dict"][name], tensor), name
    assert payload["precond_class"] == "EDMPrecond"
    assert payload["precond_kwargs"] == {"sigma_data": 0.5, "sigma_min": 0.0, "sigma_max": float("inf")}
    for key, value in TINY_NCSNPP.items():
        assert payload["songunet_kwargs"][key] == value, key
    assert payload["metadata"]["edm_precond_attributes"]["use_fp16"] is False

    rebuilt = load_network(target)
    assert isinstance(rebuilt, EDMPrecond) and not rebuilt.training
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.05, 4.0])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, sigma), ema(x, sigma), atol=0, rtol=0)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_converter_refuses_untrusted_pickle(tmp_path, edm_modules, capsys):
    source, target = tmp_path / "network-snapshot.pkl", tmp_path / "converted.pt"
    write_edm_pickle(source, make_ema(), edm_modules)
    assert load_script().main([str(source), str(target)]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not target.exists()
    with pytest.raises(UntrustedPickleError, match="trust=True"):
        load_edm_pickle(source)


def test_help_explains_trust_flag(capsys):
    with pytest.raises(SystemExit):
        load_script().main(["--help"])
    assert "arbitrary code" in capsys.readouterr().out


class _Exploit:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_foreign_globals_are_refused_even_when_trusted(tmp_path):
    source = tmp_path / "evil.pkl"
    source.write_bytes(pickle.dumps({"ema": _Exploit()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        load_edm_pickle(source, trust=True)


def test_non_songunet_networks_are_rejected(tmp_path, edm_modules):
    source = tmp_path / "dhariwal.pkl"

    class DhariwalUNet(nn.Module):
        pass

    ema = make_ema()
    ema.model = DhariwalUNet()
    DhariwalUNet.__module__ = "knn_cm.models.fake"
    write_edm_pickle(source, ema, edm_modules)
    with pytest.raises(ValueError, match="DhariwalUNet"):
        load_edm_pickle(source, trust=True)


@pytest.mark.parametrize("precond", [EDMPrecond, CMPrecond])
def test_save_and_load_network(tmp_path, precond):
    torch.manual_seed(0)
    denoiser = precond(SongUNet(**dict(TINY_NCSNPP, fourier_scale=0.02)), sigma_min=0.002, sigma_max=80.0)
    path = save_network(tmp_path / "nested" / "net.pt", denoiser, metadata={"step": 3})
    payload = torch.load(path, weights_only=True)
    assert payload["metadata"] == {"step": 3}
    rebuilt = load_network(path)
    assert type(rebuilt) is precond and rebuilt.precond_kwargs == denoiser.precond_kwargs
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 3.0])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, sigma), denoiser.eval()(x, sigma), atol=0, rtol=0)


def test_load_network_rejects_foreign_files(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a knn-cm network file"):
        load_network(path)
