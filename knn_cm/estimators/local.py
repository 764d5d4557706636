"""Local empirical denoisers: ``ls``, ``els``, ``pspc_square`` and ``cfdm`` (docs/denoisers.md).

Each is a filtered posterior mean (:mod:`knn_cm.estimators.filtered`) with its own queries, bank and combiner,
read from the FACTS.md definitions (Kamb & Ganguli ICML 2025; Niedoba et al. ICML 2025; FPMC 2026; Scarvelis
et al. TMLR 2025):

- ``ls`` (local score): pixel u = the posterior mean of pixel u over the store's images, with the likelihood of
  the ``patch_size`` window around u only (truncated at the border);
- ``els`` (equivariant local score): the bank is every window at every location of every image; the query is
  z's window around u (``padding="circular"``, or ``"zero"``: a pixel j from an edge meets only windows j from
  that edge, interior pixels only interior windows); pixel u = the weighted mean of the windows' centres;
- ``pspc_square``: every ``patch_size`` crop position where the crop fits; each crop's posterior mean over the
  images' crops at that position; a pixel = the mean over the crops that cover it;
- ``cfdm`` (smoothed closed-form): the exact posterior mean averaged over ``draws`` jittered queries
  z + ``smoothing`` eps'.

All take ``k`` and ``n`` for the KNN form (exhaustive when both are None) and, except ``cfdm``, ``window``
("square", or "gaussian": the soft precision exp(-|t|^2 / (2 window_std^2)) over the same support) and a
``patch_size`` that is an int or a sigma -> size table (:class:`~knn_cm.estimators.patches.PatchSchedule`).
They read sigma on the host, so a call synchronises a GPU once (no sync-free path).
"""

from __future__ import annotations

import dataclasses
import numbers

import torch

from knn_cm.estimators.base import Estimator
from knn_cm.estimators.filtered import FilteredPosterior, Group, Layout
from knn_cm.estimators.patches import PADDINGS, PatchSchedule, make_window, window_map
from knn_cm.estimators.registry import register_estimator
from knn_cm.search.bank_index import BankIndexSpec
from knn_cm.settings import non_negative_int, positive_int


class FilteredEstimator(Estimator):
    """Base of the local denoisers: the KNN or exhaustive form of a :class:`Layout` per patch size.

    Args:
        store: the dataset (x-flipped elements, when the store has them, are sources too).
        k, n: the KNN form's neighbours per query and uniform tail draws (both None: the exhaustive form).
        chunk_elements: store elements per streamed chunk of the exhaustive form (default: by a memory budget;
            the result does not depend on it up to float rounding).
        search: how the KNN form finds its k candidates: ``"auto"`` (a bank index for banks of more than 2^18
            sources, else an exact scan), ``"exact"``, an index kind (``"ivf"``, ``"ivf_sq8"``), or a mapping of
            :class:`~knn_cm.search.bank_index.BankIndexSpec` settings (``kind``, ``cells``, ``nprobe``,
            ``train_size``, ``seed``, ``cache``, ``cache_folder``). The index is built per bank (patch size) on
            first use and cached on disk.
    """

    def __init__(self, store, k: int | None = None, n: int | None = None, chunk_elements: int | None = None,
                 search="auto", **kwargs):
        super().__init__(store, **kwargs)
        if (k is None) != (n is None):
            raise ValueError(f"give both k and n for the KNN form of {self.name!r}, or neither for the exhaustive "
                             f"form; got k={k!r}, n={n!r}")
        self.k = None if k is None else positive_int(k, "k")
        self.n = None if n is None else non_negative_int(n, "n")
        self.chunk_elements = None if chunk_elements is None else positive_int(chunk_elements, "chunk_elements")
        self.search = search if search in ("auto", "exact") else BankIndexSpec.from_setting(
            dict(search) if hasattr(search, "keys") else search)
        self._layouts: dict[int, Layout] = {}
        self._filtered: FilteredPosterior | None = None

    @property
    def form(self) -> str:
        """``"knn"`` or ``"exhaustive"``."""
        return "exhaustive" if self.k is None else "knn"

    def filtered(self) -> FilteredPosterior:
        """The two forms over this estimator's rows (one instance: it keeps the KNN form's banks)."""
        if self._filtered is None:
            self._filtered = FilteredPosterior(self.rows, self.store.shape, self.chunk_elements, self.search)
        return self._filtered

    def layout_for(self, size: int) -> Layout:
        if size not in self._layouts:
            self._layouts[size] = dataclasses.replace(self.build_layout(size), label=f"{self.name}-p{size}")
        return self._layouts[size]

    def build_layout(self, size: int) -> Layout:
        raise NotImplementedError

    def mean_at(self, z: torch.Tensor, sigma: torch.Tensor, layout: Layout,
                generator: torch.Generator | None) -> torch.Tensor:
        """One layout's estimate for z [B, d], sigma [B]: [B, d]."""
        if self.k is None:
            return self.filtered().exhaustive(z, sigma, layout)
        return self.filtered().knn(z, sigma, layout, self.k, self.n, generator)


class PatchEstimator(FilteredEstimator):
    """A local denoiser whose patch size may follow sigma (``patch_size``: an int or a sigma -> size table)."""

    centred = True

    def __init__(self, store, patch_size=3, window: str = "square", window_std: float | None = None, **kwargs):
        super().__init__(store, **kwargs)
        self.schedule = PatchSchedule(patch_size)
        self.window = window
        self.window_std = window_std
        for size in set(self.schedule.sizes):  # refuse a bad size or window now, not at the first call
            self.layout_for(size)

    def _window(self, size: int):
        return make_window(size, size, centred=self.centred, kind=self.window, window_std=self.window_std)

    def posterior_mean(self, z, sigma, x, generator):
        sizes = self.schedule.sizes_for(sigma)
        if len(set(sizes)) == 1:
            return self.mean_at(z, sigma, self.layout_for(sizes[0]), generator)
        out = torch.empty_like(z)
        for size in sorted(set(sizes)):
            chosen = torch.tensor([i for i, s in enumerate(sizes) if s == size], device=z.device)
            out[chosen] = self.mean_at(z[chosen], sigma[chosen], self.layout_for(size), generator)
        return out


