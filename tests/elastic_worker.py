"""torchrun's entry point in tests/e2e/test_elastic.py: train.py, with rank 1 of a restarted worker group late.

On a busy machine the ranks of a restarted group reach the process group seconds apart; the delay makes that
spread certain, so a restart must work whichever rank comes first (``KNN_CM_TEST_RESTART_DELAY`` seconds).
"""

import os
import sys
import time
from pathlib import Path

if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and os.environ.get("RANK") == "1":
    time.sleep(float(os.environ.get("KNN_CM_TEST_RESTART_DELAY", "0")))
train = str(Path(__file__).resolve().parents[1] / "train.py")
os.execv(sys.executable, [sys.executable, train, *sys.argv[1:]])
