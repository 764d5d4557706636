"""The report's numbers from constructed run folders: which evaluation setting a best FID comes from, and
training hours from ``invocations.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knn_cm.report import comparable_evaluations, summarise_run
from knn_cm.runs.binding import invocation_seconds
from knn_cm.runs.layout import RunLayout


def _evaluation(seed_start: int, num_samples: int, step: int, fid: float, digest: str = "d0") -> dict:
    """One FID record; ``seed_start`` tells evaluation settings apart (each value is one setting), ``digest``
    the contents of a snapshot file retrained under the same name."""
    return {"network": f"network-{step:09d}.pt", "network_digest": digest, "step": step, "images_seen": step * 1024,
            "sampler": "onestep", "seed_start": seed_start, "num_samples": num_samples,
            "feature_extractor": "inception", "fid": fid}


def _run(folder: Path, evaluations: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("trainer:\n  max_steps: 400\n")
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 400, "seconds_per_step": 1.0}) + "\n")
    (folder / "evaluation.jsonl").write_text("".join(json.dumps(record) + "\n" for record in evaluations))
    return folder


# Each case: records in file order and the seed_start of the setting the report must take. Settings are
# built so that exactly one rule of the order (largest count, then most snapshots, then latest record)
# decides, and every other order of the rules (or a missing rule) picks another setting.
PREFERENCE_CASES = {
    # 50k samples of one snapshot (written first) beat 10k samples of three snapshots (written last).
    "largest count first": ([_evaluation(1, 50_000, 400, 4.0)]
                            + [_evaluation(2, 10_000, step, 3.0) for step in (200, 300, 400)], 1),
    # Same count: two snapshots (written first) beat one (written last).
    "then most snapshots": ([_evaluation(1, 50_000, step, 4.0) for step in (200, 400)]
                            + [_evaluation(2, 50_000, 400, 3.0)], 1),
    # Snapshots, not records: setting 1 (written last) has three records of two snapshots (step 400's file
    # evaluated again after it was retrained), setting 2 three snapshots.
    "snapshots, not records": ([_evaluation(2, 50_000, step, 4.0) for step in (200, 300, 400)]
                               + [_evaluation(1, 50_000, 200, 3.0), _evaluation(1, 50_000, 400, 3.0),
                                  _evaluation(1, 50_000, 400, 3.0, digest="d1")], 2),
    # Same count, same number of snapshots: the setting with the latest record wins, whatever its FID
    # (setting 2 starts after setting 1 and ends after it; setting 1's FIDs are lower).
    "then the latest record": ([_evaluation(1, 50_000, 200, 2.0), _evaluation(2, 50_000, 200, 5.0),
                                _evaluation(1, 50_000, 400, 2.5), _evaluation(2, 50_000, 400, 4.0)], 2),
}


@pytest.mark.parametrize("case", list(PREFERENCE_CASES))
def test_the_report_prefers_largest_count_then_most_snapshots_then_latest(tmp_path, case):
    records, chosen = PREFERENCE_CASES[case]
    folder = _run(tmp_path / "ict", records)
    group = comparable_evaluations(folder)
    assert {record["seed_start"] for record in group} == {chosen}
    assert len(group) == sum(record["seed_start"] == chosen for record in records), "the whole setting"
    row = summarise_run(folder)
    assert row["fid"] == min(record["fid"] for record in records if record["seed_start"] == chosen)


def test_training_hours_count_each_invocation_once_at_its_newest_line(tmp_path):
    """``invocations.jsonl`` holds a line per update of an invocation's wall-clock time, of which the newest
    counts, and a line cut short by a kill: invocations of 1.5 h and 0.4 h make 1.9 h (every line added
    would make 3.6 h)."""
    folder = _run(tmp_path / "ict", [_evaluation(1, 50_000, 400, 4.0)])
    lines = [{"id": "a", "seconds": 1800.0}, {"id": "a", "seconds": 3600.0}, {"id": "b", "seconds": 720.0},
             {"id": "a", "seconds": 5400.0}, {"id": "b", "seconds": 1440.0}]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"id": "c", "seco'  # a kill mid-line
    RunLayout(folder).invocations.write_text(text)
    assert invocation_seconds(folder) == 5400.0 + 1440.0
    assert summarise_run(folder)["training_hours"] == 1.9


# ------------------------------------------------------------------ the report says what it made
def _report_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("report_script", Path(__file__).resolve().parents[3]
                                                  / "scripts" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _training_run(folder: Path, max_steps: int, steps_done: int, fid: float | None) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"trainer:\n  max_steps: {max_steps}\n")
    (folder / "metrics.jsonl").write_text(json.dumps({"step": steps_done, "seconds_per_step": 1.0}) + "\n")
    if fid is not None:
        (folder / "evaluation.jsonl").write_text(json.dumps(_evaluation(0, 1000, steps_done, fid)) + "\n")


def test_the_report_ends_with_what_it_wrote_and_why_rows_are_missing(tmp_path, monkeypatch, capsys):
    """Run from a fresh folder beside a quickstart run: the last lines name the report folder and its files,
    each missing row's reason (the folder looked for, N of M steps, the evaluate.py command), Figure 5's
    missing --tswitch, and the --scale digits command (paper-scale runs all missing, a digits run present)."""
    monkeypatch.chdir(tmp_path)
    _training_run(tmp_path / "outputs" / "train" / "quickstart", 1600, 1600, 14.6)
    _report_main()([])
    lines = capsys.readouterr().out.splitlines()
    train, report = tmp_path / "outputs" / "train", tmp_path / "report"
    summary = lines[lines.index(f"wrote {report}: table1.md, table1.csv, table2.md, table2.csv"):]
    assert f"  table1 iCT (reimplemented): no run folder at {train / 'ict'}" in summary
    assert f"  table2 EDM + KNN (ours): no run folder at {train / 'edm_knn'}" in summary
    assert f"  figure4_k: not drawn, no sweep folder at {tmp_path / 'multirun' / 'train' / 'figure4_k'}" in summary
    assert any(line.startswith("  figure5: not drawn; pass --tswitch") for line in summary)
    assert summary[-1] == (f"no paper-scale run folder exists in {train}, but digits runs do (quickstart): "
                           "python scripts/report.py --scale digits")
    assert (report / "table1.md").exists()
    assert not list(report.glob("figure4_*.png"))  # no run to draw: no figure with empty axes

    # At digits scale: the quickstart row is complete, a partial run and a finished, unevaluated one say why.
    _training_run(train / "digits_ict", 1600, 800, 20.0)
    _training_run(train / "digits_ict_stf", 1600, 1600, None)
    _report_main()(["--scale", "digits", "--multirun", "", "--out", "small"])
    lines = capsys.readouterr().out.splitlines()
    summary = lines[lines.index(f"wrote {tmp_path / 'small'}: table1.md, table1.csv"):]
    assert summary[1:] == [
        "not complete:",
        f"  table1 iCT: partial: 800 of 1600 steps at {train / 'digits_ict'} (its train.py command, run again, "
        "continues)",
        f"  table1 iCT + STF: not evaluated yet: python evaluate.py run_dir={train / 'digits_ict_stf'}",
        "  figure5: not drawn; pass --tswitch <output folder of evaluate.py experiment=tswitch_sweep>"]
    assert "--scale digits" not in "\n".join(summary)
    assert "| iCT + STF | - | - |" in "\n".join(lines) and "not evaluated yet |" in "\n".join(lines)
