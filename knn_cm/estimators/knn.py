"""The nearest-neighbour score estimator (Algorithm 1; Algorithm 2 through ``knn_cm.diffusion``).

1. Search the index for the k nearest elements K of z (k most probable under the posterior).
2. Proposal (Eq. 13): q(x_i) = p(z | x_i) / Z_q for x_i in K, p(z | x_k) / Z_q for every other element,
   Z_q = sum_{i in K} p(z | x_i) + (N - k) p(z | x_k).
3. Draw n elements from q (a neighbour by its weight, or the tail: uniform over the N - k others).
4. Self-normalised weights w_i = p(z | x_i) / q(x_i) (Eq. 11), with p from exact distances of the
   drawn elements (the index's distances only shape the proposal); duplicates are combined.

Steps 1-2 are :meth:`KNN.proposal`, step 3 :meth:`KNN.draws`, step 4 :meth:`KNN.estimate_from_draws`; a call does
all four. ``knn_cm.estimators.reference`` writes the same algorithm plainly in float64;
tests/unit/estimators/test_reference.py checks this fast path against it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from knn_cm.estimators.base import Estimator
from knn_cm.estimators.distances import log_likelihood, sq_norms
from knn_cm.estimators.draws import combine_duplicates, sample_categorical, uniform_outside
from knn_cm.estimators.registry import register_estimator
from knn_cm.estimators.snis import snis_mean
from knn_cm.settings import positive_int

log = logging.getLogger(__name__)


@dataclass
class KNNProposal:
    """The proposal of Eq. 13 for a batch of queries.

    Attributes:
        indices: neighbour indices [B, k], nearest first (-1 where an approximate index found fewer).
        log_q_neighbours: log q(x_i) of each neighbour [B, k] (-inf for missing ones).
        log_q_tail: log q(x) of each single non-neighbour element [B] (-inf when k = N).
        tail_size: number of non-neighbour elements N - k [B].
        log_likelihood_neighbours: -d_i / (2 sigma^2) [B, k] up to a constant per query (unnormalised).
    """

    indices: torch.Tensor
    log_q_neighbours: torch.Tensor
    log_q_tail: torch.Tensor
    tail_size: torch.Tensor
    log_likelihood_neighbours: torch.Tensor


@register_estimator("knn")
class KNN(Estimator):
    """Nearest-neighbour SNIS estimator of E[x | z, sigma] (Algorithm 1).

    Args:
        store: the dataset D.
        index: a :class:`~knn_cm.search.Index` built from ``store`` (checked by fingerprint).
        k: neighbours searched (clamped to N; k = N makes the proposal equal the posterior).
        n: draws from the proposal.
        refine_proposal: recompute the k neighbours' distances exactly before building the proposal
            (costs a gather of k rows per query; the estimate is consistent without it because
            weights use exact distances, but the proposal then matches the posterior only up to the
            index's float32 rounding).
    """

    needs_index = True

    def __init__(self, store, index=None, k: int = 2048, n: int = 256, refine_proposal: bool = False, **kwargs):
        super().__init__(store, **kwargs)
        if index is None:
            raise ValueError("the 'knn' estimator needs an index: "
                             "make_estimator('knn', store, index=build_index(store))")
        index.check_data(store)
        self.index = index
        self.k = positive_int(k, "k")
        if self.k > len(store):  # said once here, where every app builds it (train.py records k = N beforehand)
            log.warning("k=%d exceeds the dataset size N=%d: the knn estimator searches all %d elements (k = N, "
                        "the exact posterior)", self.k, len(store), len(store))
            self.k = len(store)
        self.n = positive_int(n, "n")
        self.refine_proposal = bool(refine_proposal)

    def proposal(self, z: torch.Tensor, sigma) -> KNNProposal:
        """The proposal (Eq. 13) for z [B, C, H, W] and sigma [B], on the estimator's device."""
        z_flat, sigma, _ = self._validate(z, sigma, None)
        with self._computing():
            return self._proposal(z_flat, sigma)

    def _proposal(self, z: torch.Tensor, sigma: torch.Tensor) -> KNNProposal:
        sq_dists, indices = self.index.search(z, self.k)
        sq_dists = sq_dists.to(device=z.device, dtype=z.dtype)
        indices = indices.to(z.device)
        found = indices >= 0
        if self.refine_proposal:
            exact = self.rows.gather(indices.clamp(min=0).reshape(-1), fixed_shapes=self.sync_free)
            exact = exact.view(*indices.shape, -1)
            exact = exact.sub_(z.unsqueeze(1))
            sq_dists = torch.where(found, sq_norms(exact), sq_dists)
        log_lik = log_likelihood(sq_dists, sigma).masked_fill(~found, -math.inf)
        found_count = found.sum(dim=1)
        # The k-th neighbour's likelihood bounds every element outside K (nearest first: last found).
        log_lik_kth = log_lik.gather(1, (found_count - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        tail_size = self.rows.size - found_count
        log_tail_mass = torch.where(tail_size > 0, log_lik_kth + tail_size.to(z.dtype).log(),
                                    torch.full_like(log_lik_kth, -math.inf))
        log_z_q = torch.logaddexp(torch.logsumexp(log_lik, dim=1), log_tail_mass)
        log_q_tail = torch.where(tail_size > 0, log_lik_kth - log_z_q, torch.full_like(log_z_q, -math.inf))
        return KNNProposal(indices, log_lik - log_z_q.unsqueeze(1), log_q_tail, tail_size, log_lik)

    def posterior_mean(self, z, sigma, x, generator):
        return self._draw_estimate(z, sigma, self._proposal(z, sigma), generator)

    def repeated_posterior_mean(self, z, sigma, x, repeats, generator):
        proposal = self._proposal(z, sigma)  # one search serves every repeat
        return torch.stack([self._draw_estimate(z, sigma, proposal, generator) for _ in range(repeats)])

    def draws(self, z: torch.Tensor, sigma, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 3 for z [B, C, H, W]: n draws from the proposal, dataset indices [B, n] and their log q [B, n]."""
        z_flat, sigma, _ = self._validate(z, sigma, None)
        with self._computing():
            return self._draw(self._proposal(z_flat, sigma), generator)

    def estimate_from_draws(self, z: torch.Tensor, sigma, drawn: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """Step 4 for z [B, C, H, W] and given draws (as :meth:`draws` returns): the SNIS mean (Eq. 11), shape of z."""
        z_flat, sigma, _ = self._validate(z, sigma, None)
        with self._computing():
            x_hat = self._snis(z_flat, sigma, drawn.to(self.device), log_q.to(device=self.device, dtype=self.dtype))
        return x_hat.reshape(z.shape).to(device=z.device, dtype=z.dtype)

    def _draw_estimate(self, z: torch.Tensor, sigma: torch.Tensor, proposal: KNNProposal,
                       generator: torch.Generator | None) -> torch.Tensor:
        """Steps 3-4 of Algorithm 1 for a given proposal: n draws, exact weights, SNIS mean [B, d]."""
        return self._snis(z, sigma, *self._draw(proposal, generator))

    def _draw(self, proposal: KNNProposal, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws from q (Eq. 13): dataset indices [B, n] and log q of each [B, n]."""
        k_found = proposal.indices.shape[1]
        # Category k_found is "the tail": pick it with its total mass, then an element uniformly.
        log_tail_mass = proposal.log_q_tail + proposal.tail_size.to(proposal.log_q_tail.dtype).clamp(min=1).log()
        categories = sample_categorical(torch.cat([proposal.log_q_neighbours, log_tail_mass.unsqueeze(1)], 1),
                                        self.n, generator)
        from_tail = categories == k_found
        neighbour_pick = categories.clamp(max=k_found - 1)
        drawn = proposal.indices.gather(1, neighbour_pick)
        log_q = proposal.log_q_neighbours.gather(1, neighbour_pick)
        # Tail draws are made for every slot and used where the category was the tail: fixed shapes, no
        # branch on whether any slot drew the tail (that test would synchronise on a GPU).
        tail_draws = uniform_outside(proposal.indices, proposal.tail_size, self.n, generator)
        drawn = torch.where(from_tail, tail_draws, drawn)
        log_q = torch.where(from_tail, proposal.log_q_tail.unsqueeze(1), log_q)
        return drawn, log_q

    def _snis(self, z: torch.Tensor, sigma: torch.Tensor, drawn: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """Eq. 11 over the draws: log w = log p(z | x) - log q(x); snis_mean adds the exact log-likelihood."""
        indices, log_weights = combine_duplicates(drawn, -log_q)
        return snis_mean(z, sigma, self.rows, indices, log_weights, fixed_shapes=self.sync_free)
