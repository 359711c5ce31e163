"""fp32 linear layers through oneDNN with weights prepacked once, for CPU inference.

torch hands fp32 matmuls to MKL's sgemm. On the AMD EPYC machines this project is measured on, oneDNN's matmul
on a weight reordered once into its own blocked layout is 1.6-3x as fast at decoding's shapes (5-300 rows of
256-512 inputs); the results agree to fp32 rounding (a different summation order).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ROWS_HINT = 64  # rows the packed layout is chosen for; any number of rows works
EXACT_ROWS = 16  # up to this many rows a matmul runs as it comes; more are padded to one of 8 sizes per doubling


def padded_rows(rows: int) -> int:
    """The row count a matmul of this many rows runs at: oneDNN compiles a kernel for each new shape (1.5 ms
    here, then cached), so the shapes are bucketed, padding at most an eighth."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 4)  # an eighth of the power of two at or below rows
    return -(-rows // step) * step


class PackedLinear:
    """x W^T + b for a fixed fp32 weight (out, in) on the CPU, through oneDNN. Inference only: no autograd."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight.detach().contiguous()
        self.out_features, self.in_features = self.weight.shape
        self.bias = None if bias is None else bias.detach().contiguous()
        self._packed: torch.Tensor | None = None

    @property
    def packed(self) -> torch.Tensor:
        """The weight in oneDNN's layout, made at first use: a layer only selected from is never packed whole."""
        if self._packed is None:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, ROWS_HINT)
        return self._packed

    def __reduce__(self) -> tuple:
        # The packed weight is an opaque oneDNN tensor that cannot be copied or pickled: pack a copy anew.
        return PackedLinear, (self.weight, self.bias)

    def select(self, ids: torch.Tensor) -> PackedLinear:
        """The layer of these output rows alone."""
        bias = None if self.bias is None else self.bias.index_select(0, ids)
        return PackedLinear(self.weight.index_select(0, ids), bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(-1) != self.in_features:
            raise ValueError(f"expected inputs of {self.in_features} features, got shape {tuple(x.shape)}")
        rows = x.numel() // self.in_features
        flat = x.reshape(rows, self.in_features)
        padded = padded_rows(rows)
        if padded != rows:
            flat = F.pad(flat, (0, 0, 0, padded - rows))
        out = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), self.packed, self.bias, "none", [], "")
        return out[:rows].view(*x.shape[:-1], self.out_features)


def packable(weight: torch.Tensor, probe: bool = True) -> bool:
    """Whether this torch build can run PackedLinear on this weight (fp32 on the CPU); with probe, tried on a small
    one first."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    if not probe:
        return True
    try:
        small, x = torch.arange(12, dtype=torch.float32).view(3, 4), torch.ones(2, 4)
        return torch.allclose(PackedLinear(small)(x), F.linear(x, small))
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        log.info("oneDNN prepacked matmuls are not available in torch %s (%s)", torch.__version__, exc)
        return False
