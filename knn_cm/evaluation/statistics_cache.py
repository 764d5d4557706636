"""FID reference statistics on disk: ``.npz`` files of plain arrays, read with ``allow_pickle=False``.

torch-fidelity's own cache stores statistics as ``torch.save`` pickles and reads them back with full
unpickling (a crafted cache file runs code). This cache holds only numeric and string arrays::

    mu [D] (float32, as torch-fidelity computes it), sigma [D, D] (float64), num_images [] (int64),
    fingerprint [] (str: the reference store's content fingerprint)

written durably (temporary file, fsync, rename). A file that cannot be read, holds anything else, or was
computed for other data is reported with a warning naming it and recomputed, never used.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np

from knn_cm.io import atomic_path

_ENTRIES = ("mu", "sigma", "num_images", "fingerprint")


def save_statistics(path: str | Path, statistics: dict, fingerprint: str, num_images: int) -> None:
    """Write ``statistics`` ({"mu": [D], "sigma": [D, D]}) of ``num_images`` reference images to ``path``."""
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        np.savez(handle, mu=np.asarray(statistics["mu"]), sigma=np.asarray(statistics["sigma"]),
                 num_images=np.int64(num_images), fingerprint=np.str_(fingerprint))


def _problem(arrays: dict, fingerprint: str, num_images: int) -> str | None:
    missing = [key for key in _ENTRIES if key not in arrays]
    if missing:
        return f"entries {missing} are missing"
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        return f"mu has shape {mu.shape} and sigma {sigma.shape}"
    if mu.dtype.kind != "f" or sigma.dtype.kind != "f" or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return "mu and sigma must be finite floats"
    if str(arrays["fingerprint"]) != fingerprint or int(arrays["num_images"]) != int(num_images):
        return (f"computed for {int(arrays['num_images'])} images with fingerprint {str(arrays['fingerprint'])!r}, "
                f"not this reference ({num_images} images, {fingerprint!r})")
    return None


def load_statistics(path: str | Path, fingerprint: str, num_images: int) -> dict | None:
    """{"mu", "sigma"} from ``path``, or None when it is absent; a corrupt or foreign file gives a warning
    naming it and None (the caller recomputes and overwrites it)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        problem = _problem(arrays, fingerprint, num_images)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        problem = f"unreadable: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    if problem is not None:
        warnings.warn(f"FID statistics cache {path} is not usable ({problem}); recomputing it", RuntimeWarning,
                      stacklevel=2)
        return None
    return {"mu": arrays["mu"], "sigma": arrays["sigma"]}
