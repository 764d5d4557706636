"""Estimators by name: each estimator class registers itself, knn-cm's own and those of a user's package.

A module adds an estimator with the decorator::

    from knn_cm.estimators import Estimator, register_estimator

    @register_estimator("mine")
    class Mine(Estimator):
        def posterior_mean(self, z, sigma, x, generator):   # z [B, d], sigma [B] -> [B, d]
            ...

and configs select it by that name (``estimator=mine`` with a ``configs/.../estimator/mine.yaml`` holding
``name: mine``, or ``{name: mine, ...}`` in an estimator set). A user's package makes its estimators known
without editing knn-cm through the entry point group ``knn_cm.estimators`` in its ``pyproject.toml``::

    [project.entry-points."knn_cm.estimators"]
    mine = "my_package.estimators:Mine"

Entry points are read on the first lookup of a name that is not registered yet. A name always maps to code
installed on the machine: configs and run folders hold names only, never code paths.
"""

from __future__ import annotations

from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "knn_cm.estimators"
_REGISTRY: dict[str, type] = {}
_entry_points_loaded = False


def register_estimator(name: str):
    """Class decorator: register an :class:`~knn_cm.estimators.base.Estimator` subclass under ``name``.

    Sets the class's ``name``. Registering a second class under a taken name is refused.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"an estimator name must be an identifier (letters, digits, _), got {name!r}")

    def register(cls: type) -> type:
        from knn_cm.estimators.base import Estimator

        if not (isinstance(cls, type) and issubclass(cls, Estimator)):
            raise TypeError(f"register_estimator({name!r}) decorates Estimator subclasses, got {cls!r}")
        taken = _REGISTRY.get(name)
        if taken is not None and taken is not cls:
            raise ValueError(f"estimator name {name!r} is taken by {taken.__module__}.{taken.__qualname__}; "
                             f"{cls.__module__}.{cls.__qualname__} needs another")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return register


def _load_entry_points() -> None:
    """Import every ``knn_cm.estimators`` entry point once (a class there is registered under its entry name)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry_point.load()
        if isinstance(loaded, type) and entry_point.name not in _REGISTRY:
            register_estimator(entry_point.name)(loaded)


def estimator_class(name: str) -> type:
    """The estimator class registered as ``name`` (loading entry points when it is not yet known).

    A ValueError lists the registered names when there is none.
    """
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; allowed: {', '.join(estimator_names())}")
    return _REGISTRY[name]


def estimator_names() -> tuple[str, ...]:
    """Every registered estimator name, knn-cm's first, then those of installed packages."""
    _load_entry_points()
    return tuple(_REGISTRY)

