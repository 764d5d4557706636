"""An iCT objective whose steps take at least a quarter second: a run longer than one short allocation on any
machine, so a time-limit test needs several allocations however fast the CPU is. Select it with
``trainer.objective._target_=tests.slow_objective.SlowICT``."""

from __future__ import annotations

import time

from knn_cm.training import ICTObjective

SECONDS_PER_STEP = 0.25


class SlowICT(ICTObjective):
    def __call__(self, *args, **kwargs):
        time.sleep(SECONDS_PER_STEP)
        return super().__call__(*args, **kwargs)
