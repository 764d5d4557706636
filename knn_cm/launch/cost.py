"""What the paper's runs cost, in A100-node hours (one node = 8 A100 GPUs).

The paper's Table 4 gives the total hours on one A100 node of the three Table 1 runs. Everything else
(EDM runs, the Figure 4 runs at batch 512, evaluations, the t_switch sweep) is an estimate derived from
those three numbers, with its basis stated and ``estimate=True``:

- training: images seen (max_steps x batch_size) x the hours per million images of the Table 4 run with
  the same estimator (single -> iCT, stf -> iCT + STF, knn -> iCT + KNN). For EDM this is an upper bound
  (an iCT step also runs the teacher network forward).
- sampling (evaluations, Figure 5): network evaluations x the cost of one network forward pass per image
  implied by Table 4's iCT run (a training image costs about 4 forward passes: the student's forward and
  backward, about 3, and the teacher's forward), plus one forward-pass equivalent per sample for the
  Inception features. Estimator queries of hybrid sampling are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from knn_cm.paper import TABLE4

# Table 4 of the paper (knn_cm/paper.py): total hours on one A100 node of the Table 1 runs as configured there.
TABLE4_NODE_HOURS = {run.experiment: run.node_hours for run in TABLE4.runs}
TABLE4_MIMG = TABLE4.steps * TABLE4.batch_size / 1e6
TABLE4_RUN_OF_ESTIMATOR = {run.estimator: run.experiment for run in TABLE4.runs}
FORWARD_PASSES_PER_TRAINING_IMAGE = 4
# The baseline's run (single-sample estimator: iCT) sets the cost of one forward pass.
FORWARD_NODE_HOURS = (TABLE4_NODE_HOURS[TABLE4_RUN_OF_ESTIMATOR["single"]]
                      / (TABLE4_MIMG * 1e6 * FORWARD_PASSES_PER_TRAINING_IMAGE))


@dataclass(frozen=True)
class Cost:
    """A100-node hours, where the number comes from, and whether it is an estimate."""

    node_hours: float | None
    basis: str
    estimate: bool

    def __str__(self) -> str:
        if self.node_hours is None:
            return self.basis
        return f"{self.node_hours:.1f} ({'estimate: ' if self.estimate else ''}{self.basis})"


def training_cost(experiment: str, estimator: str, max_steps: int, batch_size: int) -> Cost:
    """The paper's number for the Table 1 runs as configured there, else scaled by images seen."""
    if estimator not in TABLE4_RUN_OF_ESTIMATOR:
        raise ValueError(f"no cost basis for estimator {estimator!r}; known: {', '.join(TABLE4_RUN_OF_ESTIMATOR)}")
    mimg = max_steps * batch_size / 1e6
    if experiment in TABLE4_NODE_HOURS and abs(mimg - TABLE4_MIMG) < 1e-9:
        return Cost(TABLE4_NODE_HOURS[experiment], "paper, Table 4", estimate=False)
    reference = TABLE4_RUN_OF_ESTIMATOR[estimator]
    rate = TABLE4_NODE_HOURS[reference] / TABLE4_MIMG
    return Cost(mimg * rate, f"{mimg:.1f} Mimg x Table 4's {reference} {rate:.3f} h/Mimg", estimate=True)


def sampling_cost(what: str, num_samples: int, network_evaluations: int, repeats: int) -> Cost:
    """``repeats`` x ``num_samples`` samples of ``network_evaluations`` forward passes each, plus Inception."""
    forwards = repeats * num_samples * (network_evaluations + 1)
    return Cost(forwards * FORWARD_NODE_HOURS,
                f"{what}: {repeats} x {num_samples} samples x ({network_evaluations} NFE + Inception) x "
                f"{FORWARD_NODE_HOURS * 3.6e6:.3f} node-ms per image forward pass (Table 4's iCT)", estimate=True)


def heun_evaluations(num_steps: int) -> int:
    """Network evaluations of EDM's Heun sampler with ``num_steps`` noise levels (18 -> 35)."""
    return 2 * num_steps - 1
