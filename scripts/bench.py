"""Benchmark ddpm-mnist's training step and reverse loop on this machine; print a table and JSON.

    python scripts/bench.py [--config configs/cpu.yaml] [--device auto] [--json bench.json]

Measured in one run, on one device:
- training: images/s of the real training step (loop.train_step: the batch from the on-device
  uint8 tensor, noising, forward, loss, backward, clipping, AdamW, EMA), and the same step fed by
  a plain torch DataLoader over torchvision's MNIST with ToTensor and Normalize (the tutorial way);
- the share of a step spent getting the batch;
- achieved FLOP/s of the training step (FLOPs counted by torch.utils.flop_counter) as a fraction
  of this machine's dense matmul rate in the same dtype, measured here;
- sampling: the 1000-step reverse loop for one batch against 1000 bare model forwards at the same
  batch size (the sampler's overhead ratio), in image-steps/s, and the same loop on fixed buffers
  (`generate(static=True)`: one CUDA graph replayed per step on CUDA, the same step run eagerly elsewhere);
- the forward pass's FLOPs and this machine's best dense rate in the same dtype (a large matmul and
  a large 3x3 convolution, measured here): the loop's FLOP ceiling, and the fraction of it reached;
- with --compare: training images/s and sampling image-steps/s for torch.compile on and off and
  channels_last on and off (training), compile and the CUDA graph on and off (sampling), in one run;
- with --options: the reverse loop's image-steps/s for each way of running it (autograd off by
  no_grad or inference_mode, weights cast to bf16, torch.compile, with channels_last too, the
  batch size), with each one's largest difference from the default's images;
- with --busy: the reverse loop and the training step alone and beside a second process that keeps
  one core busy, for each thread setting (all cores, one thread, OpenMP's passive waiting, and
  runtime.threads: 0, the default), each in a process of its own;
- peak memory (process RSS on CPU, torch.cuda.max_memory_allocated on CUDA).

Things compared with each other (our step and the tutorial one, the step and the matmul, the
loop and the forwards) take turns in --rounds rounds, because a shared machine's speed drifts from
minute to minute: a speed (and the FLOP fraction, made of two) is the best round's, a share or an
overhead ratio the median of the ratios within a round.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

# before torch loads: a CUDA build of torch without a GPU has its profiler print "gpuGetDeviceCount failed"
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from ddpm_mnist.config import Config, load_config  # noqa: E402
from ddpm_mnist.device import Runtime, autocast, cpu_has_native_bf16, setup_runtime  # noqa: E402
from ddpm_mnist.errors import UserError  # noqa: E402
from ddpm_mnist.loop import train_step  # noqa: E402
from ddpm_mnist.maths.diffusion import training_losses  # noqa: E402
from ddpm_mnist.maths.samplers import NoiseSource, Sampler, make_sampler  # noqa: E402
from ddpm_mnist.maths.schedule import NoiseSchedule  # noqa: E402
from ddpm_mnist.paths import check_paths, check_suffix, ensure_writable, write_text  # noqa: E402
from ddpm_mnist.sample import generate  # noqa: E402
from ddpm_mnist.trainstate import TrainState, setup_training  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, device: torch.device, repeat: int) -> float:
    """Seconds per call of fn() over `repeat` calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeat


def take_turns(fns: dict[str, tuple[Any, int]], device: torch.device, rounds: int, warm_up: bool = True
               ) -> dict[str, list[float]]:
    """Seconds per call of each fn (name -> (fn, calls per round)), round by round.

    The fns take turns within each round, so that the things compared run minutes (or seconds)
    apart at most: on a shared machine, whose speed drifts, a ratio taken within one round is
    fair where one taken across rounds is not. With warm_up, each fn is first called once,
    untimed (allocations, oneDNN's kernel choice).
    """
    for fn, _ in fns.values() if warm_up else ():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, repeat) in fns.items():
            seconds[name].append(timed(fn, device, repeat))
    return seconds


def ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of numerator / denominator within a round."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def matmul(device: torch.device, dtype: torch.dtype, size: int = 2048) -> tuple[Any, float]:
    """A size x size x size dense matmul in `dtype` and its FLOPs: this machine's reference rate."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return (lambda: a @ b), 2.0 * size**3


def convolution_share(fn: Any, device: torch.device, repeat: int) -> tuple[float, float]:
    """(share of op time spent in convolutions, their seconds per call of fn()), from one torch.profiler run.

    Both come from the same run: the self time of every op named *convolution* (forward and
    backward; on CUDA the device time of their kernels) over the self time of all ops. So the share
    is a share by construction, whatever else the machine is doing.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(repeat):
            fn()
        synchronize(device)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, attribute) for e in events)
    convolutions = sum(getattr(e, attribute) for e in events if "convolution" in e.key.lower())
    return convolutions / total, convolutions / 1e6 / repeat


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def tutorial_loader(root: str, batch_size: int) -> Any:
    """torchvision MNIST -> ToTensor -> Normalize((0.5,), (0.5,)) -> DataLoader(shuffle=True)."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    dataset = datasets.MNIST(root, train=True, download=False, transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)


@dataclass
class Training:
    """What one timed training step needs: the config, runtime, data, schedule and state."""

    cfg: Config
    runtime: Runtime
    batches: Any
    schedule: NoiseSchedule
    state: TrainState

    def step(self) -> None:
        train_step(self.state, self.state.model, self.schedule, self.batches, self.cfg, self.runtime)


def bench_training(training: Training, steps: int, rounds: int, data_root: str) -> dict[str, Any]:
    device, batch_size = training.runtime.device, training.cfg.train.batch_size

    # the same step, fed by the tutorial pipeline: the batch comes from the DataLoader instead
    tutorial = tutorial_loader(data_root, batch_size)
    loader = {"it": iter(tutorial)}
    real_batch = training.batches.batch

    def loader_batch(_: int) -> torch.Tensor:
        try:
            x, _labels = next(loader["it"])
        except StopIteration:  # a new epoch
            loader["it"] = iter(tutorial)
            x, _labels = next(loader["it"])
        return x.to(device, non_blocking=True)

    def loader_step() -> None:
        training.batches.batch = loader_batch
        try:
            training.step()
        finally:
            training.batches.batch = real_batch

    dtype = training.runtime.autocast_dtype or torch.float32
    reference, matmul_flops = matmul(device, dtype)
    turns = take_turns({"step": (training.step, steps), "tutorial_step": (loader_step, steps),
                        "batch": (lambda: real_batch(training.state.step), steps),
                        "tutorial_batch": (lambda: loader_batch(0), steps), "matmul": (reference, 5)},
                       device, rounds)
    seconds, peak = min(turns["step"]), matmul_flops / min(turns["matmul"])

    x0 = real_batch(0)
    timesteps = torch.randint(0, training.schedule.num_timesteps, (batch_size,), device=device)
    with FlopCounterMode(display=False) as counter, autocast(training.runtime):
        training_losses(training.state.model, training.schedule, x0, timesteps, torch.randn_like(x0)).mean().backward()
    training.state.optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    conv_flops = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" in str(op))
    conv_share, conv_seconds = convolution_share(training.step, device, steps)
    return {
        "batch_size": batch_size,
        "images_per_s": batch_size / seconds,
        "step_ms": 1000 * seconds,
        "tutorial_dataloader_images_per_s": batch_size / min(turns["tutorial_step"]),
        "speedup_over_tutorial_dataloader": ratio(turns["tutorial_step"], turns["step"]),
        "batch_fetch_share": ratio(turns["batch"], turns["step"]),
        "tutorial_batch_fetch_share": ratio(turns["tutorial_batch"], turns["step"]),
        "flops_per_step": flops,
        "achieved_flops_per_s": flops / seconds,
        "matmul_flops_per_s": peak,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "fraction_of_matmul_rate": flops / seconds / peak,
        # the convolutions alone: their share of the FLOPs and of the op time, and their own rate
        "convolution_flop_share": conv_flops / flops,
        "convolution_time_share": conv_share,
        "convolution_fraction_of_matmul_rate": conv_flops / conv_seconds / peak,
    }


def bench_sampling(training: Training, batch: int, steps: int, rounds: int) -> dict[str, Any]:
    runtime, model = training.runtime, training.state.ema.module.eval()
    device, prediction_type = runtime.device, training.cfg.model.prediction_type
    reverse = make_sampler("ancestral", training.schedule, steps, prediction_type=prediction_type, device=device)
    x = torch.randn(batch, 1, 28, 28, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)

    @torch.no_grad()
    def bare_forwards() -> None:
        with autocast(runtime):
            for _ in range(steps):
                model(x, t)

    def reverse_loop(sampler: Sampler = reverse, static: bool = False) -> None:
        generate(model, sampler, NoiseSource(0, range(batch), device), runtime, static=static)

    # warm up with a 10-step loop rather than a whole one
    warm_up = make_sampler("ancestral", training.schedule, 10, prediction_type=prediction_type, device=device)
    reverse_loop(warm_up)
    reverse_loop(warm_up, static=True)
    turns = take_turns({"forwards": (bare_forwards, 1), "loop": (reverse_loop, 1),
                        "static_loop": (lambda: reverse_loop(static=True), 1)}, device, rounds, warm_up=False)
    per_round = [loop / forwards for loop, forwards in zip(turns["loop"], turns["forwards"], strict=True)]
    return {
        "batch_size": batch,
        "steps": steps,
        "rounds": rounds,
        "reverse_loop_s": min(turns["loop"]),
        "bare_forwards_s": min(turns["forwards"]),
        "overhead_ratio": statistics.median(per_round),
        "overhead_ratio_per_round": per_round,
        "images_per_s": batch / min(turns["loop"]),
        "image_steps_per_s": batch * steps / min(turns["loop"]),
        # fixed buffers: on CUDA one captured graph per step (sample.cuda_graph), elsewhere the same step eagerly
        "static_loop_s": min(turns["static_loop"]),
        "static_image_steps_per_s": batch * steps / min(turns["static_loop"]),
        "static_speedup": ratio(turns["loop"], turns["static_loop"]),
        "cuda_graph": device.type == "cuda",
    }


def convolution(device: torch.device, dtype: torch.dtype, batch: int = 32, channels: int = 128) -> tuple[Any, float]:
    """A large 3x3 convolution at 28x28 in `dtype` and its FLOPs: the best case of the U-Net's own op."""
    x = torch.randn(batch, channels, 28, 28, device=device, dtype=dtype)
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)

    def run() -> None:
        with torch.inference_mode():
            torch.nn.functional.conv2d(x, w, padding=1)

    return run, 2.0 * batch * channels * 28 * 28 * channels * 9


