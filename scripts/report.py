"""Tables and figures of the paper from run folders.

    python scripts/report.py [--train outputs/train] [--multirun multirun/train] [--tswitch FOLDER] [--out report]

Writes table1.md/.csv (Table 1: iCT, iCT + STF, iCT + KNN), table2.md/.csv (Table 2: EDM, STF, EDM + KNN),
figure4_k.png / figure4_n.png (FID against training images for the ablation sweeps) and figure5.png (FID
against t_switch, from evaluate.py experiment=tswitch_sweep's folder). Runs that are missing or unfinished
are marked so, never filled in. Each row is the run's minimum-FID evaluated checkpoint (evaluate.py). Ends
with the files written and, for each missing row or figure, why (no run folder at PATH, partial: N of M
steps, not evaluated yet and the evaluate.py command).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from knn_cm import paper
from knn_cm.report import SCALES, build_report, report_summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", default="outputs/train",
                        help="folder of training run folders (run_name = experiment)")
    parser.add_argument("--multirun", default="multirun/train",
                        help=f"folder of sweep folders ({', '.join(p.experiment for p in paper.FIGURE4.panels)}); "
                             "\"\" to skip Figure 4")
    parser.add_argument("--tswitch", default=None,
                        help=f"output folder of evaluate.py experiment={paper.FIGURE5.experiment}")
    parser.add_argument("--out", default="report", help="where the tables and figures go")
    parser.add_argument("--scale", default="paper", choices=SCALES,
                        help="digits: Table 1 from the small-scale CPU runs ("
                             f"{', '.join(m.experiment for m in paper.TABLE1_DIGITS.methods)}); "
                             "toy: the paper's run folders filled by scripts/campaign.py --scale toy")
    args = parser.parse_args(argv)
    result = build_report(args.train, args.out, args.multirun or None, args.tswitch, scale=args.scale)
    for name in dict.fromkeys(table.name for table in (*paper.TABLES, paper.TABLE1_DIGITS)):
        if name in result and (Path(args.out) / f"{name}.md").exists():
            print((Path(args.out) / f"{name}.md").read_text())
    # Last: what was written and why each missing piece is missing (with the next command where one helps).
    print("\n".join(report_summary(result, args.out, args.train, args.multirun or None, args.tswitch,
                                   scale=args.scale)))
    return result


if __name__ == "__main__":
    main()
