"""Evaluation: the estimator-error study (Section 4.2), FID / IS (torch-fidelity; Inception or the project's
digits classifier), memorisation, per-checkpoint evaluation of runs and the t_switch sweep (Section 6)."""

from knn_cm.evaluation.estimator_error import (build_estimators, estimator_error_study, read_csv,
                                               write_csv)
from knn_cm.evaluation.feature_extractors import InceptionWeightsUnavailable, register_extractor
from knn_cm.evaluation.fidelity import compute_fidelity
from knn_cm.evaluation.memorisation import memorisation
from knn_cm.evaluation.run_evaluation import evaluate_run, evaluate_samples
from knn_cm.evaluation.study_plot import markdown_table, plot_study
from knn_cm.evaluation.tswitch import tswitch_sweep

__all__ = ["InceptionWeightsUnavailable", "build_estimators", "compute_fidelity", "estimator_error_study",
           "evaluate_run", "evaluate_samples", "markdown_table", "memorisation", "plot_study", "read_csv",
           "register_extractor", "tswitch_sweep", "write_csv"]
