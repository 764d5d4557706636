"""The filtered posterior mean: the building block of the local (generalising) empirical denoisers.

For a precision lambda over a window's pixels and a bank S of source windows (FACTS.md, "Generalising
empirical denoisers"; FPMC 2026):

    PM_lambda(q; S, sigma) = sum_{s in S} softmax_s(-sum_t lambda_t ||q_t - s_t||^2 / (2 sigma^2)) r(s)

with q the window of z at an anchor and r(s) the source's response (its centre pixel for LS / ELS, the whole
window for PSPC). Dropping the per-query constant ||q||^2 leaves log-weights (2 q.s - ||s||^2) / (2 sigma^2)
over windows scaled by sqrt(lambda). Two forms, one result up to their error:

- exhaustive (:meth:`FilteredPosterior.exhaustive`): the bank is streamed a chunk of store elements at a time
  with a running log-sum-exp (max, sum of weights, weighted sum of responses, rescaled when the max grows), so
  the result does not depend on how the bank is cut into chunks (up to float rounding);
- KNN (:meth:`FilteredPosterior.knn`): Algorithm 1 over the bank with its neighbour stratum summed instead of
  sampled: k candidate neighbours per query enter with their likelihoods, and the tail of Eq. 13's proposal
  (the M - k' others, k' the candidates found) is estimated by n uniform draws from it, each weighted by
  (M - k') / n, i.e. 1 / q within the tail; all k' + n weights use exact distances of the gathered windows and
  are self-normalised (Eq. 11). The candidates come from an exact scan
  (:func:`knn_cm.search.torch_index.chunked_topk`, one per anchor for paired groups) or from the layout's
  cached bank index (:mod:`knn_cm.search.bank_index`: one approximate search for every group and anchor at
  once). Either way the tail covers every source the candidates miss, so the estimate is consistent as n grows
  for any candidates; exact candidates with k >= M give the exhaustive form.

A :class:`Layout` says which queries meet which bank (:class:`Group`) and how the responses become pixels.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from knn_cm.data.resident import ResidentRows
from knn_cm.estimators.distances import gemm_is_accurate
from knn_cm.estimators.draws import uniform_outside
from knn_cm.estimators.patches import LayoutBank, PatchBank, WindowMap, gather_windows, windows_of
from knn_cm.search.bank_index import BankIndex, BankIndexSpec, build_bank_index
from knn_cm.search.torch_index import chunked_topk

# Values allowed in one block of log-weights [B, Q, sources] (times the window size where differences
# are formed directly): bounds the exhaustive form's temporary memory.
LOGITS_BUDGET = 1 << 24
RESPONSES = ("centre", "window")
# search="auto" builds a bank index for layouts with more sources than this (below, an exact scan costs less).
AUTO_INDEX_SOURCES = 1 << 18


@dataclass(frozen=True)
class Group:
    """Queries matched against one bank.

    Attributes:
        query: the windows of z that form the queries, at Q anchors.
        bank: the windows of every store element that form the bank, at L anchors.
        paired: query j meets only the windows at bank anchor j (LS, PSPC: the same location in every image;
            then ``bank`` is ``query``); otherwise every query meets every bank window (ELS).
    """

    query: WindowMap
    bank: WindowMap
    paired: bool


@dataclass(frozen=True)
class Layout:
    """One denoiser at one patch size: its groups, and how a source's response becomes pixels.

    Attributes:
        groups: the groups; together their query windows cover the image.
        response: ``"centre"`` (a source answers its window's centre pixel [C], placed at the query's anchor:
            every pixel is the anchor of exactly one query) or ``"window"`` (the whole window [C * T], averaged
            at each pixel over the query windows that cover it).
        centre: index of the window's centre offset (``"centre"`` responses).
        label: a readable name of the layout (estimator and patch size), part of its bank index's cache key.
    """

    groups: list[Group]
    response: str
    centre: int | None = None
    label: str = "layout"

    def geometry_key(self) -> str:
        """``label`` plus a digest of every group's windows (offsets, validity, precision) and pairing: equal keys
        mean equal banks over equal data."""
        digest = hashlib.sha1(self.response.encode())
        for group in self.groups:
            digest.update(b"paired" if group.paired else b"shared")
            for tensor in (group.bank.pixels, group.bank.valid, group.bank.scale.float()):  # any compute dtype
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return f"{self.label}-{digest.hexdigest()[:16]}"


class FilteredPosterior:
    """Both forms of the filtered posterior mean over one store's resident rows, for images of ``shape``."""

    def __init__(self, rows: ResidentRows, shape: tuple[int, int, int], chunk_elements: int | None = None,
                 search: str | BankIndexSpec = "exact"):
        """``search``: how the KNN form finds candidates: ``"exact"`` (a scan), a :class:`BankIndexSpec` (the
        layout's bank index), or ``"auto"`` (a default bank index for layouts of more than
        :data:`AUTO_INDEX_SOURCES` sources, else the scan)."""
        self.rows = rows
        self.channels, self.height, self.width = shape
        self.chunk_elements = chunk_elements
        self.search_setting = search
        self._banks: dict[tuple[int, int], PatchBank] = {}  # kept across calls: their norms cost a pass to build
        self._indexes: dict[int, tuple[LayoutBank, BankIndex] | None] = {}  # by id(layout), built once

    def bank(self, group: Group, anchor: int | None = None) -> PatchBank:
        """The searchable bank of ``group`` (of its anchor ``anchor`` alone for paired groups), built once."""
        key = (id(group.bank), -1 if anchor is None else anchor)
        if key not in self._banks:
            wmap = group.bank if anchor is None else group.bank.select(slice(anchor, anchor + 1))
            self._banks[key] = PatchBank(self.rows, wmap, self.channels)
        return self._banks[key]

    # ------------------------------------------------------------------------------------------ shared
    def query_windows(self, z: torch.Tensor, group: Group) -> torch.Tensor:
        """Scaled query vectors [B, Q, C * T] of z [B, d]."""
        windows = windows_of(z.view(z.shape[0], self.channels, -1), group.query)
        return (windows * group.query.scale.unsqueeze(1)).reshape(z.shape[0], group.query.anchors, -1)

    def responses(self, windows: torch.Tensor, layout: Layout) -> torch.Tensor:
        """Responses [..., R] of unscaled windows [..., C, T]."""
        if layout.response == "centre":
            return windows[..., layout.centre]
        return windows.flatten(-2)

    def assemble(self, results: list[torch.Tensor], layout: Layout, batch: int) -> torch.Tensor:
        """Pixels [B, d] from each group's responses [B, Q, R] (the layout's combiner)."""
        out = torch.zeros(batch, self.channels, self.height * self.width, dtype=results[0].dtype,
                          device=results[0].device)
        if layout.response == "centre":
            for group, result in zip(layout.groups, results):
                anchors = group.query.pixels[:, layout.centre]
                out[:, :, anchors] = result.transpose(1, 2)
            return out.reshape(batch, -1)
        coverage = torch.zeros(self.height * self.width, dtype=out.dtype, device=out.device)
        for group, result in zip(layout.groups, results):
            valid = group.query.valid.reshape(-1)
            pixels = group.query.pixels.reshape(-1)[valid]
            values = result.view(batch, -1, self.channels, group.query.pixels.shape[1]).transpose(1, 2)
            out.index_add_(2, pixels, values.reshape(batch, self.channels, -1)[:, :, valid])
            coverage.index_add_(0, pixels, torch.ones_like(pixels, dtype=out.dtype))
        return (out / coverage).reshape(batch, -1)

    # ------------------------------------------------------------------------------------- exhaustive
    def exhaustive(self, z: torch.Tensor, sigma: torch.Tensor, layout: Layout) -> torch.Tensor:
        """PM over every source of every group's bank, streamed: z [B, d], sigma [B] -> [B, d]."""
        results = [self._exhaustive_group(self.query_windows(z, group), sigma, group, layout)
                   for group in layout.groups]
        return self.assemble(results, layout, z.shape[0])

    def _direct(self, queries: torch.Tensor, sigma: torch.Tensor, group: Group) -> bool:
        """Whether GEMM log-weights could be off by more than the library's tolerance (small sigma): then
        distances are formed from direct differences (``knn_cm.estimators.distances``)."""
        max_source_sq = float(group.bank.scale.square().sum(1).max()) * self.channels  # pixel values in [-1, 1]
        query_sq = queries.square().sum(-1).amax(dim=1)
        return not bool(gemm_is_accurate(query_sq, sigma, max_source_sq).all())

    def _exhaustive_group(self, queries: torch.Tensor, sigma: torch.Tensor, group: Group,
                          layout: Layout) -> torch.Tensor:
        batch, count, dim = queries.shape
        anchors = group.bank.anchors
        two_var = (2.0 * sigma.square()).view(-1, 1, 1)
        direct = self._direct(queries, sigma, group)
        per_element = batch * count * (1 if group.paired else anchors) * (dim if direct else 1)
        step = self.chunk_elements or max(1, LOGITS_BUDGET // per_element)
        best = torch.full((batch, count), -math.inf, dtype=queries.dtype, device=queries.device)
        total = torch.zeros(batch, count, dtype=queries.dtype, device=queries.device)
        weighted = None
        doubled = queries * (2.0 / two_var)  # the cross term's factor, applied once to the queries
        for _, images in self.rows.chunks(step):
            size = images.shape[0]
            windows = windows_of(images.view(size, self.channels, -1), group.bank)  # [n, L, C, T]
            sources = (windows * group.bank.scale.unsqueeze(1)).reshape(size, anchors, dim)
            responses = self.responses(windows, layout)  # [n, L, R]
            if group.paired:  # query j against every element's window at anchor j: [B, Q, n]
                if direct:
                    sq = (queries.unsqueeze(2) - sources.transpose(0, 1).unsqueeze(0)).square().sum(-1)
                    logits = sq.div_(-two_var)
                else:
                    dots = torch.bmm(doubled.transpose(0, 1), sources.permute(1, 2, 0)).transpose(0, 1)  # [B, Q, n]
                    logits = dots.sub_(sources.square().sum(-1).T.unsqueeze(0) / two_var)
            else:  # every query against all n * L windows: [B, Q, n * L]
                sources = sources.reshape(size * anchors, dim)
                responses = responses.reshape(size * anchors, -1)
                if direct:
                    sq = (queries.unsqueeze(2) - sources.view(1, 1, *sources.shape)).square().sum(-1)
                    logits = sq.div_(-two_var)
                else:
                    logits = torch.baddbmm(sources.square().sum(-1).view(1, 1, -1) / -two_var, doubled,
                                           sources.T.unsqueeze(0).expand(batch, -1, -1))
            # The running log-sum-exp: rescale what was summed so far when the maximum grows.
            new_best = torch.maximum(best, logits.amax(dim=-1))
            rescale = torch.exp(best - new_best)
            weights = logits.sub_(new_best.unsqueeze(-1)).exp_()
            if group.paired:
                contribution = torch.bmm(weights.transpose(0, 1), responses.transpose(0, 1)).transpose(0, 1)
            else:
                contribution = weights @ responses.contiguous()
            total = total * rescale + weights.sum(-1)
            weighted = contribution if weighted is None else weighted * rescale.unsqueeze(-1) + contribution
            best = new_best
        return weighted / total.unsqueeze(-1)

    # -------------------------------------------------------------------------------------------- KNN
    def knn(self, z: torch.Tensor, sigma: torch.Tensor, layout: Layout, k: int, n: int,
            generator: torch.Generator | None) -> torch.Tensor:
        """The KNN form (the module docstring): z [B, d], sigma [B] -> [B, d]."""
        queries = [self.query_windows(z, group) for group in layout.groups]
        indexed = self.bank_index(layout)
        if indexed is None:
            found = [self.search(group_queries, group, k) for group_queries, group in zip(queries, layout.groups)]
        else:
            found = self.search_index(queries, layout, *indexed, k)
        results = [self._knn_group(group_queries, sigma, group, layout, n, generator, *candidates)
                   for group_queries, group, candidates in zip(queries, layout.groups, found)]
        return self.assemble(results, layout, z.shape[0])

    def bank_index(self, layout: Layout) -> tuple[LayoutBank, BankIndex] | None:
        """The layout's bank and its index (built or loaded on first use), or None when ``search`` scans."""
        key = id(layout)
        if key not in self._indexes:
            setting = self.search_setting
            bank = LayoutBank(self.rows, [group.bank for group in layout.groups],
                              [group.paired for group in layout.groups], self.channels, layout.geometry_key())
            if setting == "auto":
                setting = BankIndexSpec() if bank.size > AUTO_INDEX_SOURCES else "exact"
            self._indexes[key] = None if setting == "exact" else (bank, build_bank_index(bank, setting))
        return self._indexes[key]

    def search_index(self, queries: list[torch.Tensor], layout: Layout, bank: LayoutBank, index: BankIndex,
                     k: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Candidates of every group's queries [B, Q_g, C * T] from one search of the layout's bank index.

        Returns, per group, what :meth:`search` returns (ids -1 where the probed cells held fewer than k).
        """
        batch = queries[0].shape[0]
        flat = torch.cat([group_queries.reshape(-1, group_queries.shape[-1]) for group_queries in queries])
        buckets = torch.cat([bank.query_buckets(g, batch, group_queries.shape[1])
                             for g, group_queries in enumerate(queries)])
        _, ids = index.search(flat, buckets, min(k, bank.largest_bucket))
        out, start = [], 0
        for g, (group_queries, group) in enumerate(zip(queries, layout.groups)):
            count = group_queries.shape[1]
            found = ids[start : start + batch * count].to(group_queries.device)
            start += batch * count
            missing = found < 0
            local = (found - int(bank.source_offsets[g])).masked_fill(missing, 0)
            anchors = group.bank.anchors
            anchor_ids = local % anchors
            if group.paired:  # sources of the query's own anchor: the element is the id within its bank
                out.append((torch.where(missing, -1, local // anchors), anchor_ids, self.rows.size))
            else:
                out.append((local.masked_fill(missing, -1), anchor_ids, self.rows.size * anchors))
        return out

    def search(self, queries: torch.Tensor, group: Group, k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The k nearest bank sources of each query: source ids [B * Q, k], their anchor ids [B * Q, k], M.

        Paired groups search one bank per anchor (N sources each); shared groups one bank of N * L sources.
        """
        batch, count, dim = queries.shape
        elements = self.rows.size
        search_queries = queries.to(device=self.rows.device, dtype=torch.float32)
        if group.paired:
            k = min(k, elements)
            ids = torch.empty(batch, count, k, dtype=torch.int64, device=queries.device)
            for anchor in range(count):
                bank = self.bank(group, anchor)
                ids[:, anchor] = chunked_topk(search_queries[:, anchor], bank, k)[1].to(queries.device)
            anchor_ids = torch.arange(count, device=queries.device).view(1, -1, 1).expand(batch, count, k)
            return ids.reshape(batch * count, k), anchor_ids.reshape(batch * count, k), elements
        bank = self.bank(group)
        k = min(k, bank.size)
        ids = chunked_topk(search_queries.reshape(batch * count, dim), bank, k)[1].to(queries.device)
        return ids, ids % group.bank.anchors, bank.size

    def _knn_group(self, queries: torch.Tensor, sigma: torch.Tensor, group: Group, layout: Layout, n: int,
                   generator: torch.Generator | None, ids: torch.Tensor, anchor_ids: torch.Tensor,
                   bank_size: int) -> torch.Tensor:
        """The KNN form of one group from its candidates ``ids`` [B * Q, k] (-1: none; bank-local source ids,
        element ids for paired groups) at bank anchors ``anchor_ids`` [B * Q, k], in a bank of ``bank_size``."""
        batch, count, dim = queries.shape
        missing = ids < 0
        tail_size = bank_size - (~missing).sum(1)  # [B * Q]: the sources outside each query's candidates
        log_corrections = torch.zeros(ids.shape, dtype=queries.dtype, device=queries.device).masked_fill_(
            missing, -math.inf)
        sources_per_element = 1 if group.paired else group.bank.anchors
        if n > 0 and bool((tail_size > 0).any()):
            tail = uniform_outside(ids, tail_size, n, generator)
            tail_anchors = (torch.arange(count, device=ids.device).repeat(batch).unsqueeze(1).expand(-1, n)
                            if group.paired else tail % group.bank.anchors)
            ids = torch.cat([ids.clamp(min=0), tail], 1)
            anchor_ids = torch.cat([anchor_ids, tail_anchors], 1)
            tail_weight = (tail_size.to(queries.dtype) / n).log().unsqueeze(1).expand(-1, n)  # (M - k') / n
            log_corrections = torch.cat([log_corrections, tail_weight], 1)
        else:
            ids = ids.clamp(min=0)
        elements = ids // sources_per_element
        flat_queries = queries.reshape(batch * count, dim)
        two_var = (2.0 * sigma.square()).repeat_interleave(count)
        width = ids.shape[1]
        out = None
        step = max(1, LOGITS_BUDGET // (width * dim))
        for start in range(0, batch * count, step):
            stop = min(start + step, batch * count)
            windows = gather_windows(self.rows, elements[start:stop].reshape(-1), anchor_ids[start:stop].reshape(-1),
                                     group.bank, self.channels).to(queries.dtype)  # [m * width, C, T]
            scale = group.bank.scale[anchor_ids[start:stop].reshape(-1)].unsqueeze(1)
            sources = (windows * scale).reshape(stop - start, width, dim)
            sq = sources.sub_(flat_queries[start:stop].unsqueeze(1)).square_().sum(-1)  # direct differences
            weights = torch.softmax(-sq / two_var[start:stop].unsqueeze(1) + log_corrections[start:stop], dim=1)
            responses = self.responses(windows, layout).reshape(stop - start, width, -1)
            block = torch.bmm(weights.unsqueeze(1), responses).squeeze(1)
            if out is None:
                out = torch.empty(batch * count, block.shape[1], dtype=block.dtype, device=block.device)
            out[start:stop] = block
        return out.view(batch, count, -1)
