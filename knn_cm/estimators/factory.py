"""Building estimators: by name from Python objects (:func:`make_estimator`), and from configs (one schema).

A config spec is a plain mapping (configs/train/estimator/*.yaml, each entry of
configs/estimator_study/estimator_set/*.yaml, the ``estimator`` block of sample.yaml and evaluate.yaml), read by
every app and the study through :func:`build_estimator`::

    name: knn               # single | exact | mc | uniform | stf | knn | network, or a local denoiser:
                            # ls | els | pspc_square | cfdm | gaussian (docs/denoisers.md), or any name a
                            # package registers (knn_cm.estimators.registry)
    k: 2048                 # the estimator's own arguments
    n: 256
    index: {kind: flat}     # estimators that search (knn): build_index arguments (default {kind: flat});
                            # index device: cpu (default) | cuda[:i] | null (where the estimator computes)
    checkpoint: PATH        # network only: a network file (training snapshot, converted EDM checkpoint)

train.py keeps the index in its own config group (``index=ivf``) and passes it as the spec's ``index``.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Mapping
from contextlib import contextmanager

import torch

from knn_cm.device import as_device, is_accelerator
from knn_cm.estimators.base import Estimator
from knn_cm.estimators.registry import estimator_class, estimator_names

log = logging.getLogger(__name__)

DEFAULT_INDEX = {"kind": "flat"}


def make_estimator(name: str, store=None, **kwargs) -> Estimator:
    """Build the estimator registered as ``name`` (:mod:`knn_cm.estimators.registry`) over ``store``.

    knn-cm's own: "single" "exact" "mc" "uniform" "stf" "knn" "network", and the local denoisers "ls" "els"
    "pspc_square" "cfdm" "gaussian". Keyword arguments go to the estimator: ``n`` (mc, uniform, stf, knn), ``k``
    and ``index`` (knn), ``variant`` (stf), ``denoiser`` (network), and ``device`` / ``dtype`` (all); the local
    denoisers take ``patch_size``, ``window``, ``padding`` (els), ``smoothing`` and ``draws`` (cfdm), and ``k``
    with ``n`` for their KNN form (docs/denoisers.md).
    """
    cls = estimator_class(name)
    if store is None and cls.needs_store:
        raise ValueError(f"the {name!r} estimator needs a DataStore: make_estimator({name!r}, store, ...)")
    return cls(store=store, **kwargs)


def build_estimator(spec: Mapping, store, device: str | torch.device = "cpu", *, indexes: dict | None = None,
                    setting: str = "estimator", index_setting: str | None = None) -> Estimator:
    """The estimator a config spec describes (the module docstring), computing on ``device``.

    Args:
        spec: ``name``, the estimator's arguments, ``index`` (estimators that search), ``checkpoint`` (network).
        store: the :class:`~knn_cm.data.DataStore` the estimator averages over (and the index searches).
        device: where the estimator computes ("auto", "cpu", "cuda[:i]"); an index with ``device: null``
            searches there too.
        indexes: a dict shared across calls so that equal index specs build one index (estimator sets).
        setting: the config path of ``spec``, named in errors (e.g. ``estimators.knn``): a bad argument is
            refused as ``<setting>.<argument>`` (``estimator.k must be an integer >= 1, got 0``).
        index_setting: the config path of the index spec (default ``<setting>.index``; train.py's ``index`` group).
    """
    arguments = dict(spec)
    name = arguments.pop("name", None)
    if name not in estimator_names():
        raise ValueError(f"{setting}.name must be one of {', '.join(estimator_names())}, got {name!r}")
    cls = estimator_class(name)
    index_spec = arguments.pop("index", None)
    checkpoint = arguments.pop("checkpoint", None)
    index_setting = index_setting or f"{setting}.index"
    _refuse_unknown(arguments, _parameters(cls), setting, f"the {name!r} estimator")
    device = as_device(device, f"{setting} device")
    if cls.needs_index:  # the others ignore an index (train.py's index group is always there)
        index_spec = dict(index_spec or DEFAULT_INDEX)
        from knn_cm.search import build_index

        parameters = inspect.signature(build_index).parameters
        if not any(parameter.kind == parameter.VAR_KEYWORD for parameter in parameters.values()):
            _refuse_unknown(index_spec, set(parameters) - {"store"}, index_setting, "an index")
        with _naming(index_setting, index_spec):
            arguments["index"] = _index(index_spec, store, device, indexes)
    if name == "network":
        if checkpoint is None:
            raise ValueError(f"{setting}: a network estimator needs checkpoint=PATH (a network file)")
        from knn_cm.models import load_network

        arguments["denoiser"] = load_network(checkpoint, map_location=device)
    with _naming(setting, arguments):
        return make_estimator(name, store, device=device, **arguments)


def _parameters(cls: type) -> set[str]:
    """The keyword arguments an estimator class takes (its own and those it passes on to its bases)."""
    names = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass) and klass is not object:
            names |= {name for name, parameter in inspect.signature(klass.__init__).parameters.items()
                      if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)}
    return names - {"self", "store", "index", "denoiser"}


def _refuse_unknown(arguments: Mapping, allowed: set[str], setting: str, what: str) -> None:
    unknown = sorted(set(arguments) - allowed)
    if unknown:
        raise ValueError(f"{setting}.{unknown[0]} is not a setting of {what}; allowed: {', '.join(sorted(allowed))}")


@contextmanager
def _naming(setting: str, arguments: Mapping):
    """Re-raise a ValueError about one of ``arguments`` ("k must be ...", "nlist=5000 exceeds ...") with its full
    config key ("estimator.k must be ..."), any other with the setting in front ("index: unknown index kind"), so
    the message says what to change on the command line."""
    try:
        yield
    except ValueError as error:
        message = str(error)
        if type(error) is not ValueError or message.startswith(setting):
            raise
        named = next((key for key in arguments if re.match(rf"{re.escape(key)}\b", message)), None)
        raise ValueError(f"{setting}.{message}" if named else f"{setting}: {message}") from error


def build_estimator_set(specs: Mapping[str, Mapping | None], store, device: str | torch.device = "cpu",
                        setting: str = "estimators") -> dict[str, Estimator]:
    """label -> estimator for label -> spec (an estimator set, e.g. configs/estimator_study/estimator_set/figure3.yaml).

    A spec's ``name`` defaults to its label; a spec of None drops the label (experiments remove an estimator
    from a set that way); equal index specs share one index.
    """
    indexes: dict = {}
    return {label: build_estimator({"name": label, **spec}, store, device, indexes=indexes,
                                   setting=f"{setting}.{label}")
            for label, spec in specs.items() if spec is not None}


def _index(index_spec: dict, store, device: torch.device, indexes: dict | None):
    """The index ``index_spec`` describes (from ``indexes`` when an equal spec was built before)."""
    from knn_cm.search import build_index

    if "device" in index_spec and index_spec["device"] is None:  # null: search where the estimator computes
        index_spec["device"] = device
    if is_accelerator(device) and as_device(index_spec.get("device") or "cpu", "index device").type == "cpu":
        log.warning("the %s index searches on the CPU for an estimator on %s: every search copies its queries to the "
                    "host and the neighbours back, a host synchronisation per training step; index.device=cuda "
                    "(faiss-gpu) or index=torch (exact, no faiss) searches on the GPU", index_spec.get("kind"), device)
    if indexes is None:
        return build_index(store, **index_spec)
    key = tuple(sorted(index_spec.items()))
    if key not in indexes:
        indexes[key] = build_index(store, **index_spec)
    return indexes[key]
