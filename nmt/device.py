"""The torch device a setting names, checked before anything is loaded onto it, and what the machine is."""

from __future__ import annotations

import math
import os
import platform
import re
from pathlib import Path

import torch

from nmt.errors import NMTError


def pick_device(name: str, setting: str = "device") -> torch.device:
    """cpu, cuda, cuda:N or auto (CUDA when there is one) -> the device; NMTError naming the setting for an unknown
    device or a CUDA one this machine does not have."""
    try:
        device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                              "cpu" if name == "auto" else name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # mps, meta and the like: no path of ours runs there
        raise NMTError(f"{setting} must be cpu, cuda, cuda:N or auto, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NMTError(f"{setting} is {name}, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise NMTError(f"{setting} is {name}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def out_of_memory(exc: BaseException) -> str | None:
    """When an error is an allocation refused (too large for the device's memory, or for a size's arithmetic),
    what it says in one line; else None."""
    text = str(exc).strip()
    signs = ("can't allocate memory", "out of memory", "size calculation overflowed")
    if not isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)) and not any(s in text for s in signs):
        return None
    line = text.splitlines()[0] if text else type(exc).__name__
    return re.sub(r"^\[enforce fail at [^]]*\] err == 0\. ", "", line)  # c10's prefix: where in its source


def check_int8(device: torch.device, setting: str = "int8", cpu: str = "device cpu") -> None:
    """NMTError unless int8 quantization (for CPU inference only) can run on the device; `cpu` says how to pick it."""
    if device.type != "cpu":
        raise NMTError(f"{setting} quantizes for CPU inference: use {cpu}")


def hardware(device: torch.device) -> dict[str, str]:
    """The processor (CPU model and core count, or the CUDA device name) and the torch version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()}, {os.cpu_count()} cores"
    return {"hardware": name, "device": device.type, "torch": torch.__version__}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return set(next((line.split(":", 1)[1].split() for line in _cpuinfo() if line.startswith("flags")), []))


def cpu_has_bf16() -> bool:
    """Whether the CPU has bfloat16 instructions (AVX512_BF16 or AMX); without them autocast only emulates it."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_name() -> str:
    """The CPU model and its widest vector ISA from /proc/cpuinfo (Linux), else what the platform module knows."""
    name = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
                platform.processor() or "unknown CPU")
    flags = cpu_flags()
    # The same model name covers CPU generations whose matmul speeds differ severalfold (AVX2 or AVX-512 VNNI).
    isa = next((label for flag, label in (("avx512_vnni", "AVX-512 VNNI"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))
                if flag in flags), None)
    return f"{name} ({isa})" if isa else name


CGROUP = Path("/sys/fs/cgroup")  # where a container sees its own cgroup (v2: cpu.max; v1: cpu/cpu.cfs_quota_us)


def usable_cpus(cgroup: Path | None = None) -> int:
    """The CPUs this process may run on (its affinity), within its cgroup's CPU quota (a container's `cpus:`, rounded
    up): a quota of 2 CPUs on a 64-core host is 2."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cpu_quota(CGROUP if cgroup is None else cgroup)
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def _cpu_quota(cgroup: Path) -> float | None:
    """The cgroup's CPU quota in CPUs (quota / period), or None where it has none or it cannot be read."""
    for quota_file, period_file in ((cgroup / "cpu.max", None),
                                    (cgroup / "cpu" / "cpu.cfs_quota_us", cgroup / "cpu" / "cpu.cfs_period_us")):
        try:
            fields = quota_file.read_text().split()
            if period_file is not None:
                fields.append(period_file.read_text().strip())
            quota, period = int(fields[0]), int(fields[1])
        except (OSError, ValueError, IndexError):  # "max" (no quota), absent, or not what a cgroup writes
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None
