"""scripts/bench.py runs end to end on the tiny config and reports every number the README quotes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_ROOT, ROOT, SMOKE

BENCH = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--config", str(SMOKE), "--train-steps", "2",
         "--sample-batch", "2", "--sample-steps", "3", "--set", f"data.root={FIXTURE_ROOT}"]


def run_bench(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """bench.py in a process group of its own: past `timeout`, the whole group is killed (bench.py and
    every process it started), so that a slow machine fails this test and nothing else."""
    with subprocess.Popen([*BENCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"bench.py ran past {timeout} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_bench_reports_training_sampling_and_memory(tmp_path: Path) -> None:
    """One round of everything: the work is bounded, and the time allowed is the slowest machine's."""
    report_path = tmp_path / "bench.json"
    done = run_bench(["--json", str(report_path), "--rounds", "1", "--compare", "--options", "--no-compile",
                      "--option-steps", "2", "--busy", "--busy-seconds", "1", "--set", f"out_dir={tmp_path / 'runs'}"],
                     tmp_path, timeout=1100)
    assert done.returncode == 0, done.stderr
    assert "gpuGetDeviceCount" not in done.stderr
    report = json.loads(report_path.read_text())
    training, sampling = report["training"], report["sampling"]
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # the smoke config's auto
    assert report["parameters"] > 0
    assert training["batch_size"] == 32 and training["images_per_s"] > 0
    assert training["tutorial_dataloader_images_per_s"] > 0
    for share in ("batch_fetch_share", "tutorial_batch_fetch_share", "convolution_time_share",
                  "convolution_flop_share"):
        assert 0 < training[share] < 1, share
    # FLOPs: a tiny U-Net's forward and backward at batch 32, far below any machine's matmul rate
    assert training["flops_per_step"] > 1e8
    assert 0 < training["fraction_of_matmul_rate"] < 1
    assert 0 < training["convolution_fraction_of_matmul_rate"] < 2
    assert sampling["steps"] == 3 and sampling["batch_size"] == 2 and sampling["overhead_ratio"] > 0
    per_round = sampling["overhead_ratio_per_round"]  # one round; the ratio is the rounds' median
    assert len(per_round) == 1 and sampling["overhead_ratio"] == per_round[0]
    assert report["peak_memory_mb"] > 0
    # the reverse loop on fixed buffers (a CUDA graph per step on CUDA), and its rate
    assert sampling["static_image_steps_per_s"] > 0 and sampling["image_steps_per_s"] > 0
    assert sampling["static_speedup"] > 0 and sampling["cuda_graph"] == torch.cuda.is_available()
    # --compare: compile x channels_last for training, compile x fixed buffers for sampling
    variants = report["variants"]
    training_rows = {(v["compile"], v["channels_last"]) for v in variants if v["part"] == "training"}
    sampling_rows = {(v["compile"], v["static"]) for v in variants if v["part"] == "sampling"}
    both = {(False, False), (False, True), (True, False), (True, True)}
    assert training_rows == both and sampling_rows == both and all(v["rate"] > 0 for v in variants)
    assert "training: compile on, channels_last on" in done.stdout and "image-steps/s" in done.stdout
    for line in ("training images/s", "fed by a tutorial DataLoader", "of which convolutions",
                 "sampler overhead ratio", "peak memory"):
        assert line in done.stdout, line
    assert not (tmp_path / "runs").exists()  # measuring writes no run folder
    # the loop's FLOP ceiling; --options; --busy
    forward = report["sampling"]["forward"]
    assert forward["forward_flops_per_image"] > 1e6 and forward["ceiling_flops_per_s"] > 0
    assert 0 < report["sampling"]["fraction_of_ceiling"] < 1
    options = {row["option"]: row for row in report["sampling_options"]}
    assert {"before: no_grad, autocast", "default: inference_mode, autocast", "default at batch 16"} <= set(options)
    assert not any("compile" in name for name in options)  # --no-compile
    assert options["default: inference_mode, autocast"]["max_difference"] == 0
    assert all(row["image_steps_per_s"] > 0 and row["max_difference"] < 1e-3 for row in options.values())
    busy = {(row["part"], row["threads"]) for row in report["busy"]}
    assert {("sample", "1 thread"), ("train", "runtime.threads: 0 (default)")} <= busy and len(busy) == 8
    assert all(row["alone"] > 0 and row["beside_one_busy_core"] > 0 for row in report["busy"])
    assert "FLOP ceiling" in done.stdout and "beside a busy core" in done.stdout


def test_bench_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    for args, says in ((["--set", "train.lrr=1"], "did you mean train.lr"),
                       ([], "MNIST not found"),  # the smoke config's relative data root, from tmp_path
                       (["--rounds", "0"], "--rounds"),
                       (["--json", str(SMOKE / "report.json")], "is a file, not a folder")):
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--config", str(SMOKE), *args],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 2, args
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], done.stderr



def children_of(pid: int) -> set[int]:
    """The processes `pid` started (Linux: /proc/PID/task/*/children)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(child) for child in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent to read its exit."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc (Linux)")
def test_a_killed_bench_takes_the_processes_it_started_with_it(tmp_path: Path) -> None:
    """SIGKILL runs no `finally`: the busy core's competitor once outlived its bench and slowed all that followed."""
    bench = subprocess.Popen([*BENCH, "--rounds", "1", "--busy", "--busy-seconds", "15"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        started: set[int] = set()
        deadline = time.monotonic() + 600
        while len(started) < 2 and time.monotonic() < deadline and bench.poll() is None:
            started = children_of(bench.pid)  # two at once: the measuring child and, beside it, the competitor
            time.sleep(0.2)
        assert len(started) == 2, "bench.py never ran a measurement beside a competitor"
        bench.kill()
        bench.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(map(running, started)):
            time.sleep(0.2)
        alive = [pid for pid in started if running(pid)]
        assert not alive, f"processes bench.py started outlived it: {alive}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bench.pid, signal.SIGKILL)
