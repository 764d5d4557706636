"""knn_cm.cli's output-folder handling: a job log moves beside the results and its folder goes."""

from __future__ import annotations

import logging

from knn_cm.cli import move_job_log


def test_move_job_log_appends_the_log_to_the_run_and_removes_the_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "outputs" / "evaluate" / "2026-12-03_21-00-00"
    folder.mkdir(parents=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "evaluate.log").write_text("an earlier evaluation\n")
    logger = logging.getLogger("test_move_job_log")
    handler = logging.FileHandler(folder / "evaluate.log")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.info("this evaluation")  # still buffered in nothing but the open handler's stream
    move_job_log(folder, run / "evaluate.log")
    assert (run / "evaluate.log").read_text() == "an earlier evaluation\nthis evaluation\n"
    assert handler not in logger.handlers and handler.stream is None  # closed: nothing more goes to the folder
    assert not (tmp_path / "outputs").exists()  # the folder and its empty parents, up to the working directory


def test_move_job_log_leaves_a_folder_holding_anything_else(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "evaluate.log").write_text("log\n")
    (folder / "tswitch.csv").write_text("results\n")
    move_job_log(folder, tmp_path / "evaluate.log")
    assert sorted(p.name for p in folder.iterdir()) == ["evaluate.log", "tswitch.csv"]
    assert not (tmp_path / "evaluate.log").exists()
