"""Each image's training timestep: uniform (Algorithm 1) or stratified over the batch (low-discrepancy, VDM)."""

from __future__ import annotations

import pytest
import torch
from helpers import smoke_run

import ddpm_mnist.loop as loop
from ddpm_mnist.config import Config
from ddpm_mnist.maths.diffusion import training_timesteps


@pytest.mark.parametrize("batch, T", [(64, 1000), (7, 1000), (1000, 1000), (16, 10)])
def test_stratified_timesteps_are_the_formula_and_fill_every_stratum_once(batch: int, T: int) -> None:
    generator = torch.Generator().manual_seed(3)
    t = training_timesteps(T, batch, "stratified", generator)
    u = torch.rand((), dtype=torch.float64, generator=torch.Generator().manual_seed(3))  # its one draw
    expected = [int(T * ((float(u) + i / batch) % 1)) for i in range(batch)]
    assert t.dtype == torch.int64 and t.tolist() == expected
    assert evenly_spaced(t.tolist(), T)


def evenly_spaced(t: list[int], T: int) -> bool:
    """Whether the t of a batch of B lie T / B apart around the circle 0..T-1 (floor or ceil of it):
    one in each of B equal strata."""
    ordered = sorted(t)
    gaps = [b - a for a, b in zip(ordered, ordered[1:], strict=False)] + [ordered[0] + T - ordered[-1]]
    return 0 <= ordered[0] and ordered[-1] < T and set(gaps) <= {T // len(t), -(-T // len(t))}


def test_each_stratified_timestep_is_uniform_over_0_to_T_minus_1() -> None:
    """Across batches, image i's t covers 0..T-1 evenly: the loss is Algorithm 1's in expectation."""
    generator = torch.Generator().manual_seed(0)
    T, draws = 10, 20_000
    first = torch.stack([training_timesteps(T, 4, "stratified", generator)[0] for _ in range(draws)])
    counts = torch.bincount(first, minlength=T).float()
    assert counts.shape == (T,) and (counts / draws - 1 / T).abs().max() < 0.01


def test_uniform_timesteps_are_algorithm_1s_draw() -> None:
    t = training_timesteps(1000, 32, "uniform", torch.Generator().manual_seed(5))
    assert torch.equal(t, torch.randint(0, 1000, (32,), generator=torch.Generator().manual_seed(5)))


@pytest.mark.slow
def test_training_uses_the_configured_sampler(smoke_cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    real, seen = loop.training_losses, []

    def recording(model, schedule, x0, t, *args: object) -> torch.Tensor:
        seen.append(t.clone())
        return real(model, schedule, x0, t, *args)

    monkeypatch.setattr(loop, "training_losses", recording)
    smoke_run(smoke_cfg, "train.steps=2", "train.sample_every=0", "name=stratified",
              "train.timestep_sampling=stratified")
    assert len(seen) == 2 and all(evenly_spaced(t.tolist(), 1000) for t in seen)
    assert not torch.equal(seen[0], seen[1])  # a fresh offset each step
