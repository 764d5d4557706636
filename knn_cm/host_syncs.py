"""Host synchronisations of a region of code, counted where torch dispatches operations.

A GPU runs ahead of the host until the host needs a value the GPU computes; then the host waits for the queue
to drain (a "sync"), and a training step with one such wait per kernel batch runs at the host's speed. What
makes the host wait, seen at the dispatcher (below Python and C++ callers alike):

- reading a device value: ``aten._local_scalar_dense`` (``.item()``, ``bool()``, ``int()``, ``float()``, ``if t:``,
  and reads inside C++);
- an output whose shape depends on device values: ``nonzero``, ``masked_select``, ``unique``, boolean-mask
  indexing and assignment, ``repeat_interleave`` without ``output_size``, ``bincount``, ``equal``;
- copies to the host (``.cpu()``, ``.tolist()``, ``.numpy()`` after it), and blocking copies from the host
  (``.to(device)`` without ``non_blocking=True``: a pageable copy waits for the stream first).

Tensors on the CPU are host tensors: reading them waits for nothing, so they are not counted.

On the ``meta`` device (shapes without values, a stand-in for CUDA on a machine without one) the counter also
keeps the program going: a read returns zero (``False``), a value-shaped output is empty, a copy to the host
is zeros. A branch taken on such a value is the zero branch. On a real device the operations run as they are.

    with HostSyncCounter() as syncs:
        trainer.train_step()
    assert syncs.count == 0, syncs.summary()
"""

from __future__ import annotations

import collections
import os
import sys
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operations whose output shape depends on the values of a device input (the host must read them first).
VALUE_SHAPED = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim",
                "bincount", "equal", "histc", "masked_scatter", "masked_scatter_"}
_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass(frozen=True)
class HostSync:
    """One operation that makes the host wait: what (``read``, ``value-shaped``, ``to-host``, ``blocking-copy``),
    the aten operation, and the innermost Python frame outside torch that asked for it ("file:line in function")."""

    kind: str
    operation: str
    where: str

    def __str__(self) -> str:
        return f"{self.kind} {self.operation} at {self.where}"


def _is_device(value) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type != "cpu"


def _caller() -> str:
    frame = sys._getframe(3)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_TORCH_DIR) and filename != __file__:
            return f"{os.path.basename(filename)}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _bool_indices(indices) -> bool:
    return any(isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8) and _is_device(index)
               for index in (indices or ()))


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode that records every :class:`HostSync` of the code run inside it (see the module docstring).

    Attributes:
        syncs: the recorded operations, in order.
    """

    def __init__(self):
        super().__init__()
        self.syncs: list[HostSync] = []

    @property
    def count(self) -> int:
        return len(self.syncs)

    def summary(self, since: int = 0) -> str:
        """One line per distinct sync since ``since``, with how often it happened."""
        counted = collections.Counter(str(sync) for sync in self.syncs[since:])
        return "\n".join(f"{count} x {what}" for what, count in counted.most_common()) or "none"

    def _record(self, kind: str, func) -> None:
        self.syncs.append(HostSync(kind, str(func.overloadpacket.__name__), _caller()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        first = args[0] if args else None
        on_meta = isinstance(first, torch.Tensor) and first.device.type == "meta"
        if func is aten._local_scalar_dense.default and _is_device(first):
            self._record("read", func)
            if on_meta:
                return False if first.dtype == torch.bool else (0.0 if first.is_floating_point() else 0)
        elif name in VALUE_SHAPED and _is_device(first):
            self._record("value-shaped", func)
            if on_meta:
                return _empty_result(func, args, kwargs)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1 and \
                _bool_indices(args[1]):
            self._record("value-shaped", func)
            if on_meta:
                return _without_bool_indices(func, args, kwargs)
        elif name == "repeat_interleave" and _is_device(first) and kwargs.get("output_size") is None and \
                first.dtype != torch.bool and len(args) == 1:
            self._record("value-shaped", func)
            if on_meta:
                return torch.empty((0,), dtype=first.dtype, device=first.device)
        elif name in ("_to_copy", "copy_"):
            source, target_device = (first, kwargs.get("device")) if name == "_to_copy" else (args[1], first.device)
            target_device = torch.device(target_device) if target_device is not None else source.device
            if _is_device(source) and target_device.type == "cpu":
                self._record("to-host", func)
                if source.device.type == "meta":
                    dtype = kwargs.get("dtype") or source.dtype
                    zeros = torch.zeros(source.shape, dtype=dtype)
                    return zeros if name == "_to_copy" else first.zero_()
            elif isinstance(source, torch.Tensor) and source.device.type == "cpu" and target_device.type != "cpu" \
                    and source.numel() > 0 and not kwargs.get("non_blocking", False) and \
                    not (len(args) > 2 and args[2]):
                self._record("blocking-copy", func)
        return func(*args, **kwargs)


def _empty_result(func, args, kwargs):
    """A value-shaped operation's output with nothing selected, on the meta device."""
    source = args[0]
    name = func.overloadpacket.__name__
    if name == "nonzero":
        return torch.empty((0, source.dim()), dtype=torch.long, device=source.device)
    if name == "equal":
        return False
    if name.startswith("masked_scatter"):
        return source if name.endswith("_") else source.clone()
    return torch.empty((0,), dtype=source.dtype, device=source.device)


def _without_bool_indices(func, args, kwargs):
    """Boolean-mask indexing on the meta device with every mask selecting nothing."""
    indices = [torch.empty((0,), dtype=torch.long, device=index.device)
               if isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8) else index
               for index in args[1]]
    if func.overloadpacket.__name__ == "index":
        return func(args[0], indices, *args[2:], **kwargs)
    values = args[2][:0] if isinstance(args[2], torch.Tensor) and args[2].dim() > 0 else args[2]
    return func(args[0], indices, values, *args[3:], **kwargs)
