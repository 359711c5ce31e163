"""oneDNN prepacked linear layers: the same products as torch's own matmul (int8: within its rounding), for any input
shape."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import error_bound

from nmt.int8 import Int8Linear, int8_available
from nmt.onednn import EXACT_ROWS, PackedLinear, packable, padded_rows

pytestmark = pytest.mark.skipif(not packable(torch.zeros(1, 1)), reason="this torch build has no oneDNN matmul")


INT8 = pytest.param(Int8Linear, marks=pytest.mark.skipif(not int8_available(),
                                                         reason="this torch build has no oneDNN int8 matmul"))


@pytest.mark.parametrize("rows", [0, 1, 5, 17, 64, 130, 301])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", [PackedLinear, INT8])
def test_packed_linear_is_torch_linear(rows: int, bias: bool, kind) -> None:
    g = torch.Generator().manual_seed(rows)
    weight, b = torch.randn(37, 29, generator=g), torch.randn(37, generator=g) if bias else None
    x = torch.randn(rows, 29, generator=g)
    out = kind(weight, b)(x)
    assert out.shape == (rows, 37)
    # int8: within the rounding of its inputs; fp32: the same product, summed in another order
    bound = error_bound(x, weight) if kind is Int8Linear else 1e-5 + 1e-5 * F.linear(x, weight, b).abs()
    assert ((out - F.linear(x, weight, b)).abs() <= bound).all()


def test_packed_linear_takes_batches_and_strided_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 12, generator=g)
    x = torch.randn(3, 7, 20, generator=g)[:, 1:6, 4:16]  # (3, 5, 12), not contiguous
    assert torch.allclose(PackedLinear(weight)(x), F.linear(x, weight), atol=1e-5)
    transposed = weight.t().contiguous().t()  # a strided weight is copied, not misread
    assert torch.allclose(PackedLinear(transposed)(x), F.linear(x, weight), atol=1e-5)


def test_only_cpu_float32_weights_are_packable() -> None:
    assert not packable(torch.zeros(2, 2, dtype=torch.float64))
    assert not packable(torch.zeros(2, 2, dtype=torch.bfloat16))


def test_row_counts_are_bucketed_to_few_shapes_with_little_padding() -> None:
    # Each shape oneDNN sees costs a kernel compilation: a batch's changing row counts must map to few shapes.
    sizes = [padded_rows(rows) for rows in range(1, 4097)]
    assert all(rows <= size <= max(rows, rows * 9 // 8) for rows, size in zip(range(1, 4097), sizes, strict=True))
    assert sizes[:EXACT_ROWS] == list(range(1, EXACT_ROWS + 1))
    assert len(set(sizes)) <= 80


@pytest.mark.parametrize("kind", [PackedLinear, INT8])
def test_packed_linear_copies_pickles_and_refuses_a_wrong_width(kind) -> None:
    g = torch.Generator().manual_seed(1)
    layer, x = kind(torch.randn(8, 6, generator=g), torch.randn(8, generator=g)), torch.randn(3, 6, generator=g)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(other(x), layer(x))
    with pytest.raises(ValueError, match="6 features"):
        layer(torch.randn(2, 12))
