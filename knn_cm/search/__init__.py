"""Nearest-neighbour search over a DataStore: one home for index specs, backends and the cache.

- :mod:`~knn_cm.search.spec`: what an index is (:class:`IndexSpec`) and the checks of its inputs;
- :mod:`~knn_cm.search.faiss_index`: faiss kinds (flat, ivf, sq8, ivf_sq8);
- :mod:`~knn_cm.search.torch_index`: exact chunked GEMM + top-k in torch on any device;
- :mod:`~knn_cm.search.two_stage`: projected search (PCA + exact rerank) over either backend;
- :mod:`~knn_cm.search.cache`: trained indexes and projections on disk, built once under a lock;
- :mod:`~knn_cm.search.build`: :func:`build_index`, spec -> backend;
- :mod:`~knn_cm.search.sorting`: row sorts for index bookkeeping.
"""

from knn_cm.search.build import build_index
from knn_cm.search.faiss_index import FaissIndex
from knn_cm.search.spec import INDEX_KINDS, IndexSpec
from knn_cm.search.torch_index import TorchIndex
from knn_cm.search.two_stage import Projection, TwoStageIndex

__all__ = ["INDEX_KINDS", "FaissIndex", "IndexSpec", "Projection", "TorchIndex", "TwoStageIndex", "build_index"]
