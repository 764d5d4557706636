"""Evaluation: the estimator-error study (Section 4.2) and its figures."""

from knn_cm.evaluation.estimator_error import (build_estimators, estimator_error_study, read_csv,
                                               write_csv)
from knn_cm.evaluation.study_plot import markdown_table, plot_study

__all__ = ["build_estimators", "estimator_error_study", "markdown_table", "plot_study", "read_csv", "write_csv"]
