"""Forward noising q(x_t | x_0), the training target and loss, and the reverse steps.

Names follow diffusers (`add_noise`, `step`) so that its users feel at home. Timesteps are
0-indexed as stated in `schedule.py`. Shapes: x0, x_t, noise are (B, C, H, W); t is (B,) int64.
"""

from __future__ import annotations

import torch

from ddpm_mnist.schedule import NoiseSchedule


def _at(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, 1) to broadcast over images."""
    return values.index_select(0, t).view(-1, 1, 1, 1)  # (B, 1, 1, 1)


def add_noise(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) in closed form: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, Eq. (4).

    x0, noise: (B, C, H, W); t: (B,) int64 on the same device as the schedule.
    """
    return _at(schedule.sqrt_alphas_cumprod, t) * x0 + _at(schedule.sqrt_one_minus_alphas_cumprod, t) * noise
