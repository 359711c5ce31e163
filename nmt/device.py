"""The torch device a setting names, checked before anything is loaded onto it."""

from __future__ import annotations

import torch

from nmt.errors import NMTError


def pick_device(name: str, setting: str = "device") -> torch.device:
    """cpu, cuda, cuda:N or auto (CUDA when there is one) -> the device; NMTError naming the setting for an unknown
    device or a CUDA one this machine does not have."""
    try:
        device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                              "cpu" if name == "auto" else name)
    except (RuntimeError, TypeError):
        raise NMTError(f"{setting} must be cpu, cuda, cuda:N or auto, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NMTError(f"{setting} is {name}, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise NMTError(f"{setting} is {name}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_int8(device: torch.device, setting: str = "int8", cpu: str = "device cpu") -> None:
    """NMTError unless int8 quantization (for CPU inference only) can run on the device; `cpu` says how to pick it."""
    if device.type != "cpu":
        raise NMTError(f"{setting} quantizes for CPU inference: use {cpu}")
