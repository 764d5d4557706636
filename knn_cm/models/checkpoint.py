"""Network files: EDM pickle import, atomic ``.pt`` save, and ``weights_only`` loading.

Our network file (``.pt``, written by ``save_state_dict`` / ``save_network``) is a plain dict that
``torch.load(path, weights_only=True)`` reads without executing code::

    {'format': 'knn_cm.network.v1', 'state_dict': OrderedDict(name -> tensor),
     'network_class': 'SongUNet', 'songunet_kwargs': {...},
     'precond_class': 'EDMPrecond' | 'CMPrecond', 'precond_kwargs': {...}, 'metadata': {...}}

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
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from knn_cm.models.precond import CMPrecond, EDMPrecond
from knn_cm.models.song_unet import SongUNet

NETWORK_FILE_FORMAT = "knn_cm.network.v1"
PRECOND_CLASSES = {"EDMPrecond": EDMPrecond, "CMPrecond": CMPrecond}
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


def _to_plain(value, where: str):
    """Plain Python (dict / list / str / int / float / bool / None) copy of a recovered value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _to_plain(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if type(value).__module__.split(".")[0] == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    raise ValueError(f"{where} holds a {type(value).__name__}, which is not a plain value")


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
        outer = dict(_to_plain(outer, "ema._init_kwargs"))
        recorded = {key: value for key, value in outer.items() if key in parameters}
        if "img_channels" in outer:
            recorded.setdefault("in_channels", outer["img_channels"])
            recorded.setdefault("out_channels", outer["img_channels"])
    kwargs = dict(_to_plain(recorded, "model._init_kwargs"))
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
        kwargs[name] = float(_to_plain(value, f"ema.{name}"))
    return kwargs


def _precond_attributes(precond_state: Mapping) -> dict:
    """Public scalar attributes of the precond object (for the record; e.g. use_fp16, label_dim)."""
    attributes = {}
    for name, value in precond_state.items():
        if not name.startswith("_") and name != "training" and isinstance(value, (bool, int, float, str)):
            attributes[name] = value
    return attributes


def check_layout(state_dict: Mapping[str, torch.Tensor], songunet_kwargs: Mapping, prefix: str = "model.") -> None:
    """Raise ValueError unless ``SongUNet(**songunet_kwargs)`` has exactly these names and shapes.

    The network is built on the meta device, so no memory is allocated for its weights.
    """
    with torch.device("meta"):
        reference = SongUNet(**songunet_kwargs).state_dict()
    expected = {prefix + name: tuple(tensor.shape) for name, tensor in reference.items()}
    found = {name: tuple(tensor.shape) for name, tensor in state_dict.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(name for name in set(expected) & set(found) if expected[name] != found[name])
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if mismatched:
            name = mismatched[0]
            details.append(f"{len(mismatched)} shape mismatches, e.g. {name}: {found[name]} vs {expected[name]}")
        raise ValueError("state dict does not match SongUNet(**songunet_kwargs): " + "; ".join(details))


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
        metadata["edm_precond_init_kwargs"] = _to_plain(recorded, "ema._init_kwargs")
    return EDMNetwork(
        state_dict=state_dict,
        songunet_kwargs=songunet_kwargs,
        precond_class=precond_class,
        precond_kwargs=_recover_precond_kwargs(precond_class, precond_state),
        metadata=metadata,
    )


# ----------------------------------------------------------------------------------------------------
# Our network files.


def _atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the target directory, then os.replace (no torn files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def save_state_dict(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    songunet_kwargs: Mapping,
    precond_class: str = "EDMPrecond",
    precond_kwargs: Mapping | None = None,
    metadata: Mapping | None = None,
) -> Path:
    """Write a network file (format in the module docstring) atomically; returns the path.

    state_dict: keys ``model.*`` (a precond wrapper's state dict), tensors are moved to the CPU.
    """
    path = Path(path)
    if precond_class not in PRECOND_CLASSES:
        raise ValueError(f"precond_class={precond_class!r} is not supported; allowed: {', '.join(PRECOND_CLASSES)}")
    songunet_kwargs = _to_plain(dict(songunet_kwargs), "songunet_kwargs")
    check_layout(state_dict, songunet_kwargs)
    payload = {
        "format": NETWORK_FILE_FORMAT,
        "state_dict": OrderedDict((name, tensor.detach().cpu()) for name, tensor in state_dict.items()),
        "network_class": "SongUNet",
        "songunet_kwargs": songunet_kwargs,
        "precond_class": precond_class,
        "precond_kwargs": _to_plain(dict(precond_kwargs or {}), "precond_kwargs"),
        "metadata": _to_plain(dict(metadata or {}), "metadata"),
    }
    _atomic_torch_save(payload, path)
    return path


def save_network(path: str | os.PathLike, denoiser: EDMPrecond | CMPrecond, metadata: Mapping | None = None) -> Path:
    """Save a precond-wrapped SongUNet (weights, architecture and precond arguments) atomically."""
    if not isinstance(denoiser, tuple(PRECOND_CLASSES.values())) or not isinstance(denoiser.model, SongUNet):
        raise ValueError(
            f"save_network expects EDMPrecond or CMPrecond around a SongUNet, got {type(denoiser).__name__}"
        )
    return save_state_dict(
        path,
        denoiser.state_dict(),
        songunet_kwargs=denoiser.model.init_kwargs,
        precond_class=type(denoiser).__name__,
        precond_kwargs=denoiser.precond_kwargs,
        metadata=metadata,
    )


def load_network_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a network file with ``torch.load(weights_only=True)`` and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"network file {path} does not exist")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != NETWORK_FILE_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a {NETWORK_FILE_FORMAT} network file (format: {found!r})")
    return payload


def load_network(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    amp_dtype: torch.dtype | str | None = None,
) -> EDMPrecond | CMPrecond:
    """Rebuild the denoiser saved in a network file (e.g. a converted EDM checkpoint), in eval mode.

    Builds ``PRECOND_CLASSES[precond_class](SongUNet(**songunet_kwargs), **precond_kwargs)`` and loads
    the weights strictly; reads the file with ``weights_only=True``.
    """
    return network_from_payload(load_network_file(path, map_location=map_location), map_location, amp_dtype,
                                source=str(path))


def network_from_payload(payload: dict, map_location: str | torch.device = "cpu",
                         amp_dtype: torch.dtype | str | None = None, source: str = "network file") -> EDMPrecond | CMPrecond:
    """The denoiser of an already read network file (:func:`load_network_file`), in eval mode."""
    precond_class = payload["precond_class"]
    if precond_class not in PRECOND_CLASSES:
        raise ValueError(
            f"{source}: precond class {precond_class!r} is not supported; allowed: {', '.join(PRECOND_CLASSES)}"
        )
    with torch.device("meta"):
        model = SongUNet(**payload["songunet_kwargs"])
        denoiser = PRECOND_CLASSES[precond_class](model, amp_dtype=amp_dtype, **payload["precond_kwargs"])
    denoiser.load_state_dict(payload["state_dict"], strict=True, assign=True)
    return denoiser.to(map_location).eval()
