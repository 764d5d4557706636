"""Patch geometry and patch banks: windows of the store's images, gathered on demand.

A *window* is T pixel offsets (dy, dx) around an anchor pixel, each with a precision weight lambda_t
(1 inside a square window; a Gaussian of the offset for the soft window, FPMC's relaxation). For a noisy
image z and an anchor u, the query is the window of z at u; a *bank* is the set of windows of every store
element at a set of anchors. Distances are precision-weighted: sum_t lambda_t ||z_{u+t} - x_{i,v+t}||^2 over
the channels, which is the squared L2 distance between the windows scaled by sqrt(lambda_t). Pixels outside
the image are wrapped (``padding="circular"``) or zero in both the query and the bank (``"zero"``: the
window is truncated, as a zero-padded convolution sees it).

No patch set is held: windows are read from the store's resident rows (:mod:`knn_cm.data.resident`) a chunk
of images at a time, or gathered per (element, anchor) for the few sources a KNN form touches; x-flipped
elements stay virtual (their pixels are read mirrored). :class:`PatchBank` presents one bank with the rows
interface that :func:`knn_cm.search.torch_index.chunked_topk` searches.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from knn_cm.data.resident import ResidentRows

PADDINGS = ("circular", "zero")
WINDOWS = ("square", "gaussian")


@dataclass(frozen=True)
class Window:
    """T pixel offsets with a precision weight each.

    Attributes:
        offsets: (dy, dx) of each window pixel relative to its anchor, int64 [T, 2], row-major.
        precision: lambda_t >= 0, float64 [T].
        centre: position of offset (0, 0) in ``offsets`` (None when the window does not hold its anchor).
    """

    offsets: torch.Tensor
    precision: torch.Tensor
    centre: int | None

    @property
    def size(self) -> int:
        return int(self.offsets.shape[0])


def make_window(height: int, width: int, centred: bool = True, kind: str = "square",
                window_std: float | None = None) -> Window:
    """A ``height`` x ``width`` window: centred on its anchor (odd sizes) or with the anchor at its top-left.

    ``kind="gaussian"`` weighs offset t by lambda_t = exp(-||t - c||^2 / (2 s^2)), c the window's centre and
    s = ``window_std`` (default max(height, width) / 4, so the window's edge lies about 2 s from its centre).
    """
    if kind not in WINDOWS:
        raise ValueError(f"window must be one of {', '.join(WINDOWS)}, got {kind!r}")
    if centred:
        if height % 2 == 0 or width % 2 == 0:
            raise ValueError(f"patch_size must be odd for a centred window, got {height}x{width}")
        rows = torch.arange(height) - height // 2
        cols = torch.arange(width) - width // 2
    else:
        rows, cols = torch.arange(height), torch.arange(width)
    dy, dx = torch.meshgrid(rows, cols, indexing="ij")
    offsets = torch.stack([dy.reshape(-1), dx.reshape(-1)], 1)
    if kind == "square":
        precision = torch.ones(offsets.shape[0], dtype=torch.float64)
    else:
        std = max(height, width) / 4 if window_std is None else window_std
        if not isinstance(std, numbers.Real) or isinstance(std, bool) or not std > 0 or not math.isfinite(std):
            raise ValueError(f"window_std must be a positive number of pixels, got {window_std!r}")
        centre = torch.tensor([(height - 1) / 2, (width - 1) / 2], dtype=torch.float64)
        if centred:
            centre = torch.zeros(2, dtype=torch.float64)
        precision = torch.exp(-(offsets.double() - centre).square().sum(1) / (2 * float(std) ** 2))
    at_anchor = ((offsets == 0).all(1)).nonzero()
    return Window(offsets, precision, int(at_anchor[0, 0]) if at_anchor.numel() else None)


@dataclass(frozen=True)
class WindowMap:
    """Where a window's pixels lie in a flattened H x W image, for L anchors.

    Attributes:
        pixels: flat pixel index (y * W + x) of each window pixel, int64 [L, T] (0 where ``valid`` is False).
        valid: bool [L, T], False for pixels outside the image under zero padding.
        scale: sqrt(lambda_t) where valid, else 0, [L, T] (the compute dtype): the factor that makes the
            precision-weighted distance a plain squared L2 distance.
    """

    pixels: torch.Tensor
    valid: torch.Tensor
    scale: torch.Tensor

    @property
    def anchors(self) -> int:
        return int(self.pixels.shape[0])

    def select(self, ids) -> WindowMap:
        """The map of the anchors ``ids`` (a slice or an index tensor) only."""
        return WindowMap(self.pixels[ids], self.valid[ids], self.scale[ids])


def window_map(height: int, width: int, anchors: torch.Tensor, window: Window, padding: str,
               dtype: torch.dtype, device: torch.device) -> WindowMap:
    """The :class:`WindowMap` of ``window`` at flat anchor pixels ``anchors`` [L] of an H x W image."""
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    y = (anchors // width).unsqueeze(1) + window.offsets[:, 0]
    x = (anchors % width).unsqueeze(1) + window.offsets[:, 1]
    if padding == "circular":
        y, x = y % height, x % width
        valid = torch.ones_like(y, dtype=torch.bool)
    else:
        valid = (y >= 0) & (y < height) & (x >= 0) & (x < width)
    pixels = torch.where(valid, y * width + x, torch.zeros_like(y))
    scale = torch.where(valid, window.precision.sqrt().unsqueeze(0), torch.zeros((), dtype=torch.float64))
    return WindowMap(pixels.to(device), valid.to(device), scale.to(device=device, dtype=dtype))


def windows_of(images: torch.Tensor, wmap: WindowMap) -> torch.Tensor:
    """The windows of images [n, C, H*W] at every anchor of ``wmap``, unscaled: [n, L, C, T] (0 outside).

    Row layout of a window vector (after reshape to [.., C * T]): channel-major, then the window's offsets.
    """
    values = images[:, :, wmap.pixels].permute(0, 2, 1, 3)  # [n, L, C, T]
    return values * wmap.valid.unsqueeze(0).unsqueeze(2).to(values.dtype)


def gather_windows(rows: ResidentRows, elements: torch.Tensor, anchor_ids: torch.Tensor, wmap: WindowMap,
                   channels: int) -> torch.Tensor:
    """Windows of single (element, anchor) pairs read straight from the resident rows: [K, C, T], unscaled.

    Args:
        elements: store element indices [K] (x-flipped ones, >= the number of stored images, read mirrored).
        anchor_ids: which anchor of ``wmap`` each window is taken at, [K].
    """
    index_dtype = torch.int32 if rows.rows.numel() < 2**31 else torch.int64  # int32: a cheaper gather
    device = rows.rows.device
    stored = elements.to(device=device, dtype=index_dtype)
    hw = rows.dim // channels
    channel_offsets = torch.arange(channels, device=device, dtype=index_dtype).view(1, -1, 1) * hw
    if rows.flip_shape is None:
        # Offsets of every anchor's window in a flat row [L, C * T], then one flat index into the stored rows.
        table = (channel_offsets + wmap.pixels.to(device=device, dtype=index_dtype).unsqueeze(1)).flatten(1)
        flat = table.index_select(0, anchor_ids.to(device)).add_((stored * rows.dim).unsqueeze(1))
    else:
        pixels = wmap.pixels[anchor_ids].to(device=device, dtype=index_dtype)  # [K, T]
        flipped = stored >= rows.base_size
        stored = torch.remainder(stored, rows.base_size)
        width = rows.flip_shape[2]
        # Pixel (y, x) of a mirrored image is pixel (y, W - 1 - x) of the stored one.
        mirrored = (pixels // width) * width + (width - 1 - pixels % width)
        pixels = torch.where(flipped.unsqueeze(1), mirrored, pixels)
        flat = ((stored * rows.dim).view(-1, 1, 1) + channel_offsets + pixels.unsqueeze(1)).flatten(1)
    raw = rows.rows.reshape(-1).index_select(0, flat.reshape(-1)).view(-1, channels, wmap.pixels.shape[1])
    values = raw.to(rows.dtype)
    if raw.dtype == torch.uint8:
        values = values.div_(127.5).sub_(1.0)  # the pixel convention of knn_cm.data.pixels.uint8_to_float
    values = values.to(elements.device)
    if bool(wmap.valid.all()):  # circular padding: nothing to zero
        return values
    return values * wmap.valid[anchor_ids].unsqueeze(1).to(values.dtype)


class PatchBank:
    """The bank of every store element's window at the anchors of ``wmap``: M = N * L sources, element-major
    (source s is element s // L at anchor s % L), each a vector [C * T] scaled by sqrt(lambda).

    It offers what :func:`knn_cm.search.torch_index.chunked_topk` reads of resident rows (``size``,
    ``device``, ``raw_range``, ``sq_norms``), so the library's exact search runs over it without the bank
    being held: only the squared norms (4 bytes per source in float32) are kept, computed on first use.
    """

    def __init__(self, rows: ResidentRows, wmap: WindowMap, channels: int, dtype: torch.dtype = torch.float32):
        self.source_rows = rows
        self.wmap = wmap
        self.channels = channels
        self.dtype = dtype
        self.anchors = wmap.anchors
        self.size = rows.size * self.anchors
        self.dim = channels * wmap.pixels.shape[1]
        self._sq_norms: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.source_rows.device

    def _elements(self, first: int, last: int) -> torch.Tensor:
        """Scaled windows of elements [first, last) at every anchor: [last - first, L, C * T]."""
        count = last - first
        elements = torch.arange(first, last, device=self.device).repeat_interleave(self.anchors)
        anchor_ids = torch.arange(self.anchors, device=self.device).repeat(count)
        windows = gather_windows(self.source_rows, elements, anchor_ids, self.wmap, self.channels)
        windows = windows * self.wmap.scale[anchor_ids].unsqueeze(1).to(windows.dtype)
        return windows.reshape(count, self.anchors, self.dim).to(self.dtype)

    def raw_range(self, start: int, stop: int) -> torch.Tensor:
        """Sources [start, stop) as rows [stop - start, C * T] in the bank's dtype."""
        first, last = start // self.anchors, (stop - 1) // self.anchors + 1
        flat = self._elements(first, last).reshape(-1, self.dim)
        offset = first * self.anchors
        return flat[start - offset : stop - offset]

    @property
    def sq_norms(self) -> torch.Tensor:
        """||s||^2 of every source, [M] (accumulated in float64)."""
        if self._sq_norms is None:
            norms = torch.empty(self.size, dtype=self.dtype, device=self.device)
            step = max(1, (1 << 22) // max(1, self.anchors * self.dim))
            for first in range(0, self.source_rows.size, step):
                last = min(first + step, self.source_rows.size)
                values = self._elements(first, last).to(torch.float64).square().sum(-1)
                norms[first * self.anchors : last * self.anchors] = values.reshape(-1).to(self.dtype)
            self._sq_norms = norms
        return self._sq_norms


class PatchSchedule:
    """``patch_size`` as an int or a table sigma -> size: the size whose sigma is nearest in log(sigma).

    Args:
        patch_size: an int (every sigma), a mapping {sigma: size}, or a list of [sigma, size] pairs
            (the form a YAML config gives, e.g. ``[[0.08, 3], [0.32, 5], [0.61, 7]]``).
        setting: the argument's name in errors.
    """

    def __init__(self, patch_size, setting: str = "patch_size"):
        if isinstance(patch_size, numbers.Integral) and not isinstance(patch_size, bool):
            entries = [(1.0, int(patch_size))]
            self.constant: int | None = int(patch_size)
        else:
            if isinstance(patch_size, Mapping):
                pairs = list(patch_size.items())
            elif isinstance(patch_size, Sequence) and not isinstance(patch_size, str):
                pairs = [tuple(pair) if isinstance(pair, Sequence) else (pair,) for pair in patch_size]
            else:
                raise ValueError(f"{setting} must be an integer or a table of [sigma, size] pairs, got {patch_size!r}")
            if not pairs or any(len(pair) != 2 for pair in pairs):
                raise ValueError(f"{setting} must be an integer or a non-empty table of [sigma, size] pairs, "
                                 f"got {patch_size!r}")
            entries = []
            for sigma, size in pairs:
                sigma = float(sigma) if isinstance(sigma, (numbers.Real, str)) else math.nan
                if not sigma > 0 or not math.isfinite(sigma):
                    raise ValueError(f"{setting}: every sigma of the table must be a positive number, "
                                     f"got {patch_size!r}")
                entries.append((sigma, size))
            self.constant = None
        for _, size in entries:
            if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
                raise ValueError(f"{setting} sizes must be integers >= 1, got {size!r}")
        entries.sort()
        self.sigmas = torch.tensor([sigma for sigma, _ in entries], dtype=torch.float64)
        self.sizes = [int(size) for _, size in entries]

    def __repr__(self) -> str:
        if self.constant is not None:
            return str(self.constant)
        return repr([[sigma, size] for sigma, size in zip(self.sigmas.tolist(), self.sizes)])

    def sizes_for(self, sigma: torch.Tensor) -> list[int]:
        """The patch size of each noise level in ``sigma`` [B] (read on the host)."""
        if self.constant is not None:
            return [self.constant] * int(sigma.numel())
        distance = (sigma.detach().to("cpu", torch.float64).reshape(-1, 1).log() - self.sigmas.log()).abs()
        return [self.sizes[i] for i in distance.argmin(dim=1).tolist()]


class LayoutBank:
    """The sources of several window groups as one bucketed bank (the :class:`knn_cm.search.bank_index.Bank`
    protocol), so that one index and one search call serve them all.

    Group g has L_g anchors and N * L_g sources, numbered element-major within the group (source e * L_g + a is
    element e at anchor a) and placed after the sources of groups 0..g-1. A *shared* group (ELS) is one bucket;
    a *paired* group (LS, PSPC) is one bucket per anchor. Vectors are windows scaled by sqrt(lambda): [C * T].

    Args:
        rows: the store's resident rows.
        maps: each group's bank :class:`WindowMap` (all with the same T).
        paired: whether each group is paired.
        channels: C.
        key: the bank's geometry (patch size, window, padding), part of its index's cache key.
    """

    def __init__(self, rows: ResidentRows, maps: Sequence[WindowMap], paired: Sequence[bool], channels: int,
                 key: str):
        self.rows = rows
        self.banks = [PatchBank(rows, wmap, channels, torch.float32) for wmap in maps]
        self.paired = list(paired)
        self.channels = channels
        self.fingerprint = rows.fingerprint
        self.dim = self.banks[0].dim
        if any(bank.dim != self.dim for bank in self.banks):
            raise ValueError("every group of a layout bank needs windows of one size")
        sizes = [bank.size for bank in self.banks]
        self.source_offsets = torch.tensor([0, *sizes]).cumsum(0)  # [G + 1]
        bucket_counts = [bank.anchors if pair else 1 for bank, pair in zip(self.banks, self.paired)]
        self.bucket_offsets = torch.tensor([0, *bucket_counts]).cumsum(0)  # [G + 1]
        self.size = int(self.source_offsets[-1])
        self.buckets = int(self.bucket_offsets[-1])
        self.largest_bucket = max(rows.size if pair else bank.size for bank, pair in zip(self.banks, self.paired))
        self.key = key

    def _split(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(group [m], source id within the group [m]) of global source ids [m]."""
        group = torch.searchsorted(self.source_offsets, ids, right=True) - 1
        return group, ids - self.source_offsets[group]

    def vectors(self, start: int, stop: int) -> torch.Tensor:
        """Sources [start, stop) as float32 [stop - start, C * T]."""
        parts = []
        for g, bank in enumerate(self.banks):
            first, last = int(self.source_offsets[g]), int(self.source_offsets[g + 1])
            if start < last and stop > first:
                parts.append(bank.raw_range(max(start, first) - first, min(stop, last) - first).cpu())
        return torch.cat(parts)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Sources ``ids`` [m] as float32 [m, C * T]."""
        out = torch.empty(ids.shape[0], self.dim, dtype=torch.float32)
        group, local = self._split(ids)
        for g, bank in enumerate(self.banks):
            chosen = (group == g).nonzero()[:, 0]
            if chosen.numel():
                anchors = local[chosen] % bank.anchors
                windows = gather_windows(self.rows, local[chosen] // bank.anchors, anchors, bank.wmap, self.channels)
                out[chosen] = (windows * bank.wmap.scale[anchors].unsqueeze(1)).reshape(-1, self.dim).float().cpu()
        return out

    def buckets_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The bucket of each source in ``ids`` [m]: int64 [m]."""
        group, local = self._split(ids)
        anchors = torch.tensor([bank.anchors for bank in self.banks])[group]
        paired = torch.tensor(self.paired)[group]
        return self.bucket_offsets[group] + torch.where(paired, local % anchors, torch.zeros_like(local))

    def query_buckets(self, group: int, batch: int, count: int) -> torch.Tensor:
        """The bucket of each of the batch * ``count`` queries of group ``group`` (batch-major, as the queries are
        flattened; query j of a paired group is at bank anchor j): int64 [batch * count]."""
        within = torch.arange(count) if self.paired[group] else torch.zeros(count, dtype=torch.int64)
        return (self.bucket_offsets[group] + within).repeat(batch)
