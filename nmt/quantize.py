"""int8 dynamic quantization of the recurrent and linear layers, for CPU inference."""

from __future__ import annotations

import logging
import warnings

from torch import nn

log = logging.getLogger(__name__)

QUANTIZED_TYPES = {nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.Linear}


def quantize_int8(model: nn.Module) -> tuple[nn.Module, bool]:
    """The model with int8 weights in its LSTM/GRU and Linear layers, and whether that worked.

    Embeddings and attention's v stay fp32. Activations are quantized on the fly at each call, so no
    calibration data is needed. Where this torch build cannot quantize, the fp32 model comes back with a
    warning in the log rather than an error: int8 is a speed option, never needed for correct output.
    """
    import torch

    try:
        with warnings.catch_warnings():
            # torch.ao.quantization is deprecated in favour of torchao, but still works and needs nothing extra.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=r".*quantiz.*", category=UserWarning)
            from torch.ao.quantization import quantize_dynamic

            return quantize_dynamic(model, QUANTIZED_TYPES, dtype=torch.qint8), True
    except (ImportError, RuntimeError, AttributeError, NotImplementedError) as exc:
        log.warning("int8 quantization is not available in torch %s (%s); using fp32", torch.__version__, exc)
        return model, False
