"""Where and in what precision a command runs: decided once, at the edge, by `setup_runtime`.

train, sample, eval and scripts/bench.py each call `setup_runtime` once. It picks the device, sets
the process-wide backend switches (cuDNN autotuning, TF32) and torch's CPU threads, and, for
training, seeds torch's global generator; nothing else in the package touches them.

CPU threads with runtime.threads: 0 (auto). Sampling lets the thread count follow what other
processes use (`Runtime.share_cpu()` between steps): its images do not depend on it. Training
cannot: the thread count decides how a gradient's sum is split, so it changes the last bits of the
weights. A training run therefore keeps one count from start to end (every core it may use, or on
`--resume` the count its checkpoint records), so that a resumed run ends bit for bit where an
uninterrupted one does, on a busy machine too; it says once when other processes slow it down.
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
from ddpm_mnist.errors import UserError, note
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

    With `follow=False` (training) the count stays as it is, and the first reading that would have
    lowered it prints one note saying why it does not.
    """

    def __init__(self, cores: int, every: float = 2.0, read: Callable[[], tuple[float, float, float]] | None = None,
                 clock: Callable[[], float] = time.monotonic, follow: bool = True) -> None:
        self.cores, self.every, self.clock, self.follow = cores, every, clock, follow
        self.read = read or read_cpu_use
        self.last = self.read()
        self.due = self.last[0] + every
        self.noted = False

    def adapt(self) -> None:
        if self.clock() < self.due:  # between readings: one clock call a step, no file read
            return
        wall, busy, own = self.read()
        elapsed = wall - self.last[0]
        self.due = wall + self.every
        others = max(0.0, (busy - self.last[1]) - (own - self.last[2])) / elapsed  # in cores
        self.last = (wall, busy, own)
        wanted = min(self.cores, max(1, self.cores - math.floor(others + 0.6)))  # 0.4 of a core taken counts
        threads = torch.get_num_threads()
        if wanted == threads:
            return
        if self.follow:
            torch.set_num_threads(wanted)
        elif wanted < threads and not self.noted:
            self.noted = True
            note(f"other processes keep {others:.1f} of this machine's cores busy: training keeps its {threads} "
                 "CPU threads (one count for the whole run keeps --resume bit-exact) and runs slower beside them; "
                 f"--set runtime.threads={wanted} shares the CPU (the weights then differ in their last bits)")


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


def allowed_cores() -> int:
    """The CPU cores this process may run on (its affinity: taskset, a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_threads(threads: int, device: torch.device, fixed_by_environment: bool, *, training: bool = False,
                recorded: int | None = None) -> tuple[CpuThreads | None, str]:
    """Set torch's CPU threads for runtime.threads and say how (for the run's opening line); return
    the governor that watches the machine between steps, if any.

    N: exactly N, at most the cores this process may use (more only wait for each other). 0 (auto):
    left as it is off the CPU and where OMP_NUM_THREADS decides (torchrun sets it to 1 per process);
    for sampling, the governor follows other processes; for training, one count for the whole run:
    the `recorded` count of the checkpoint it resumes (at most the cores there are), else every core.
    """
    cores = allowed_cores()
    if threads:
        if threads > cores and device.type == "cpu":
            note(f"runtime.threads {threads}: this process may use {cores} CPU core(s), so it runs {cores} "
                 "thread(s); more threads than cores only wait for each other")
            threads = cores
        torch.set_num_threads(threads)
        return None, f"{threads} CPU thread(s), runtime.threads"
    if device.type != "cpu":
        return None, ""
    if fixed_by_environment:
        return None, f"{torch.get_num_threads()} CPU thread(s), OMP_NUM_THREADS"
    if training:
        count = min(recorded or cores, cores)
        if recorded and recorded > cores:
            note(f"--resume: the run trained with {recorded} CPU threads, and this process may use {cores} core(s): "
                 f"it goes on with {cores}, so its weights differ in their last bits from a run that kept {recorded}")
        torch.set_num_threads(count)
        why = "the count the run started with" if recorded else "every core"
        return _governor(cores, follow=False), f"{count} CPU thread(s) for the whole run ({why})"
    return _governor(cores, follow=True), "CPU threads follow the other processes' load"


def _governor(cores: int, follow: bool) -> CpuThreads | None:
    try:
        return CpuThreads(cores, follow=follow)
    except (OSError, ValueError):  # no /proc/stat to read (not Linux)
        return None


@dataclass(frozen=True)
class Runtime:
    """The device a command runs on and its autocast dtype (None: float32), with a line saying why,
    and on the CPU with runtime.threads: 0, the watcher of its thread count."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    precision_note: str
    threads: CpuThreads | None = None
    threads_note: str = ""  # how many CPU threads, and why (empty off the CPU)
    layout_note: str = ""  # training: the memory layout of a step, and why (see `choose_channels_last`)

    def describe(self) -> str:
        """The precision, on the CPU the threads, and in training the memory layout: for a run's opening line."""
        return ", ".join(part for part in (self.precision_note, self.threads_note, self.layout_note) if part)

    def share_cpu(self) -> None:
        """Between steps: follow the CPU time other processes use with the thread count (see `CpuThreads`)."""
        if self.threads is not None:
            self.threads.adapt()


def setup_runtime(
    cfg: RuntimeConfig, device_name: str | None = None, *, local_rank: int | None = None, seed: int | None = None,
    rank: int = 0, training: bool = False, recorded_threads: int | None = None,
) -> Runtime:
    """Pick the device (`device_name` overrides runtime.device), set the global backend switches and
    the CPU threads (`training`: one count for the run, `recorded_threads` on --resume; see
    `cpu_threads`), and, given the run's `seed`, seed torch's global generator with this rank's
    dropout stream.

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
    governor, threads_note = cpu_threads(cfg.threads, device, "OMP_NUM_THREADS" in os.environ, training=training,
                                         recorded=recorded_threads)
    return Runtime(device, dtype, note, governor, threads_note)


LAYOUT_TOLERANCE = 0.05  # channels_last is chosen only when more than this share faster than contiguous
LAYOUT_ROUNDS = 2  # timed rounds in which the two layouts take turns, after an untimed one


def choose_channels_last(seconds: Callable[[bool], float], images: int) -> tuple[bool, str]:
    """train.channels_last: auto. `seconds(channels_last)` times a few training steps of `images`
    images in all in that memory layout. An untimed round (allocations, the kernels' first choices),
    then LAYOUT_ROUNDS in which the layouts take turns, each going first in one, and each keeps its
    best (a busy moment slows one round). Which is faster differs between machines and precisions
    (oneDNN's kernels, cuDNN's tensor cores); contiguous, the layout of the weights as saved, is kept
    unless channels_last is more than LAYOUT_TOLERANCE faster. Returns the choice and the opening
    line's words for it."""
    best = {False: math.inf, True: math.inf}
    for round_ in range(LAYOUT_ROUNDS + 1):
        for layout in (False, True) if round_ % 2 == 0 else (True, False):  # each goes first as often
            taken = seconds(layout)
            if round_:
                best[layout] = min(best[layout], taken)
    rates = {layout: images / taken for layout, taken in best.items()}
    chosen = rates[False] < (1 - LAYOUT_TOLERANCE) * rates[True]
    measured = f"{rates[False]:,.0f} images/s contiguous against {rates[True]:,.0f} channels_last, timed here"
    return chosen, f"{'channels_last' if chosen else 'contiguous'} memory (train.channels_last: auto; {measured})"


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
