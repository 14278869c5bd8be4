"""Where and in what precision a command runs: decided once, at the edge, by `setup_runtime`.

train, sample, eval and scripts/bench.py each call `setup_runtime` once. It picks the device, sets
the process-wide backend switches (cuDNN autotuning, TF32) and torch's CPU threads, and, for
training, seeds torch's global generator; nothing else in the package touches them. On the CPU,
`Runtime.share_cpu()` between steps lets the thread count follow what other processes use.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from ddpm_mnist.config import RuntimeConfig
from ddpm_mnist.errors import UserError
from ddpm_mnist.rng import DROPOUT, derive_seed


class CpuThreads:
    """torch's CPU threads while a run goes on: all `cores` while the machine is otherwise idle, one
    fewer for each core that other processes keep busy, never fewer than one (runtime.threads: 0).

    OpenMP splits every operation across the threads and waits for the last of them: one thread on a
    core that another busy process also wants holds every operation up, while a thread per free core
    keeps the pace of that core. `adapt()` is called between steps; every `every` seconds (by `clock`) it reads how
    much CPU time the machine spent outside this process (`read`: seconds since boot of the wall
    clock, of all busy time on the cores this process may use, and of this process's own CPU time)
    and sets the thread count from it.
    """

    def __init__(self, cores: int, every: float = 2.0, read: Callable[[], tuple[float, float, float]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cores, self.every, self.clock = cores, every, clock
        self.read = read or read_cpu_use
        self.last = self.read()
        self.due = self.last[0] + every

    def adapt(self) -> None:
        if self.clock() < self.due:  # between readings: one clock call a step, no file read
            return
        wall, busy, own = self.read()
        elapsed = wall - self.last[0]
        self.due = wall + self.every
        others = max(0.0, (busy - self.last[1]) - (own - self.last[2])) / elapsed  # in cores
        self.last = (wall, busy, own)
        wanted = min(self.cores, max(1, self.cores - math.floor(others + 0.6)))  # 0.4 of a core taken counts
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)


def read_cpu_use() -> tuple[float, float, float]:
    """(wall clock, busy seconds of the cores this process may use, this process's CPU seconds).

    Busy time is /proc/stat's user, nice, system, irq and softirq of those cores: not steal, the time
    a hypervisor gave to other machines, which fewer threads here would not get back."""
    tick = os.sysconf("SC_CLK_TCK")
    allowed = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    busy = 0
    with open("/proc/stat", encoding="ascii") as stat:
        for line in stat:
            fields = line.split()
            if fields and fields[0] in allowed:
                user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[1:8])
                busy += user + nice + system + irq + softirq
    return time.monotonic(), busy / tick, time.process_time()


def cpu_threads(threads: int, device: torch.device, fixed_by_environment: bool) -> CpuThreads | None:
    """Set torch's CPU threads for runtime.threads (N: exactly N); return the governor of `0` (auto),
    or None where the count stays as it is: not a CPU run, OMP_NUM_THREADS set (torchrun sets it to 1
    per process), or no /proc to read (not Linux)."""
    if threads:
        torch.set_num_threads(threads)
        return None
    if device.type != "cpu" or fixed_by_environment:
        return None
    try:
        return CpuThreads(len(os.sched_getaffinity(0)))
    except (OSError, AttributeError, ValueError):
        return None


@dataclass(frozen=True)
class Runtime:
    """The device a command runs on and its autocast dtype (None: float32), with a line saying why,
    and on the CPU with runtime.threads: 0, the governor of its thread count."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    precision_note: str
    threads: CpuThreads | None = None

    def share_cpu(self) -> None:
        """Between steps: follow the CPU time other processes use with the thread count (see `CpuThreads`)."""
        if self.threads is not None:
            self.threads.adapt()


def setup_runtime(
    cfg: RuntimeConfig, device_name: str | None = None, *, local_rank: int | None = None, seed: int | None = None,
    rank: int = 0,
) -> Runtime:
    """Pick the device (`device_name` overrides runtime.device), set the global backend switches,
    and, given the run's `seed`, seed torch's global generator with this rank's dropout stream.

    Under torchrun (`local_rank`), CUDA means this process's GPU.
    """
    device = pick_device(device_name or cfg.device)
    if device.type == "cuda" and local_rank is not None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convolutions (Ampere and later)
        torch.backends.cudnn.allow_tf32 = True
        if cfg.deterministic:
            # cuBLAS needs a fixed workspace before its first call; cuDNN's autotuner may pick another
            # algorithm each run, and some backward kernels accumulate with atomics in any order
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolutions once
    if seed is not None:
        torch.manual_seed(derive_seed(seed, DROPOUT, rank))  # CPU and every CUDA device: what dropout draws from
    dtype, note = autocast_dtype(device, cfg.mixed_precision)
    return Runtime(device, dtype, note, cpu_threads(cfg.threads, device, "OMP_NUM_THREADS" in os.environ))


def autocast(runtime: Runtime, *, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
    """The runtime's autocast context (a no-op in float32). Inside a CUDA graph, pass cache_enabled=False."""
    if runtime.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(runtime.device.type, dtype=runtime.autocast_dtype, cache_enabled=cache_enabled)


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
    """The autocast dtype for `runtime.mixed_precision` (None: float32) and a line saying why."""
    if mode == "fp32":
        return None, "float32 (mixed_precision: fp32)"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16 autocast (CUDA)"
        if mode == "bf16":
            raise UserError("runtime.mixed_precision: bf16 asked for, but this GPU does not support bf16")
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


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory where the work will run: the GPU's on CUDA, MemAvailable on Linux; None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
