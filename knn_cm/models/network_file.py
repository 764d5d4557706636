"""The project's own network file: plain data that ``torch.load(weights_only=True)`` reads without running code.

A network file (``.pt``: training snapshots ``snapshots/network-*.pt``, ``scripts/convert_edm_checkpoint.py``
output) is a ``torch.save`` zip archive of::

    {'format': 'knn_cm.network.v1', 'state_dict': OrderedDict(name -> tensor),
     'network_class': 'SongUNet', 'songunet_kwargs': {...},
     'precond_class': 'EDMPrecond' | 'CMPrecond' | 'FMPrecond', 'precond_kwargs': {...}, 'metadata': {...}}

It is written durably (temporary file, fsync, rename). Reading never runs code from the file: only a torch
zip archive is accepted, it is unpickled with ``weights_only=True``, and every entry is checked (names and
shapes against ``SongUNet(**songunet_kwargs)``, the precond class against an allow-list, its arguments
against the class's signature). Anything else raises :class:`NotANetworkFileError`
("not a knn-cm network file: PATH (reason)").
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from knn_cm.io import atomic_path
from knn_cm.models.precond import CMPrecond, EDMPrecond, FMPrecond
from knn_cm.models.song_unet import SongUNet
from knn_cm.weights_only import UnreadableTorchFile, load_weights_only

NETWORK_FILE_FORMAT = "knn_cm.network.v1"
PRECOND_CLASSES = {"EDMPrecond": EDMPrecond, "CMPrecond": CMPrecond, "FMPrecond": FMPrecond}
_ENTRIES = ("state_dict", "network_class", "songunet_kwargs", "precond_class", "precond_kwargs")


class NotANetworkFileError(ValueError):
    """A path given as a network file that is not one (its message names the path and the reason)."""

    def __init__(self, path, reason: str):
        super().__init__(f"not a knn-cm network file: {path} ({reason}); expected a {NETWORK_FILE_FORMAT} file "
                         f"(a training run's snapshots/network-*.pt, a run folder, or the output of "
                         f"scripts/convert_edm_checkpoint.py)")
        self.path = path
        self.reason = reason


def to_plain(value, where: str):
    """Plain Python (dict / list / str / int / float / bool / None) copy of a recovered value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): to_plain(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if type(value).__module__.split(".")[0] == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    raise ValueError(f"{where} holds a {type(value).__name__}, which is not a plain value")



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




def _atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the target directory, fsync, rename (no torn files)."""
    with atomic_path(path) as temporary:
        torch.save(obj, temporary)


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
    songunet_kwargs = to_plain(dict(songunet_kwargs), "songunet_kwargs")
    check_layout(state_dict, songunet_kwargs)
    payload = {
        "format": NETWORK_FILE_FORMAT,
        "state_dict": OrderedDict((name, tensor.detach().cpu()) for name, tensor in state_dict.items()),
        "network_class": "SongUNet",
        "songunet_kwargs": songunet_kwargs,
        "precond_class": precond_class,
        "precond_kwargs": to_plain(dict(precond_kwargs or {}), "precond_kwargs"),
        "metadata": to_plain(dict(metadata or {}), "metadata"),
    }
    _atomic_torch_save(payload, path)
    return path


def save_network(path: str | os.PathLike, denoiser: EDMPrecond | CMPrecond | FMPrecond,
                 metadata: Mapping | None = None) -> Path:
    """Save a precond-wrapped SongUNet (weights, architecture and precond arguments) atomically."""
    if not isinstance(denoiser, tuple(PRECOND_CLASSES.values())) or not isinstance(denoiser.model, SongUNet):
        raise ValueError(
            f"save_network expects EDMPrecond, CMPrecond or FMPrecond around a SongUNet, got {type(denoiser).__name__}"
        )
    return save_state_dict(
        path,
        denoiser.state_dict(),
        songunet_kwargs=denoiser.model.init_kwargs,
        precond_class=type(denoiser).__name__,
        precond_kwargs=denoiser.precond_kwargs,
        metadata=metadata,
    )


def _check_payload(payload) -> str | None:
    """Why ``payload`` (a weights-only unpickled object) is not a network file, or None when it is one."""
    if not isinstance(payload, Mapping):
        return f"it holds a {type(payload).__name__}, not a network file's dict"
    if payload.get("format") != NETWORK_FILE_FORMAT:
        keys = sorted(str(key) for key in payload)[:8]
        return f"format {payload.get('format')!r} instead of {NETWORK_FILE_FORMAT!r}; its keys: {keys}"
    missing = [key for key in _ENTRIES if key not in payload]
    if missing:
        return f"entries {missing} are missing"
    state_dict = payload["state_dict"]
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in state_dict.items()):
        return "state_dict is not a mapping of names to tensors"
    if payload["network_class"] != "SongUNet":
        return f"network_class {payload['network_class']!r}; only 'SongUNet' is supported"
    precond_class = payload["precond_class"]
    if precond_class not in PRECOND_CLASSES:
        return f"precond_class {precond_class!r}; allowed: {', '.join(PRECOND_CLASSES)}"
    for key in ("songunet_kwargs", "precond_kwargs"):
        if not isinstance(payload[key], Mapping) or not all(isinstance(name, str) for name in payload[key]):
            return f"{key} is not a mapping of argument names"
    if not isinstance(payload.get("metadata", {}), Mapping):
        return "metadata is not a mapping"
    precond_parameters = inspect.signature(PRECOND_CLASSES[precond_class].__init__).parameters
    allowed = set(precond_parameters) - {"self", "model", "amp_dtype"}
    unknown = sorted(set(payload["precond_kwargs"]) - allowed)
    if unknown:
        return f"precond_kwargs {unknown} are not {precond_class} arguments (allowed: {sorted(allowed)})"
    parameters = set(inspect.signature(SongUNet.__init__).parameters) - {"self"}
    unknown = sorted(set(payload["songunet_kwargs"]) - parameters)
    if unknown:
        return f"songunet_kwargs {unknown} are not SongUNet arguments"
    try:
        check_layout(state_dict, payload["songunet_kwargs"])
    except (ValueError, TypeError) as error:
        return str(error).splitlines()[0][:300]
    return None


def load_network_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A network file's entries, read with ``torch.load(weights_only=True)`` and checked.

    The returned dict also holds ``"digest"``: the blake2b digest of the file's bytes (the same bytes
    that were loaded), which identifies the snapshot's content (evaluations are keyed by it).

    Raises:
        FileNotFoundError: ``path`` does not exist or is a folder.
        NotANetworkFileError: anything else than a network file (text, empty, an image, a raw pickle,
            a truncated archive, objects that could run code, another torch file, a wrong layout).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"network file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    data = path.read_bytes()
    try:
        payload = load_weights_only(data, map_location=map_location)
    except UnreadableTorchFile as error:
        raise NotANetworkFileError(path, error.reason) from None
    reason = _check_payload(payload)
    if reason is not None:
        raise NotANetworkFileError(path, reason)
    payload = dict(payload)
    payload.setdefault("metadata", {})
    payload["digest"] = hashlib.blake2b(data, digest_size=16).hexdigest()
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
                         amp_dtype: torch.dtype | str | None = None,
                         source: str = "network file") -> EDMPrecond | CMPrecond:
    """The denoiser of an already read network file (:func:`load_network_file`), in eval mode."""
    reason = _check_payload(payload)
    if reason is not None:
        raise NotANetworkFileError(source, reason)
    precond_class = payload["precond_class"]
    with torch.device("meta"):
        model = SongUNet(**payload["songunet_kwargs"])
        denoiser = PRECOND_CLASSES[precond_class](model, amp_dtype=amp_dtype, **payload["precond_kwargs"])
    denoiser.load_state_dict(payload["state_dict"], strict=True, assign=True)
    return denoiser.to(map_location).eval()


def check_network_shape(payload: dict, path: str | os.PathLike, store, taken_from: str) -> None:
    """Refuse a network whose images differ from the dataset's ``store.shape`` (C, H, W), before any sampling;
    ``taken_from`` says where the dataset was named (the command line's ``dataset``, a run folder, a file)."""
    kwargs = payload["songunet_kwargs"]
    if "in_channels" not in kwargs or "img_resolution" not in kwargs:
        return
    shape = (int(kwargs["in_channels"]), int(kwargs["img_resolution"]), int(kwargs["img_resolution"]))
    if tuple(store.shape) != shape:
        error = ValueError(f"network {path} makes images of shape {list(shape)} but the dataset {store.name!r} "
                           f"({taken_from}) holds {list(store.shape)}")
        error.add_note("name the dataset the network was trained on, e.g. dataset=cifar10")
        raise error