def _all_pixels(height: int, width: int) -> torch.Tensor:
    return torch.arange(height * width)


@register_estimator("ls")
class LocalScore(PatchEstimator):
    """``ls``: pixel u from the posterior over the store's images with the likelihood of the window around u
    (zero padding: the window truncated at the border), the same location in every image (Kamb & Ganguli)."""


    def build_layout(self, size: int) -> Layout:
        _, height, width = self.store.shape
        window = self._window(size)
        wmap = window_map(height, width, _all_pixels(height, width), window, "zero", self.dtype, self.device)
        return Layout([Group(wmap, wmap, paired=True)], "centre", window.centre)


@register_estimator("els")
class EquivariantLocalScore(PatchEstimator):
    """``els``: the bank is every window at every location of every image; pixel u = the posterior-weighted
    mean of the windows' centre pixels given z's window at u (Kamb & Ganguli).

    ``padding="circular"`` wraps windows around the image (one bank of N H W windows); ``"zero"`` is the
    boundary-aware variant for zero-padded networks: per axis, a pixel j < r or j >= size - r from the start
    (r = patch_size // 2) meets only windows anchored at that same coordinate, an interior pixel only interior
    windows, so corners meet only the same corner.
    """


    def __init__(self, store, patch_size=3, padding: str = "circular", **kwargs):
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        self.padding = padding
        super().__init__(store, patch_size=patch_size, **kwargs)

    def build_layout(self, size: int) -> Layout:
        _, height, width = self.store.shape
        window = self._window(size)
        pixels = _all_pixels(height, width)
        if self.padding == "circular":
            wmap = window_map(height, width, pixels, window, "circular", self.dtype, self.device)
            return Layout([Group(wmap, wmap, paired=False)], "centre", window.centre)
        radius = size // 2
        axis_class = lambda coordinate, extent: torch.where(
            (coordinate < radius) | (coordinate >= extent - radius), coordinate, torch.full_like(coordinate, -1))
        classes = axis_class(pixels // width, height) * (width + 1) + axis_class(pixels % width, width)
        groups = []
        for value in torch.unique(classes).tolist():
            anchors = pixels[classes == value]
            wmap = window_map(height, width, anchors, window, "zero", self.dtype, self.device)
            groups.append(Group(wmap, wmap, paired=False))
        return Layout(groups, "centre", window.centre)


@register_estimator("pspc_square")
class PSPCSquare(PatchEstimator):
    """``pspc_square``: each ``patch_size`` crop position where the crop fits (no padding) has the posterior mean
    over the images' crops at that position; a pixel is the uniform mean over the crops covering it (Niedoba et
    al., ICML 2025). A size above the image's height or width is cut to it (a size at least both is the whole
    image: the exact posterior mean)."""

    centred = False

    def build_layout(self, size: int) -> Layout:
        _, height, width = self.store.shape
        crop_height, crop_width = min(size, height), min(size, width)
        window = make_window(crop_height, crop_width, centred=False, kind=self.window, window_std=self.window_std)
        top, left = torch.meshgrid(torch.arange(height - crop_height + 1), torch.arange(width - crop_width + 1),
                                   indexing="ij")
        anchors = (top * width + left).reshape(-1)
        wmap = window_map(height, width, anchors, window, "zero", self.dtype, self.device)
        return Layout([Group(wmap, wmap, paired=True)], "window")


@register_estimator("cfdm")
class ClosedFormSmoothed(FilteredEstimator):
    """``cfdm``: the empirical posterior mean averaged over jittered queries (Scarvelis et al., TMLR 2025),

        x_hat(z) = (1 / draws) sum_j PM_1(z + smoothing eps'_j; D, sigma),  eps'_j ~ N(0, I),

    eps' drawn with the call's generator as one tensor [draws, B, C, H, W]. ``smoothing`` 0 is the exact
    posterior mean (Eq. 8). The KNN form is the k nearest images plus n uniform draws of the rest, weighted
    (N - k) / n: the estimator Scarvelis et al. use.
    """


    def __init__(self, store, smoothing: float = 0.1, draws: int = 8, **kwargs):
        super().__init__(store, **kwargs)
        if not isinstance(smoothing, numbers.Real) or isinstance(smoothing, bool) or not smoothing >= 0:
            raise ValueError(f"smoothing must be a number >= 0 (the jitter's scale in data units), got {smoothing!r}")
        self.smoothing = float(smoothing)
        self.draws = positive_int(draws, "draws")

    def build_layout(self, size: int) -> Layout:
        _, height, width = self.store.shape
        window = make_window(height, width, centred=False)
        wmap = window_map(height, width, torch.zeros(1, dtype=torch.int64), window, "zero", self.dtype, self.device)
        return Layout([Group(wmap, wmap, paired=True)], "window")

    def posterior_mean(self, z, sigma, x, generator):
        jitter = torch.randn((self.draws, *z.shape), generator=generator, dtype=z.dtype, device=z.device)
        queries = (z.unsqueeze(0) + self.smoothing * jitter).reshape(-1, z.shape[1])
        estimates = self.mean_at(queries, sigma.repeat(self.draws), self.layout_for(0), generator)
        return estimates.view(self.draws, *z.shape).mean(0)
