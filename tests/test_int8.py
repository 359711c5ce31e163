"""int8 linear layers: close to the fp32 product, and each row's result independent of the rows beside it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import error_bound
from hypothesis import given, settings
from hypothesis import strategies as st

from nmt.int8 import Int8Linear, int8_available, quantize_rows

pytestmark = pytest.mark.skipif(not int8_available(), reason="this torch build has no oneDNN int8 matmul")


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=2, max_size=4), width=st.integers(1, 70),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), bounded=st.booleans(), seed=st.integers(0, 2**16))
def test_property_a_row_computes_the_same_whatever_rows_come_with_it(sizes, width, scale, bounded, seed) -> None:
    # What lets batched decoding give each sentence what it gets alone: the int8 sums are exact, and each row
    # has its own scale (or all share a fixed one), so neither the batch's size nor the other rows' ranges touch a
    # row's result.
    g = torch.Generator().manual_seed(seed)
    layer = Int8Linear(torch.randn(23, width, generator=g), torch.randn(23, generator=g), scale if bounded else None)
    parts = [torch.randn(n, width, generator=g) * scale ** torch.rand(n, 1, generator=g) for n in sizes]
    if bounded:
        parts = [part.clamp(-scale, scale) for part in parts]
    together = layer(torch.cat(parts))
    alone = torch.cat([layer(row.unsqueeze(0)) for part in parts for row in part])
    assert torch.equal(together, alone)


def test_a_selection_of_output_rows_computes_those_columns_exactly() -> None:
    # A decoding batch's shortlist packs some rows of the output layer: they must give the whole layer's logits.
    g = torch.Generator().manual_seed(2)
    layer = Int8Linear(torch.randn(50, 16, generator=g), torch.randn(50, generator=g))
    x = torch.randn(9, 16, generator=g)
    ids = torch.tensor([0, 3, 4, 17, 49, 49])
    assert torch.equal(layer.select(ids)(x), layer(x)[:, ids])


def test_zero_rows_and_channels_quantize_to_zero() -> None:
    values, scale = quantize_rows(torch.tensor([[0.0, 0.0], [1.0, -0.5]]))
    assert values.tolist() == [[0, 0], [127, -64]] and scale[0].item() > 0
    weight = torch.tensor([[0.0, 0.0], [2.0, 1.0]])
    out = Int8Linear(weight, torch.tensor([0.5, 0.0]))(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert torch.allclose(out, torch.tensor([[0.5, 0.0], [0.5, 3.0]]), atol=0.02)


@pytest.mark.parametrize("rows", [1, 5, 130])
def test_inputs_within_a_fixed_bound_quantize_with_it(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(37, 29, generator=g), torch.randn(37, generator=g)
    x = torch.tanh(3 * torch.randn(rows, 29, generator=g))  # within +-1, as the decoder's states and readout
    out = Int8Linear(weight, bias, input_bound=1.0)(x)
    assert ((out - F.linear(x, weight, bias)).abs() <= error_bound(x, weight, 1.0)).all()
    # A value past the bound saturates instead of wrapping around to the other sign.
    over = Int8Linear(torch.eye(2), input_bound=1.0)(torch.tensor([[1.5, -3.0]]))
    assert torch.equal(over, torch.tensor([[1.0, -1.0]]))


def test_without_vnni_the_weights_take_seven_bits_and_products_stay_exact() -> None:
    # oneDNN's AVX2 kernel (CPUs without VNNI) adds pairs of products in 16 bits: with weights of +-127 an all-127
    # product over 256 inputs came out as 32,640 instead of 4,129,024, and translations changed. Forced to that
    # kernel, the weights must take +-63 and every product stay within int8's rounding of fp32.
    script = (
        "import torch, torch.nn.functional as F\n"
        "from nmt.int8 import Int8Linear, weight_levels\n"
        "w, x = torch.full((16, 256), 0.5), torch.full((3, 256), 2.0)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "w2, x2 = torch.randn(64, 512, generator=g), torch.randn(9, 512, generator=g)\n"
        "error = (Int8Linear(w2)(x2) - F.linear(x2, w2)).abs().max() / F.linear(x2, w2).abs().max()\n"
        "print(weight_levels(), torch.allclose(Int8Linear(w)(x), F.linear(x, w)), float(error) < 0.02)\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    levels, exact, close = done.stdout.split()
    assert (levels, exact, close) == ("63", "True", "True")
