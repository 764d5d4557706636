"""Evaluation: the estimator-error study (Section 4.2), FID / IS (torch-fidelity; Inception or the project's
digits classifier), memorisation, per-checkpoint evaluation of runs and the t_switch sweep (Section 6).

Names are imported on first use, so light submodules (``snapshots``) do not load torch-fidelity.
"""

import importlib

_EXPORTS = {
    "InceptionWeightsUnavailable": "feature_extractors", "register_extractor": "feature_extractors",
    "estimator_error_study": "estimator_error",
    "read_csv": "estimator_error", "write_csv": "estimator_error", "compute_fidelity": "fidelity",
    "memorisation": "memorisation", "evaluate_run": "run_evaluation", "evaluate_samples": "run_evaluation",
    "markdown_table": "study_plot", "plot_study": "study_plot", "tswitch_sweep": "tswitch",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'knn_cm.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"knn_cm.evaluation.{_EXPORTS[name]}"), name)
