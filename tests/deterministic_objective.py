"""An iCT objective without random draws, for comparing training runs that split a batch differently.

The real objectives draw noise from each rank's own generator (seeded by rank), so two ranks and one process
see different noise by design. This loss, a fixed-sigma regression on the batch, differs only in how the
batch is split: select it with ``trainer.objective._target_=tests.deterministic_objective.DeterministicICT``.
"""

from __future__ import annotations

import torch

from knn_cm.training import ICTObjective


class DeterministicICT(ICTObjective):
    def __call__(self, net, x, step, random):
        sigma = torch.full((x.shape[0],), 0.5, device=x.device)
        return (net(x, sigma) - x).square().mean(), {}
