"""knn_cm.cli's messages: an error's detail lines (at most a screenful) and the closest real keys of an unknown one."""

from __future__ import annotations

import io

from knn_cm.cli import SCREEN, closest_keys, details, report
from knn_cm.runs.binding import RunFolderError

KEYS = ["trainer.optimizer.lr", "trainer.lr_decay", "trainer.max_steps", "estimator.k", "estimator.n", "experiment"]


def test_an_error_of_ours_keeps_its_indented_lines_up_to_a_screenful():
    error = RunFolderError("first line:\n" + "\n".join(f"  key{i}: 1 (run) -> 2 (this launch)" for i in range(30))
                           + "\nUnindented prose that the hint says.")
    error.add_note("what to do")
    lines = details(error)
    assert len(lines) == SCREEN and lines[0] == "  key0: 1 (run) -> 2 (this launch)"
    assert lines[-1] == f"  ... and {30 - SCREEN + 1} more"
    stream = io.StringIO()
    report(error, stream)
    assert stream.getvalue().splitlines() == ["error: first line:", *lines, "hint: what to do"]


def test_other_errors_stay_one_line():
    assert details(ValueError("first\n  an indented line of a library's message")) == []


def test_the_closest_keys_share_the_last_part_or_its_spelling():
    assert closest_keys("trainer.lr", KEYS) == ["trainer.optimizer.lr"]
    assert closest_keys("trainer.max_step", KEYS) == ["trainer.max_steps"]
    assert closest_keys("experimnt", KEYS) == ["experiment"]
    assert closest_keys("foo", KEYS) == []