def forward_ceiling(training: Training, batch: int, rounds: int) -> dict[str, Any]:
    """The forward pass's FLOPs per image, and this machine's best dense rate in the forward's dtype
    (a large matmul or a large convolution, whichever is faster here): together, the loop's limit."""
    runtime, model = training.runtime, training.state.ema.module.eval()
    device = runtime.device
    x = torch.randn(batch, 1, 28, 28, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter, autocast(runtime):
        model(x, t)
    dtype = runtime.autocast_dtype or torch.float32
    (mm, mm_flops), (conv, conv_flops) = matmul(device, dtype), convolution(device, dtype)
    turns = take_turns({"matmul": (mm, 5), "convolution": (conv, 3)}, device, rounds)
    rates = {"matmul": mm_flops / min(turns["matmul"]), "convolution": conv_flops / min(turns["convolution"])}
    return {"forward_flops_per_image": counter.get_total_flops() / batch, "dtype": str(dtype).replace("torch.", ""),
            "matmul_flops_per_s": rates["matmul"], "convolution_flops_per_s": rates["convolution"],
            "ceiling_flops_per_s": max(rates.values())}


class Bf16Weights(torch.nn.Module):
    """The model with its weights cast to bf16 once, fed bf16 images: no autocast, no casts per step."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(torch.bfloat16)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x.to(torch.bfloat16), t, class_labels)


def compiled(model: torch.nn.Module, *, channels_last: bool = False) -> torch.nn.Module:
    """torch.compile of a copy of the model, optionally in channels_last. (Inductor's freezing is
    not among the options: within one process, dynamo reuses the graph already compiled.)"""
    model = copy.deepcopy(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model)


def sampling_options(training: Training, batch: int, with_compile: bool = True
                     ) -> dict[str, tuple[torch.nn.Module, Runtime, Any, int]]:
    """name -> (model, runtime, how autograd is off, batch) of each way of running the reverse loop."""
    runtime, model = training.runtime, training.state.ema.module.eval()
    fp32 = Runtime(runtime.device, None, "float32")
    options = {
        "before: no_grad, autocast": (model, runtime, torch.no_grad, batch),
        "default: inference_mode, autocast": (model, runtime, torch.inference_mode, batch),
    }
    if runtime.autocast_dtype == torch.bfloat16:
        options["weights cast to bf16 once"] = (Bf16Weights(model), fp32, torch.inference_mode, batch)
    if with_compile:
        options["compile"] = (compiled(model), runtime, torch.inference_mode, batch)
        options["compile, channels_last"] = (compiled(model, channels_last=True), runtime, torch.inference_mode,
                                             batch)
    for size in (16, 32, 64, 128):
        if size != batch:
            options[f"default at batch {size}"] = (model, runtime, torch.inference_mode, size)
    return options


def bench_sampling_options(training: Training, batch: int, steps: int, rounds: int, with_compile: bool = True
                           ) -> list[dict[str, Any]]:
    """Image-steps/s of the reverse loop for each option, taking turns, with the first (compiling)
    call's seconds and the largest difference of its images from the default's (the same noise)."""
    device, schedule = training.runtime.device, training.schedule
    prediction = training.cfg.model.prediction_type
    reverse = make_sampler("ancestral", schedule, steps, prediction_type=prediction, device=device)
    warm_up = make_sampler("ancestral", schedule, 5, prediction_type=prediction, device=device)
    runs, first, images = {}, {}, {}
    for name, (model, runtime, grad, size) in sampling_options(training, batch, with_compile).items():
        def run(sampler: Sampler = reverse, model: Any = model, runtime: Runtime = runtime, grad: Any = grad,
                size: int = size, name: str = name) -> None:
            with grad():
                images[name] = generate.__wrapped__(model, sampler, NoiseSource(0, range(size), device), runtime)

        started = time.perf_counter()
        run(warm_up)
        first[name], runs[name] = time.perf_counter() - started, (run, 1)
    turns = take_turns(runs, device, rounds, warm_up=False)
    default = images["default: inference_mode, autocast"]
    rows = []
    for name, seconds in turns.items():
        shared = min(len(default), len(images[name]))
        rows.append({"option": name, "batch_size": len(images[name]), "first_call_s": first[name],
                     "image_steps_per_s": len(images[name]) * steps / min(seconds),
                     "max_difference": float((images[name][:shared] - default[:shared]).abs().max())})
    return rows


def bench_variants(cfg_path: str, sets: list[str], runtime: Runtime, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Training images/s and sampling image-steps/s with torch.compile and channels_last on and off.

    Each variant gets a fresh state; its first steps (compilation included) are untimed. Training
    varies compile x channels_last, sampling compile x the CUDA graph (the fixed-buffer loop).
    """
    device, rows = runtime.device, []
    for compile_model in (False, True):
        for channels_last in (False, True):
            switches = [f"train.compile={compile_model}", f"train.channels_last={channels_last}"]
            cfg = load_config(cfg_path, [*sets, *switches])
            batches, schedule, _, state = setup_training(cfg, runtime)
            forward = torch.compile(state.model) if compile_model else state.model

            def step(state: TrainState = state, forward: Any = forward, cfg: Config = cfg,
                     schedule: NoiseSchedule = schedule, batches: Any = batches) -> None:
                train_step(state, forward, schedule, batches, cfg, runtime)

            for _ in range(3):  # compilation, autotuning
                step()
            seconds = min(take_turns({"step": (step, args.train_steps)}, device, args.rounds, warm_up=False)["step"])
            rows.append({"part": "training", "compile": compile_model, "channels_last": channels_last,
                         "static": None, "cuda_graph": None, "rate": cfg.train.batch_size / seconds,
                         "unit": "images/s"})
        model = state.ema.module.eval()
        if compile_model:
            model = torch.compile(model)
        reverse = make_sampler("ancestral", schedule, args.sample_steps, prediction_type=cfg.model.prediction_type,
                               device=device)
        warm_up = make_sampler("ancestral", schedule, 10, prediction_type=cfg.model.prediction_type, device=device)
        for static in (False, True):
            def loop(sampler: Sampler = reverse, static: bool = static, model: Any = model) -> None:
                noise = NoiseSource(0, range(args.sample_batch), device)
                generate(model, sampler, noise, runtime, static=static)

            loop(warm_up)
            seconds = min(take_turns({"loop": (loop, 1)}, device, args.rounds, warm_up=False)["loop"])
            rows.append({"part": "sampling", "compile": compile_model, "channels_last": None,
                         "static": static, "cuda_graph": static and device.type == "cuda",
                         "rate": args.sample_batch * args.sample_steps / seconds, "unit": "image-steps/s"})
    return rows


# a second process that keeps one core busy: torch on one thread, convolutions until its parent is gone
# (a bench killed by SIGKILL runs no `finally`: the competitor then notices it was orphaned and ends)
COMPETITOR = """import os, sys, torch
torch.set_num_threads(1)
parent = int(sys.argv[1])
x, conv = torch.randn(64, 16, 28, 28), torch.nn.Conv2d(16, 16, 3, padding=1)
with torch.no_grad():
    while os.getppid() == parent:
        conv(x)
"""


def die_with_parent() -> None:
    """preexec_fn of every child: on Linux, the kernel sends it SIGKILL when bench.py dies, however it dies."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM ends bench.py through its `finally` blocks, which stop the processes it started."""
    raise SystemExit(143)


def measure_child(training: Training, part: str, batch: int, seconds: float) -> float:
    """--child: the rate of `part` in this process, for at least `seconds`: the reverse loop in
    20-step runs (image-steps/s) or the training step (images/s), each with the threads its command
    has (sampling: the governor follows the machine; training: one count for the run)."""
    runtime, device = training.runtime, training.runtime.device
    if part == "train":
        fixed = setup_runtime(training.cfg.runtime, str(device), training=True)

        def work() -> None:
            training.step()
            fixed.share_cpu()  # as the training loop calls it between steps

        amount = training.cfg.train.batch_size
    else:
        sampler = make_sampler("ancestral", training.schedule, 20, prediction_type=training.cfg.model.prediction_type,
                               device=device)
        model = training.state.ema.module.eval()

        def work() -> None:
            generate(model, sampler, NoiseSource(0, range(batch), device), runtime)

        amount = batch * 20
    work()
    started, done = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        work()
        done += amount
    return done / (time.perf_counter() - started)


def thread_settings() -> dict[str, tuple[dict[str, str], str]]:
    """name -> (environment, runtime.threads) of each thread setting --busy compares."""
    cores = len(os.sched_getaffinity(0))
    return {
        f"{cores} threads, fixed": ({}, str(cores)),
        "1 thread": ({}, "1"),
        f"{cores} threads, passive waiting": ({"OMP_WAIT_POLICY": "PASSIVE"}, str(cores)),
        "runtime.threads: 0 (default)": ({}, "0"),
    }


def bench_busy(args: argparse.Namespace, rounds: int) -> list[dict[str, Any]]:
    """Each thread setting's rates alone and beside COMPETITOR, for the reverse loop and the training
    step; each measurement is a fresh process (OpenMP reads its wait policy once, at start), and the
    settings take turns round by round."""
    rates: dict[tuple[str, bool], list[dict[str, float]]] = {}
    for _ in range(rounds):
        for name, (env, threads) in thread_settings().items():
            for busy in (False, True):
                rates.setdefault((name, busy), []).append(child_rates(args, env, threads, busy))
    rows = []
    for name in thread_settings():
        for part, unit in (("sample", "image-steps/s"), ("train", "images/s")):
            alone = max(r[part] for r in rates[(name, False)])
            beside = max(r[part] for r in rates[(name, True)])
            rows.append({"part": part, "threads": name, "alone": alone, "beside_one_busy_core": beside,
                         "kept": beside / alone, "unit": unit})
    return rows


def child_rates(args: argparse.Namespace, env: dict[str, str], threads: str, busy: bool) -> dict[str, float]:
    """One --child measurement (the loop's and the step's rates) in a process of its own, with a
    competitor beside it if `busy`."""
    command = [sys.executable, __file__, "--child", "--config", args.config, "--sample-batch", str(args.sample_batch),
               "--busy-seconds", str(args.busy_seconds), *[f"--set={item}" for item in args.sets],
               f"--set=runtime.threads={threads}"]
    if args.device:
        command += ["--device", args.device]
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR, str(os.getpid())],
                                  preexec_fn=die_with_parent) if busy else None
    try:
        with subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, preexec_fn=die_with_parent) as child:
            try:
                stdout, stderr = child.communicate()
            finally:
                child.kill()  # a no-op once it has ended; ends it when bench.py is stopped meanwhile
        done = subprocess.CompletedProcess(command, child.returncode, stdout, stderr)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if done.returncode != 0:
        fail(f"--busy: the measuring process failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit code 2 (argparse's own errors too)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def positive(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail  # type: ignore[method-assign]
    parser.add_argument("--config", default="configs/cpu.yaml")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda (default: the config's)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config override")
    parser.add_argument("--train-steps", type=positive, default=20, help="timed training steps per round")
    parser.add_argument("--rounds", type=positive, default=3,
                        help="rounds in which the compared things take turns (ratios: the median round)")
    parser.add_argument("--sample-batch", type=positive, default=16)
    parser.add_argument("--sample-steps", type=positive, default=1000)
    parser.add_argument("--compare", action="store_true",
                        help="also time compile and channels_last on and off, and the CUDA graph on and off")
    parser.add_argument("--options", action="store_true",
                        help="also time the reverse loop's options: inference_mode, bf16 weights, compile, batch sizes")
    parser.add_argument("--option-steps", type=positive, default=200, help="reverse steps of each --options loop")
    parser.add_argument("--no-compile", action="store_true", help="--options without the torch.compile ones")
    parser.add_argument("--busy", action="store_true",
                        help="also time each thread setting alone and beside a process that keeps one core busy")
    parser.add_argument("--busy-seconds", type=positive, default=8, help="seconds of each --busy measurement")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one --busy measurement
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return bench(args)
    except UserError as exc:
        fail(str(exc))


def bench(args: argparse.Namespace) -> int:
    """Measure, print the table, write the JSON; returns the exit code."""
    if args.json:  # before minutes of measuring
        ensure_writable(check_suffix(args.json, "--json", (".json",)))
        check_paths({"--json": args.json}, inputs={"--config": Path(args.config)})
    cfg = load_config(args.config, args.sets)
    runtime = setup_runtime(cfg.runtime, args.device, seed=cfg.seed)
    device = runtime.device
    batches, schedule, _, state = setup_training(cfg, runtime)
    training = Training(cfg, runtime, batches, schedule, state)
    if args.child:
        print(json.dumps({part: measure_child(training, part, args.sample_batch, args.busy_seconds)
                          for part in ("sample", "train")}))
        return 0
    report: dict[str, Any] = {
        "machine": {"cpu": cpu_name(), "cores": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "torch": str(torch.__version__),
        "device": str(device),
        "precision": runtime.precision_note,
        "config": args.config,
        "parameters": sum(p.numel() for p in state.model.parameters()),
        "compile": cfg.train.compile,
        "channels_last": cfg.train.channels_last,
    }
    report["training"] = bench_training(training, args.train_steps, args.rounds, cfg.data.root)
    report["sampling"] = bench_sampling(training, args.sample_batch, args.sample_steps, args.rounds)
    ceiling = forward_ceiling(training, args.sample_batch, args.rounds)
    report["sampling"] |= {"forward": ceiling, "fraction_of_ceiling": report["sampling"]["image_steps_per_s"]
                           * ceiling["forward_flops_per_image"] / ceiling["ceiling_flops_per_s"]}
    report["peak_memory_mb"] = peak_memory_mb(device)
    if args.compare:
        report["variants"] = bench_variants(args.config, args.sets, runtime, args)
    if args.options:
        report["sampling_options"] = bench_sampling_options(training, args.sample_batch, args.option_steps,
                                                            args.rounds, not args.no_compile)
        for row in report["sampling_options"]:
            row["fraction_of_ceiling"] = (row["image_steps_per_s"] * ceiling["forward_flops_per_image"]
                                          / ceiling["ceiling_flops_per_s"])
    if args.busy:
        report["busy"] = bench_busy(args, args.rounds)

    tr, sa = report["training"], report["sampling"]
    rows = [
        ("device / precision", f"{report['device']} / {report['precision']}"),
        ("model", f"{report['parameters']:,} parameters ({args.config})"),
        ("training images/s", f"{tr['images_per_s']:.1f} (batch {tr['batch_size']})"),
        ("  fed by a tutorial DataLoader", f"{tr['tutorial_dataloader_images_per_s']:.1f} images/s "
                                           f"(ours is {tr['speedup_over_tutorial_dataloader']:.2f}x)"),
        ("  share of a step getting the batch", f"{100 * tr['batch_fetch_share']:.2f}% (the tutorial DataLoader's "
                                                f"batch: {100 * tr['tutorial_batch_fetch_share']:.1f}%)"),
        ("  achieved FLOP/s", f"{tr['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = "
                              f"{100 * tr['fraction_of_matmul_rate']:.0f}% of this machine's {tr['matmul_dtype']} "
                              f"matmul ({tr['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s)"),
        ("  of which convolutions", f"{100 * tr['convolution_flop_share']:.0f}% of the FLOPs in "
                                    f"{100 * tr['convolution_time_share']:.0f}% of the op time, at "
                                    f"{100 * tr['convolution_fraction_of_matmul_rate']:.0f}% of matmul"),
        (f"sampling {sa['steps']} steps, batch {sa['batch_size']}", f"{sa['reverse_loop_s']:.2f} s "
                                                                      f"({sa['images_per_s']:.2f} images/s)"),
        (f"  {sa['steps']} bare forwards", f"{sa['bare_forwards_s']:.2f} s"),
        ("  sampler overhead ratio", f"{sa['overhead_ratio']:.3f}"),
        ("  image-steps/s", f"{sa['image_steps_per_s']:.0f}; on fixed buffers"
                            + (" with a CUDA graph" if sa["cuda_graph"] else "")
                            + f" {sa['static_image_steps_per_s']:.0f} ({sa['static_speedup']:.2f}x)"),
        ("peak memory", f"{report['peak_memory_mb']:.0f} MB"),
        ("machine", f"{report['machine']['cpu']}, {report['machine']['cores']} threads, torch {report['torch']}"),
    ]
    fw = sa["forward"]
    rows.insert(-2, ("  FLOP ceiling", f"{fw['forward_flops_per_image'] / 1e6:.0f} MFLOP a forward per image; "
                     f"{fw['dtype']} matmul {fw['matmul_flops_per_s'] / 1e9:.0f}, convolution "
                     f"{fw['convolution_flops_per_s'] / 1e9:.0f} GFLOP/s: the loop reaches "
                     f"{100 * sa['fraction_of_ceiling']:.0f}% of the faster"))
    for row in report.get("sampling_options", []):
        rows.append((f"sampling option: {row['option']}", f"{row['image_steps_per_s']:.0f} image-steps/s at batch "
                     f"{row['batch_size']} ({100 * row['fraction_of_ceiling']:.0f}% of the ceiling), first call "
                     f"{row['first_call_s']:.1f} s, images differ by {row['max_difference']:.1e}"))
    for row in report.get("busy", []):
        rows.append((f"{row['part']}, {row['threads']}", f"{row['alone']:.0f} {row['unit']} alone, "
                     f"{row['beside_one_busy_core']:.0f} beside a busy core ({100 * row['kept']:.0f}% kept)"))
    for row in report.get("variants", []):
        switches = [f"compile {'on' if row['compile'] else 'off'}"]
        if row["channels_last"] is not None:
            switches.append(f"channels_last {'on' if row['channels_last'] else 'off'}")
        if row["part"] == "sampling":
            what = "CUDA graph" if device.type == "cuda" else "fixed buffers"
            switches.append(f"{what} {'on' if row['static'] else 'off'}")
        rows.append((f"{row['part']}: {', '.join(switches)}", f"{row['rate']:.0f} {row['unit']}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    text = json.dumps(report, indent=2)
    if args.json:
        write_text(args.json, text + "\n")
        print(f"wrote {args.json}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
