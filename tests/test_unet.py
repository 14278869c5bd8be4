"""The U-Net maps (B, 1, 28, 28) and t to (B, 1, 28, 28) for every shape the config allows."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_mnist.config import ModelConfig
from ddpm_mnist.maths.unet import UNet, count_parameters, timestep_embedding


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised layers weights, so that the output depends on the input."""
    torch.manual_seed(0)
    for p in model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    return model


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(),
        ModelConfig(base_channels=8, channel_mult=[1], num_res_blocks=1, attention_resolutions=[28], num_groups=4),
        ModelConfig(base_channels=16, channel_mult=[1, 2], attention_resolutions=[], num_groups=4),
        ModelConfig(base_channels=16, channel_mult=[1, 2, 4], num_res_blocks=3, attention_resolutions=[14, 7],
                    num_heads=4, dropout=0.0),
    ],
    ids=["default", "one-level", "two-levels", "three-levels-multihead"],
)
def test_maps_images_and_timesteps_to_images(cfg: ModelConfig) -> None:
    model = randomize(UNet(cfg)).eval()
    x = torch.randn(3, 1, 28, 28)
    out = model(x, torch.tensor([0, 500, 999]))
    assert out.shape == (3, 1, 28, 28) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # the time embedding reaches the output: same x, different t, different output
    other = model(x, torch.tensor([999, 500, 0]))
    assert not torch.allclose(out[0], other[0])
    torch.testing.assert_close(out[1], other[1])


def test_fresh_model_outputs_zero_so_the_first_loss_is_the_target_variance() -> None:
    model = UNet(ModelConfig())
    assert model(torch.randn(2, 1, 28, 28), torch.tensor([1, 2])).abs().max() == 0


def test_size_follows_the_config() -> None:
    small = count_parameters(UNet(ModelConfig(base_channels=16)))
    large = count_parameters(UNet(ModelConfig(base_channels=32)))
    assert 3.5 < large / small < 4.1  # conv weights grow with channels squared


def test_timestep_embedding_is_sinusoidal() -> None:
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    freqs = [10_000 ** (-i / 4) for i in range(4)]
    expected = [math.cos(999 * f) for f in freqs] + [math.sin(999 * f) for f in freqs]
    torch.testing.assert_close(emb[2], torch.tensor(expected), atol=1e-4, rtol=0)
