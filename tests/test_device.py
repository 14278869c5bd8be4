"""device: torch's CPU threads under runtime.threads, what changing them mid-run does to samples, and
the choice of the training step's memory layout (train.channels_last: auto)."""

from __future__ import annotations

import pytest
import torch
from conftest import SMOKE, run_cli
from helpers import one_line_error

from ddpm_mnist.config import ModelConfig, ScheduleConfig
from ddpm_mnist.device import CpuThreads, Runtime, allowed_cores, choose_channels_last, cpu_threads, read_cpu_use
from ddpm_mnist.maths.samplers import NoiseSource, make_sampler
from ddpm_mnist.maths.schedule import make_schedule
from ddpm_mnist.maths.unet import UNet
from ddpm_mnist.sample import generate

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def keep_threads():
    """Every test here may change torch's thread count: put it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


class FakeMachine:
    """What `read_cpu_use` would say (a call) on a clock that advances one second each time it is
    read (`clock`): in each second `others` cores of busy time are spent outside this process, `own`
    cores inside it. `reads` counts the readings."""

    def __init__(self, others: float, own: float = 1.0) -> None:
        self.others, self.own, self.wall, self.busy, self.mine, self.reads = others, own, 0.0, 0.0, 0.0, 0

    def clock(self) -> float:
        self.wall += 1.0
        self.mine += self.own
        self.busy += self.own + self.others
        return self.wall

    def __call__(self) -> tuple[float, float, float]:
        self.reads += 1
        return self.wall, self.busy, self.mine


@pytest.mark.parametrize("others, threads", [(0.0, 4), (0.3, 4), (0.5, 3), (1.0, 3), (2.0, 2), (3.6, 1), (9.0, 1)])
def test_each_core_other_processes_keep_busy_takes_one_thread(others: float, threads: int) -> None:
    torch.set_num_threads(4)
    machine = FakeMachine(others)
    governor = CpuThreads(4, every=2.0, read=machine, clock=machine.clock)
    governor.adapt()  # one second since the first reading: too soon to judge, and nothing read
    assert torch.get_num_threads() == 4 and machine.reads == 1
    governor.adapt()
    assert torch.get_num_threads() == threads and machine.reads == 2


def test_the_threads_come_back_when_the_other_process_stops() -> None:
    torch.set_num_threads(2)
    machine = FakeMachine(others=1.0)
    governor = CpuThreads(2, every=1.0, read=machine, clock=machine.clock)
    governor.adapt()
    assert torch.get_num_threads() == 1
    machine.others = 0.0
    governor.adapt()
    assert torch.get_num_threads() == 2


def test_a_fixed_count_environment_or_gpu_is_left_alone() -> None:
    assert cpu_threads(1, CPU, fixed_by_environment=False)[0] is None and torch.get_num_threads() == 1
    assert cpu_threads(0, CPU, fixed_by_environment=True)[0] is None
    assert cpu_threads(0, torch.device("cuda"), fixed_by_environment=False) == (None, "")
    governor, says = cpu_threads(0, CPU, fixed_by_environment=False)
    assert isinstance(governor, CpuThreads) and governor.follow and "follow" in says


def test_more_threads_than_cores_run_one_per_core_and_say_so(capsys) -> None:
    """runtime.threads 4096 on one core once spun for minutes: a count above the cores runs one per core."""
    governor, says = cpu_threads(4096, CPU, fixed_by_environment=False)
    cores = allowed_cores()
    assert governor is None and torch.get_num_threads() == cores and says.startswith(f"{cores} CPU thread")
    assert f"this process may use {cores} CPU core(s)" in capsys.readouterr().err


def test_training_keeps_every_core_or_the_recorded_count_for_the_whole_run(capsys) -> None:
    cores = allowed_cores()
    governor, says = cpu_threads(0, CPU, fixed_by_environment=False, training=True)
    assert torch.get_num_threads() == cores and not governor.follow and "for the whole run (every core)" in says
    governor, says = cpu_threads(0, CPU, fixed_by_environment=False, training=True, recorded=1)
    assert torch.get_num_threads() == 1 and "the count the run started with" in says
    assert capsys.readouterr().err == ""
    cpu_threads(0, CPU, fixed_by_environment=False, training=True, recorded=cores + 1)  # a smaller machine now
    assert torch.get_num_threads() == cores and f"it goes on with {cores}" in capsys.readouterr().err
    cpu_threads(3, CPU, fixed_by_environment=False, training=True, recorded=1)  # a count given wins
    assert torch.get_num_threads() == min(3, cores)


def test_training_threads_stay_beside_a_busy_process_and_say_so_once(capsys) -> None:
    """A training run's count never changes (bit-exact resume); the first slowdown is said, once."""
    torch.set_num_threads(2)
    machine = FakeMachine(others=1.0)
    watcher = CpuThreads(2, every=1.0, read=machine, clock=machine.clock, follow=False)
    for _ in range(5):
        watcher.adapt()
        assert torch.get_num_threads() == 2
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "training keeps its 2 CPU threads" in err and "runtime.threads=1" in err


