"""Datasets as uint8 stores with float views, fingerprints and optional x-flip doubling."""

from knn_cm.data.pixels import float_to_uint8, uint8_to_float
from knn_cm.data.resident import ResidentRows
from knn_cm.data.sources import UnreadableDataError, load_array, load_cifar10, load_digits, load_image_folder
from knn_cm.data.store import DatasetInfo, DataStore

__all__ = [
    "DataStore",
    "DatasetInfo",
    "ResidentRows",
    "UnreadableDataError",
    "float_to_uint8",
    "load_array",
    "load_cifar10",
    "load_digits",
    "load_image_folder",
    "uint8_to_float",
]
