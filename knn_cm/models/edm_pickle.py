"""Importing NVIDIA EDM's network pickles (``network-snapshot-*.pkl``) without importing or running EDM.

The result (:class:`EDMNetwork`) is written as a knn-cm network file by
:func:`knn_cm.models.network_file.save_state_dict` (``scripts/convert_edm_checkpoint.py``).

EDM network pickles (``network-snapshot-*.pkl``) are a dict whose key ``'ema'`` holds the EDMPrecond
module. EDM saves its modules with ``torch_utils.persistence``: each persistent object is pickled as a
call ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
``meta = {'type': 'class', 'version': 6, 'module_src': <source of the defining module>,
'class_name': ..., 'state': <the object's __dict__>}``; the original function executes ``module_src``.
``load_edm_pickle`` never imports EDM and never executes the embedded source: its unpickler maps
EDM's ``torch_utils`` / ``dnnlib`` / ``training`` globals onto inert stand-ins that keep the state,
allows only the torch / numpy / container globals that tensors and modules need, and reads the
parameters, buffers and constructor keyword arguments out of the captured states. Unpickling still
runs torch's tensor-rebuilding code, so it requires an explicit ``trust=True``.
"""

from __future__ import annotations

import inspect
import io
import math
import os
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from knn_cm.models.network_file import check_layout, to_plain
from knn_cm.models.song_unet import SongUNet

EDM_PERSISTENCE_VERSION = 6


class UntrustedPickleError(PermissionError):
    """Raised when asked to unpickle an EDM pickle without ``trust=True``."""


# ----------------------------------------------------------------------------------------------------
# Stand-ins for EDM's pickled globals.


class PersistentObjectStandIn:
    """What an EDM persistent object unpickles to here: its class name, state and (unexecuted) source.

    ``state`` is the object's ``__dict__`` as pickled (for a torch module: ``_parameters``, ``_buffers``,
    ``_modules``, plain attributes, and ``_init_args`` / ``_init_kwargs`` recorded by EDM).
    """

    def __init__(self, class_name: str, state: Mapping, module_src: str, version, object_type: str):
        self.class_name = class_name
        self.state = state
        self.module_src = module_src
        self.version = version
        self.object_type = object_type

    def __repr__(self) -> str:
        return f"PersistentObjectStandIn({self.class_name!r})"


def _reconstruct_persistent_obj_stand_in(meta: Mapping) -> PersistentObjectStandIn:
    """Replacement for ``torch_utils.persistence._reconstruct_persistent_obj``: keeps, never executes."""
    if not isinstance(meta, Mapping) or "class_name" not in meta or "state" not in meta:
        raise pickle.UnpicklingError("EDM persistent object without 'class_name' / 'state' metadata")
    object_type = meta.get("type", "class")
    if object_type != "class":
        raise pickle.UnpicklingError(f"EDM persistent object of type {object_type!r}; only 'class' is known")
    state = meta["state"] if meta["state"] is not None else {}
    return PersistentObjectStandIn(
        class_name=str(meta["class_name"]),
        state=state,
        module_src=meta.get("module_src", ""),
        version=meta.get("version"),
        object_type=object_type,
    )


