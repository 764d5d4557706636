"""sort_rows / sorted_rows give torch.sort's result on the CPU (NumPy path), ties aside."""

from __future__ import annotations

import torch

from knn_cm.search.sorting import sort_rows, sorted_rows


def test_sort_rows_matches_torch_sort():
    values = torch.randn(16, 300)
    values[:, :10] = 0.5  # ties: any order among them, same sorted values
    expected = values.sort(dim=1).values
    got, order = sort_rows(values)
    assert torch.equal(got, expected) and got.dtype == values.dtype
    assert torch.equal(values.gather(1, order), got) and order.dtype == torch.int64


def test_sorted_rows_integers():
    values = torch.randint(0, 1000, (8, 2048))
    values[0, 5] = torch.iinfo(torch.int64).max  # the padding value of missing neighbours
    assert torch.equal(sorted_rows(values), values.sort(dim=1).values)
    assert sorted_rows(values).dtype == torch.int64


def test_bfloat16_and_nan_sort_like_torch():
    values = torch.randn(4, 50).to(torch.bfloat16)
    assert torch.equal(sort_rows(values)[0], values.sort(dim=1).values)
    with_nan = torch.randn(4, 50)
    with_nan[:, 3] = float("nan")
    got = sorted_rows(with_nan)
    assert torch.isnan(got[:, -1]).all() and torch.equal(got[:, :-1], with_nan.sort(dim=1).values[:, :-1])
