"""Estimators built on the exact posterior over the whole dataset: ``exact`` (Eq. 8) and ``mc`` (Eq. 9)."""

from __future__ import annotations

import torch

from knn_cm.estimators.base import Estimator
from knn_cm.estimators.distances import exact_log_likelihoods
from knn_cm.estimators.draws import combine_duplicates, sample_categorical
from knn_cm.estimators.registry import register_estimator
from knn_cm.estimators.snis import normalised_weights, weighted_mean, weights_times_rows
from knn_cm.settings import positive_int

# Bytes allowed for one [B_chunk, N] block of log-weights; queries are processed in chunks below it.
_LOGITS_BUDGET = 256 << 20


def _query_chunks(batch: int, size: int, dtype: torch.dtype):
    per_query = size * torch.finfo(dtype).bits // 8
    step = max(1, _LOGITS_BUDGET // per_query)
    return [(start, min(start + step, batch)) for start in range(0, batch, step)]


@register_estimator("exact")
class ExactPosterior(Estimator):
    """mu = sum_i p(x_i | z) x_i over all N elements (Eq. 8).

    Two matrix products per query chunk: GEMM distances ([B, d] x [d, N]), refined where float
    rounding could matter (see ``distances.refine_sq_dists``), log-space softmax, then weights
    times data ([B, N] x [N, d]).
    """


    def posterior_mean(self, z, sigma, x, generator):
        out = torch.empty_like(z)
        for start, stop in _query_chunks(z.shape[0], self.rows.size, self.dtype):
            log_weights = exact_log_likelihoods(z[start:stop], sigma[start:stop], self.rows,
                                                  fixed_shapes=self.sync_free)
            out[start:stop] = weights_times_rows(normalised_weights(log_weights), self.rows)
        return out

    def log_posterior(self, z: torch.Tensor, sigma) -> torch.Tensor:
        """log p(x_i | z) [B, N] for z [B, C, H, W] and sigma [B] (normalised over the dataset)."""
        z_flat, sigma, _ = self._validate(z, sigma, None)
        with torch.no_grad():
            log_likelihoods = exact_log_likelihoods(z_flat, sigma, self.rows, fixed_shapes=self.sync_free)
            return torch.log_softmax(log_likelihoods, dim=1)


@register_estimator("mc")
class PosteriorMC(Estimator):
    """Posterior Monte Carlo: the mean of n draws from p(x_i | z) (Eq. 9); unbiased, variance / n.

    Needs the exact posterior (a pass over the data), so it is a reference, not a fast estimator.
    """


    def __init__(self, store, n: int = 256, **kwargs):
        super().__init__(store, **kwargs)
        self.n = positive_int(n, "n")

    def posterior_mean(self, z, sigma, x, generator):
        return self.repeated_posterior_mean(z, sigma, x, 1, generator)[0]

    def repeated_posterior_mean(self, z, sigma, x, repeats, generator):
        out = torch.empty(repeats, *z.shape, dtype=z.dtype, device=z.device)
        for start, stop in _query_chunks(z.shape[0], self.rows.size, self.dtype):
            # One pass over the data per query chunk serves every repeat.
            log_posterior = exact_log_likelihoods(z[start:stop], sigma[start:stop], self.rows,
                                                  fixed_shapes=self.sync_free)
            for repeat in range(repeats):
                draws = sample_categorical(log_posterior, self.n, generator)
                indices, log_counts = combine_duplicates(draws, torch.zeros_like(draws, dtype=self.dtype))
                out[repeat, start:stop] = weighted_mean(self.rows, indices, log_counts, fixed_shapes=self.sync_free)
        return out
