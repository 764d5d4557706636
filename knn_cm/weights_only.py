"""Reading ``torch.save`` files without running code from them.

:func:`load_weights_only` accepts only torch's zip archive format and unpickles it with
``torch.load(weights_only=True)`` (tensors, dtypes and plain containers; any other global is refused
before it is called). Every failure is an :class:`UnreadableTorchFile` whose ``reason`` says what the
file is (empty, text, a PNG image, a raw pickle, truncated, or holding objects that could run code)
instead of torch's advice to load it with ``weights_only=False``.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

ZIP_MAGIC = b"PK\x03\x04"
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+)")


class UnreadableTorchFile(ValueError):
    """A file that is not a torch zip archive of tensors and plain containers; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def describe_head(head: bytes) -> str:
    """What a file that is not a torch zip archive looks like, from its first bytes."""
    if not head:
        return "the file is empty"
    if head.startswith(b"\x89PNG"):
        return "it is a PNG image"
    if head[:1] == b"\x80":
        return ("it is a raw Python pickle, which can run code when loaded and is never read here "
                "(an EDM network pickle is converted once with scripts/convert_edm_checkpoint.py --trust-pickle)")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return f"it is a text file starting {text[:24]!r}"
    return f"it is not a torch zip archive (first bytes {head[:8].hex(' ')})"


def load_weights_only(source: str | os.PathLike | bytes, map_location="cpu"):
    """``torch.load(source, weights_only=True)`` of a torch zip archive (a path or its bytes).

    Raises:
        UnreadableTorchFile: the bytes are not a torch zip archive, are truncated or corrupt, or hold
            objects other than tensors and plain containers (refused: unpickling them could run code).
        FileNotFoundError / PermissionError: the file cannot be opened.
    """
    if isinstance(source, (bytes, bytearray)):
        head = bytes(source[:16])
        stream = io.BytesIO(source)
    else:
        with open(Path(source), "rb") as handle:
            head = handle.read(16)
        stream = Path(source)
    if not head.startswith(ZIP_MAGIC):
        raise UnreadableTorchFile(describe_head(head))
    try:
        return torch.load(stream, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = _UNSAFE_GLOBAL.search(str(error))
        what = f"e.g. {found.group(1)}" if found else str(error).splitlines()[0][:120]
        raise UnreadableTorchFile(f"it holds objects other than tensors and plain containers ({what}); "
                                  f"unpickling them could run code, so they are refused") from None
    except (RuntimeError, EOFError, ValueError, KeyError, AttributeError, TypeError, IndexError,
            zipfile.BadZipFile, UnicodeDecodeError) as error:
        first_line = (str(error).splitlines() or [type(error).__name__])[0][:160]
        raise UnreadableTorchFile(f"it is a truncated or corrupt torch archive ({first_line})") from None
