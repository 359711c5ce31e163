"""int8 linear layers for CPU inference through oneDNN, each row of the input quantized on its own.

The weight is quantized once, one scale per output channel, and prepacked; at each call every input row is
quantized to int8 with a scale of its own (its largest magnitude maps to 127), or with a fixed one where the
inputs are known to be bounded. The product is summed in int32, which is exact, so a row's result does not
depend on the rows computed with it: batched decoding gives what each sentence gets alone. On a 2-core Xeon with
AVX-512 VNNI, at 125 rows (a full decoding batch) this ran 1.2-4x as fast as oneDNN's fp32 matmul
(768 inputs -> 256 outputs: 1.2x; 256 -> 2,816: 2.3x; 512 -> 2,304: 4x).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from nmt.device import cpu_flags
from nmt.onednn import ROWS_HINT, padded_rows

log = logging.getLogger(__name__)

LEVELS = 127.0  # symmetric int8: the largest magnitude of an input row maps to 127
# A weight channel's largest magnitude maps to the first of these that this CPU's int8 kernels multiply exactly:
# without VNNI, oneDNN's AVX2 kernel adds pairs of products of its inputs (shifted to 0..255) in 16 bits, which
# 2 x 255 x 127 overflows (an all-127 product over 256 inputs came out as 32,640, not 4,129,024) and 2 x 255 x 63
# does not.
WEIGHT_LEVELS = (127, 63)
PROBE_WIDTH = 256
MIN_ROWS = 8  # inputs of fewer rows are padded with zeros to this many (see Int8Linear.__call__)
TINY = 1e-30  # the scale of an all-zero row or channel, whose values all quantize to 0 anyway


def quantize_rows(x: torch.Tensor, levels: float = LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, n) floats -> int8 values (within +-levels) and the per-row scales (rows, 1) they are multiplied by."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min_(TINY).div_(levels)
    return torch.round(x / scale).to(torch.int8), scale


class Int8Linear:
    """x W^T + b for a fixed fp32 weight (out, in) on the CPU, in int8. Inference only: no autograd.

    With an input_bound, the inputs are known to lie within +-input_bound (a tanh's output, say): they are quantized
    with that one fixed scale, folded into the weight's, instead of a scale measured per row. (oneDNN is given no
    input scale or bias to apply: its kernels for different row counts apply them in different orders, which
    changes the last bits of a row's result with the batch.)"""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, input_bound: float | None = None):
        levels = weight_levels()
        if levels is None:
            raise RuntimeError("oneDNN's int8 matmul is not available here (see int8_available)")
        qweight, scale = quantize_rows(weight.detach().float(), levels)
        self._hold(qweight, scale.view(-1), None if bias is None else bias.detach().float(), input_bound)

    @classmethod
    def _from_parts(cls, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    input_bound: float | None) -> Int8Linear:
        layer = cls.__new__(cls)
        layer._hold(qweight, scale, bias, input_bound)
        return layer

    def _hold(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              input_bound: float | None) -> None:
        self.qweight, self.weight_scale = qweight.contiguous(), scale.contiguous()
        self.bias = None if bias is None else bias.contiguous()
        self.input_bound = input_bound
        # What oneDNN multiplies each channel's int32 sums by: the weight's scale, times the input's fixed one.
        self.output_scale = scale if input_bound is None else (scale * (input_bound / LEVELS)).contiguous()
        self.out_features, self.in_features = qweight.shape
        self.zero_points = torch.zeros(self.out_features, dtype=torch.int64)
        self._packed: torch.Tensor | None = None

    @property
    def packed(self) -> torch.Tensor:
        """The weight in oneDNN's layout, made at first use: a layer only selected from is never packed whole."""
        if self._packed is None:
            self._packed = torch.ops.onednn.qlinear_prepack(self.qweight, [ROWS_HINT, self.in_features])
        return self._packed

    def __reduce__(self) -> tuple:
        # The packed weight is an opaque oneDNN tensor that cannot be copied or pickled: pack a copy anew.
        return Int8Linear._from_parts, (self.qweight, self.weight_scale, self.bias, self.input_bound)

    def select(self, ids: torch.Tensor) -> Int8Linear:
        """The layer of these output rows alone (each row keeps its own scale, so they compute as they do here)."""
        bias = None if self.bias is None else self.bias.index_select(0, ids)
        return Int8Linear._from_parts(self.qweight.index_select(0, ids), self.weight_scale.index_select(0, ids), bias,
                                      self.input_bound)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(-1) != self.in_features:
            raise ValueError(f"expected inputs of {self.in_features} features, got shape {tuple(x.shape)}")
        rows = x.numel() // self.in_features
        flat = x.reshape(rows, self.in_features)
        if self.input_bound is None:
            qx, scale = quantize_rows(flat)
        else:  # clamped all the same: a value past the bound must not wrap around in int8
            qx = torch.round(flat * (LEVELS / self.input_bound)).clamp_(-LEVELS, LEVELS).to(torch.int8)
            scale = None
        # A oneDNN kernel per shape, as for PackedLinear; and never fewer than MIN_ROWS rows: oneDNN 3.x picks slow
        # int8 kernels for a few rows of some widths (one row of 256 inputs: 20-40 ms against 0.1 ms for two, which
        # made greedy decoding of one sentence crawl; up to five rows of 256 inputs by 37 outputs: 0.6-2.5 ms).
        padded = max(MIN_ROWS, padded_rows(rows))
        if padded != rows:
            qx = F.pad(qx, (0, 0, 0, padded - rows))
        out = torch.ops.onednn.qlinear_pointwise(qx.contiguous(), 1.0, 0, self.packed, self.output_scale,
                                                 self.zero_points, None, 1.0, 0, torch.float32, "none", [], "")
        out = out[:rows]
        if scale is not None:
            out = out.mul_(scale) if self.bias is None else torch.addcmul(self.bias, out, scale)
        elif self.bias is not None:
            out = out.add_(self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def _exact(levels: int) -> bool:
    """Whether oneDNN multiplies weights within +-levels exactly: the largest inputs (+-127) against the largest
    weights of either sign over PROBE_WIDTH inputs, where pairwise 16-bit sums would overflow, and a mixed case."""
    mixed = range(PROBE_WIDTH)
    x = torch.tensor([[LEVELS] * PROBE_WIDTH, [-LEVELS] * PROBE_WIDTH, [(-1) ** i * (i % 128) for i in mixed]])
    weight = torch.tensor([[levels] * PROBE_WIDTH, [-levels] * PROBE_WIDTH,
                           [i % (2 * levels + 1) - levels for i in mixed]])
    scale = torch.ones(3)
    packed = torch.ops.onednn.qlinear_prepack(weight.to(torch.int8), [ROWS_HINT, PROBE_WIDTH])
    qx = F.pad(x.to(torch.int8), (0, 0, 0, MIN_ROWS - len(x)))
    out = torch.ops.onednn.qlinear_pointwise(qx, 1.0, 0, packed, scale, torch.zeros(3, dtype=torch.int64), None,
                                             1.0, 0, torch.float32, "none", [], "")[:len(x)]
    return torch.equal(out.double(), x.double() @ weight.double().t())


@functools.cache
def weight_levels() -> int | None:
    """The largest int8 weight magnitude this CPU's oneDNN kernels multiply exactly (WEIGHT_LEVELS); None where
    this torch build has no oneDNN int8 matmul, or none of them is exact."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return next((levels for levels in WEIGHT_LEVELS if _exact(levels)), None)
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        log.info("oneDNN int8 matmuls are not available in torch %s (%s)", torch.__version__, exc)
        return None


def vnni() -> bool:
    """Whether oneDNN may use this CPU's int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX), where int8
    decodes faster than fp32. Without them its AVX2 kernels decoded the test set at half fp32's speed, and its
    AVX-512 kernels at a small fraction of it (ONEDNN_MAX_CPU_ISA=AVX2 / AVX512_CORE on a VNNI machine)."""
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    if limit not in ("ALL", "DEFAULT", "") and not any(name in limit for name in ("VNNI", "AMX", "BF16", "FP16",
                                                                                   "AVX10")):
        return False
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def int8_available() -> bool:
    """Whether Int8Linear can run here, its int32 sums exact."""
    return weight_levels() is not None