def test_the_proc_readings_move_forward_with_work() -> None:
    wall, busy, own = read_cpu_use()
    torch.randn(512, 512) @ torch.randn(512, 512)
    sum(i * i for i in range(300_000))
    later = read_cpu_use()
    assert later[0] > wall and later[1] >= busy >= 0 and later[2] > own >= 0


def test_changing_the_thread_count_mid_loop_leaves_the_images_alone() -> None:
    """Sampling may change its threads at any step: that changes float rounding (as the batch size
    does), not the images."""
    torch.manual_seed(0)
    model = UNet(ModelConfig(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[14],
                             num_groups=4, dropout=0.0)).eval()
    for p in model.parameters():  # the zero-initialised layers too: a model that does something
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    sampler = make_sampler("ancestral", make_schedule(ScheduleConfig()), 30)

    class Flipping(CpuThreads):
        calls = 0

        def adapt(self) -> None:
            Flipping.calls += 1
            torch.set_num_threads(3 - torch.get_num_threads())  # 1, 2, 1, 2, ...

    torch.set_num_threads(2)
    steady = generate(model, sampler, NoiseSource(1, range(6), CPU), Runtime(CPU, None, "float32"))
    flipping = Runtime(CPU, None, "float32", Flipping(2, read=FakeMachine(0.0)))
    changing = generate(model, sampler, NoiseSource(1, range(6), CPU), flipping)
    assert Flipping.calls == sampler.num_steps  # the loop offers the CPU back at every step
    torch.testing.assert_close(changing, steady, rtol=0, atol=1e-5)


@pytest.mark.parametrize("value, says", [("-1", "runtime.threads: must be >= 0"), ("two", "must be an integer")])
def test_bad_thread_counts_are_one_line(value: str, says: str, capsys) -> None:
    code, _, err = run_cli(capsys, "config", "--config", SMOKE, "--set", f"runtime.threads={value}")
    one_line_error(code, err, says)


@pytest.mark.parametrize("contiguous, channels_last, chosen", [
    (1.00, 0.90, True),  # channels_last 11% faster
    (1.00, 0.97, False),  # 3% faster: within the tolerance, contiguous kept
    (1.00, 1.20, False),  # slower
    (1.05, 1.00, False),  # 5% faster: not more than the tolerance
])
def test_channels_last_is_chosen_only_when_more_than_five_percent_faster(contiguous: float, channels_last: float,
                                                                          chosen: bool) -> None:
    """Fake timings (seconds per call for each layout); no timing is measured."""
    calls: list[bool] = []

    def seconds(layout: bool) -> float:
        calls.append(layout)
        return channels_last if layout else contiguous

    picked, said = choose_channels_last(seconds, 192)
    assert picked is chosen
    assert calls == [False, True, True, False, False, True]  # an untimed round, then two, each first once
    layout = "channels_last" if chosen else "contiguous"
    assert said == (f"{layout} memory (train.channels_last: auto; {192 / contiguous:,.0f} images/s contiguous "
                    f"against {192 / channels_last:,.0f} channels_last, timed here)")


def test_the_layout_choice_keeps_each_layouts_best_round_and_ignores_the_first() -> None:
    """The untimed first round is slow for contiguous (first allocations), and one timed round of it is
    slowed threefold (a busy moment): its best round decides, and contiguous is kept."""
    times = {False: [9.0, 3.0, 1.0], True: [1.0, 0.98, 0.99]}  # each layout's rounds, in order

    def seconds(layout: bool) -> float:
        return times[layout].pop(0)

    picked, said = choose_channels_last(seconds, 64)
    assert picked is False and said.startswith("contiguous memory") and "64 images/s contiguous" in said
