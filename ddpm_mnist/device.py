"""Picking the device and the autocast dtype, once, at the edge (train.py and sample.py)."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch

from ddpm_mnist.errors import UserError


def pick_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name} asked for, but CUDA is not available here (try --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name} asked for, but there are {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device mps asked for, but MPS is not available here (try --device cpu)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


@cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (x86 AVX512-BF16 or AMX-BF16).

    There bf16 autocast makes small convnets faster; elsewhere oneDNN emulates bf16 and it is slower.
    """
    if platform.system() != "Linux":
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def autocast_dtype(device: torch.device, mode: str) -> tuple[torch.dtype | None, str]:
    """The autocast dtype for `train.mixed_precision` (None: float32) and a line saying why."""
    if mode == "fp32":
        return None, "float32 (mixed_precision: fp32)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16 autocast (CUDA)"
        if mode == "bf16":
            raise UserError("mixed_precision: bf16 asked for, but this GPU does not support bf16")
        return None, "float32 (this GPU has no bf16)"
    if device.type == "cpu":
        if mode == "bf16":
            native = cpu_has_native_bf16()
            return torch.bfloat16, "bf16 autocast (asked for" + ("" if native else "; this CPU emulates bf16") + ")"
        if cpu_has_native_bf16():
            return torch.bfloat16, "bf16 autocast (this CPU has native bf16)"
        return None, "float32 (this CPU has no native bf16)"
    if mode == "bf16":
        return torch.bfloat16, f"bf16 autocast ({device.type}, asked for)"
    return None, f"float32 ({device.type})"