class EasyDictStandIn(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


class ReferencedClassStandIn:
    """Base of stand-ins for EDM classes pickled by reference (not through persistence).

    Accepts any constructor arguments and ``__setstate__`` state and keeps them.
    """

    qualified_name = "<unknown>"

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.init_args = args
        self.init_kwargs = kwargs
        self.state = {}

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"ReferencedClassStandIn({self.qualified_name!r})"


def _safe_load_from_bytes(data: bytes):
    """Replacement for ``torch.storage._load_from_bytes``: reads the storage with ``weights_only=True``."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


_EDM_PACKAGES = ("torch_utils", "dnnlib", "training")
_SAFE_BUILTINS = {
    "set", "frozenset", "slice", "range", "complex", "bytearray", "bytes",
    "int", "float", "str", "list", "dict", "tuple", "bool", "object",
}  # fmt: skip
_NUMPY_NAMES = {"_reconstruct", "scalar", "ndarray", "dtype"}


class _EDMUnpickler(pickle.Unpickler):
    """Unpickler that maps EDM globals to stand-ins and refuses globals outside a small allow-list."""

    def __init__(self, file):
        super().__init__(file)
        self._stand_in_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "torch_utils.persistence" and name == "_reconstruct_persistent_obj":
            return _reconstruct_persistent_obj_stand_in
        if module.split(".")[0] in ("dnnlib",) and name == "EasyDict":
            return EasyDictStandIn
        if module.split(".")[0] in _EDM_PACKAGES:
            qualified = f"{module}.{name}"
            if qualified not in self._stand_in_classes:
                self._stand_in_classes[qualified] = type(name, (ReferencedClassStandIn,), {"qualified_name": qualified})
            return self._stand_in_classes[qualified]
        if module == "torch.storage" and name == "_load_from_bytes":
            return _safe_load_from_bytes
        if self._allowed(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: an EDM network pickle needs only EDM's own classes "
            "(replaced by stand-ins) and torch / numpy / container types"
        )

    @staticmethod
    def _allowed(module: str, name: str) -> bool:
        if module == "builtins":
            return name in _SAFE_BUILTINS
        if module == "collections":
            return name in ("OrderedDict", "defaultdict")
        if module == "copyreg":
            return name == "_reconstructor"
        if module == "_codecs":
            return name == "encode"
        if module == "torch":
            value = getattr(torch, name, None)
            is_type_tag = isinstance(value, (torch.dtype, torch.device)) or name in ("Size", "device")
            return is_type_tag or name.endswith("Storage")
        if module == "torch._utils":
            return name.startswith("_rebuild_")
        if module == "torch._tensor":
            return name == "_rebuild_from_type_v2"
        if module == "torch.nn.parameter":
            return name in ("Parameter", "Buffer")
        if module.startswith("torch.nn.modules."):
            try:
                value = getattr(__import__(module, fromlist=[name]), name)
            except (ImportError, AttributeError):
                return False
            return isinstance(value, type) and issubclass(value, nn.Module)
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
            return name in _NUMPY_NAMES
        if module == "numpy.dtypes":
            return True
        return False


# ----------------------------------------------------------------------------------------------------
# Reading modules out of the unpickled tree.


def _object_state(node) -> Mapping | None:
    if isinstance(node, PersistentObjectStandIn):
        return node.state
    if isinstance(node, ReferencedClassStandIn):
        return node.state if isinstance(node.state, Mapping) else None
    if isinstance(node, nn.Module):
        return vars(node)
    return None


def _class_name(node) -> str:
    if isinstance(node, PersistentObjectStandIn):
        return node.class_name
    if isinstance(node, ReferencedClassStandIn):
        return node.qualified_name.rsplit(".", 1)[-1]
    return type(node).__name__


def extract_state_dict(root) -> OrderedDict:
    """The ``state_dict`` of an unpickled module tree (stand-ins or torch modules), in torch's order.

    Within each module: its parameters, then its persistent buffers, then its submodules recursively.
    """
    entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def visit(node, prefix: str) -> None:
        state = _object_state(node)
        if state is None:
            raise ValueError(f"{prefix.rstrip('.') or 'the root object'} ({_class_name(node)}) is not a module")
        for name, parameter in (state.get("_parameters") or {}).items():
            if parameter is not None:
                entries[prefix + name] = parameter.detach().clone()
        non_persistent = state.get("_non_persistent_buffers_set") or set()
        for name, buffer in (state.get("_buffers") or {}).items():
            if buffer is not None and name not in non_persistent:
                entries[prefix + name] = buffer.detach().clone()
        for name, child in (state.get("_modules") or {}).items():
            if child is not None:
                visit(child, f"{prefix}{name}.")

    visit(root, "")
    return entries


def _songunet_parameters() -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(SongUNet.__init__).parameters)


def _recover_songunet_kwargs(precond_state: Mapping, model) -> dict:
    """SongUNet keyword arguments from the SongUNet's recorded ``_init_kwargs`` (else EDMPrecond's)."""
    parameters = _songunet_parameters()
    recorded = _object_state(model).get("_init_kwargs")
    if recorded is None:
        # EDMPrecond calls SongUNet(img_resolution, in_channels=img_channels, out_channels=img_channels,
        # label_dim, **model_kwargs) and records its own arguments.
        outer = precond_state.get("_init_kwargs")
        if outer is None:
            raise ValueError("the pickle records no constructor arguments (_init_kwargs) for the network")
        outer = dict(to_plain(outer, "ema._init_kwargs"))
        recorded = {key: value for key, value in outer.items() if key in parameters}
        if "img_channels" in outer:
            recorded.setdefault("in_channels", outer["img_channels"])
            recorded.setdefault("out_channels", outer["img_channels"])
    kwargs = dict(to_plain(recorded, "model._init_kwargs"))
    unknown = sorted(set(kwargs) - set(parameters) - {"self"})
    if unknown:
        raise ValueError(f"SongUNet arguments {unknown} in the pickle are not supported by knn_cm.models.SongUNet")
    for name, parameter in parameters.items():
        if name == "self" or name in kwargs:
            continue
        if parameter.default is inspect.Parameter.empty:
            raise ValueError(f"the pickle does not record the required SongUNet argument {name!r}")
        default = parameter.default
        kwargs[name] = list(default) if isinstance(default, tuple) else default
    return kwargs


def _recover_precond_kwargs(precond_class: str, precond_state: Mapping) -> dict:
    """sigma_data / sigma_min / sigma_max of an EDMPrecond (attributes, else init kwargs, else defaults)."""
    if precond_class != "EDMPrecond":
        return {}
    recorded = precond_state.get("_init_kwargs") or {}
    defaults = {"sigma_data": 0.5, "sigma_min": 0.0, "sigma_max": math.inf}
    kwargs = {}
    for name, default in defaults.items():
        value = precond_state.get(name, recorded.get(name, default))
        kwargs[name] = float(to_plain(value, f"ema.{name}"))
    return kwargs


def _precond_attributes(precond_state: Mapping) -> dict:
    """Public scalar attributes of the precond object (for the record; e.g. use_fp16, label_dim)."""
    attributes = {}
    for name, value in precond_state.items():
        if not name.startswith("_") and name != "training" and isinstance(value, (bool, int, float, str)):
            attributes[name] = value
    return attributes



@dataclass
class EDMNetwork:
    """What ``load_edm_pickle`` recovers from an EDM network pickle."""

    state_dict: OrderedDict
    songunet_kwargs: dict
    precond_class: str
    precond_kwargs: dict
    metadata: dict = field(default_factory=dict)


def load_edm_pickle(path: str | os.PathLike, trust: bool = False, key: str = "ema") -> EDMNetwork:
    """Read the network stored under ``key`` of an EDM network pickle without importing EDM.

    trust: must be True; unpickling an untrusted file can run code (see the module docstring).
    Returns the ``state_dict`` (keys ``model.*``), the SongUNet kwargs (recorded arguments with EDM's
    defaults filled in), and the precond class and kwargs. Raises ValueError when the network is not a
    SongUNet or its weights do not match the recovered arguments.
    """
    path = Path(path)
    if not trust:
        raise UntrustedPickleError(
            f"refusing to unpickle {path}: pickles can execute code when loaded. EDM network pickles are "
            "read through inert stand-ins, but only do so for files from a source you trust, and then pass "
            "trust=True (scripts/convert_edm_checkpoint.py: --trust-pickle)."
        )
    if not path.is_file():
        raise FileNotFoundError(f"EDM pickle {path} does not exist")
    with path.open("rb") as file:
        contents = _EDMUnpickler(file).load()
    if not isinstance(contents, Mapping) or key not in contents:
        keys = sorted(contents) if isinstance(contents, Mapping) else type(contents).__name__
        raise ValueError(f"{path} is not an EDM network pickle with key {key!r} (found {keys})")
    precond = contents[key]
    precond_state = _object_state(precond)
    if precond_state is None:
        raise ValueError(f"{path}[{key!r}] is a {type(precond).__name__}, not a network")
    precond_class = _class_name(precond)
    model = (precond_state.get("_modules") or {}).get("model")
    if model is None:
        raise ValueError(f"{path}[{key!r}] ({precond_class}) has no 'model' submodule")
    model_class = _class_name(model)
    if model_class != "SongUNet":
        raise ValueError(f"{path}: the network is a {model_class}; only SongUNet (DDPM++ / NCSN++) is supported")
    if isinstance(precond, PersistentObjectStandIn) and precond.version not in (None, EDM_PERSISTENCE_VERSION):
        raise ValueError(f"{path}: persistence version {precond.version}; expected {EDM_PERSISTENCE_VERSION}")

    state_dict = extract_state_dict(precond)
    songunet_kwargs = _recover_songunet_kwargs(precond_state, model)
    check_layout(state_dict, songunet_kwargs)
    metadata = {"source": str(path), "edm_precond_attributes": _precond_attributes(precond_state)}
    recorded = precond_state.get("_init_kwargs")
    if recorded is not None:
        metadata["edm_precond_init_kwargs"] = to_plain(recorded, "ema._init_kwargs")
    return EDMNetwork(
        state_dict=state_dict,
        songunet_kwargs=songunet_kwargs,
        precond_class=precond_class,
        precond_kwargs=_recover_precond_kwargs(precond_class, precond_state),
        metadata=metadata,
    )
