"""Redraw an estimator-study figure from the rows the study wrote, without re-running it.

    python scripts/plot_estimator_study.py docs/results/estimator_error_figure6_k_sweep.csv \\
        docs/figures/estimator_error_figure6_k_sweep.png --dataset "cifar10_jpeg (N=50000)"

The rows are a ``results.csv`` that ``python evaluate_estimators.py ...`` wrote in its run folder (the figures'
copies live in docs/results). The figure is the one evaluate_estimators.py draws (knn_cm.evaluation.study_plot:
the VE study, or the velocity study when the rows hold velocity targets), with the same title when
``--dataset`` is the name and size it prints (``<dataset.name> (N=<N>)``): seconds instead of the study's minutes,
e.g. after a change to the plotting code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from knn_cm.evaluation.estimator_error import read_csv
from knn_cm.evaluation.study_plot import plot_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rows", type=Path, help="a study's results.csv (or its copy under docs/results)")
    parser.add_argument("png", type=Path, help="the figure to write")
    parser.add_argument("--dataset", default="", help='the title\'s dataset, e.g. "cifar10_jpeg (N=50000)"')
    args = parser.parse_args(argv)
    if not args.rows.is_file():
        print(f"error: rows: no file {args.rows} (a results.csv written by evaluate_estimators.py)", file=sys.stderr)
        return 1
    rows = read_csv(args.rows)
    if not rows:
        print(f"error: rows: {args.rows} holds no study rows", file=sys.stderr)
        return 1
    plot_rows(rows, args.png, dataset=args.dataset)
    print(f"wrote {args.png} from {len(rows)} rows of {args.rows}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
