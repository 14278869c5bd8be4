"""The U-Net maps (B, 1, 28, 28) and t to (B, 1, 28, 28) for every shape the config allows."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_mnist.config import ModelConfig
from ddpm_mnist.maths.unet import ResBlock, UNet, count_parameters, timestep_embedding


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
        ModelConfig(base_channels=16, channel_mult=[1, 2, 4], attention_resolutions=[7], dropout=0.0,
                    time_conditioning="scale_shift"),
        ModelConfig(base_channels=16, channel_mult=[2, 4], attention_resolutions=[7], dropout=0.0, patch_size=2),
    ],
    ids=["default", "one-level", "two-levels", "three-levels-multihead", "scale-shift", "patch-2"],
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


@pytest.mark.parametrize("patch_size", [1, 2])
def test_a_model_that_learns_its_variance_outputs_v_second(patch_size: int) -> None:
    """Twice the channels: the prediction, then v; each channel maps back to its own pixels."""
    cfg = ModelConfig(base_channels=16, channel_mult=[1, 2], attention_resolutions=[], dropout=0.0,
                      patch_size=patch_size, learn_variance=True)
    model = randomize(UNet(cfg)).eval()
    assert model.out_channels == 2
    out = model(torch.randn(3, 1, 28, 28), torch.tensor([0, 500, 999]))
    assert out.shape == (3, 2, 28, 28) and not torch.allclose(out[:, 0], out[:, 1])
    v_channels = slice(patch_size**2, None)  # the pixel shuffle makes channel c of out_conv's c r^2 .. (c + 1) r^2 - 1
    with torch.no_grad():
        model.out_conv.weight[v_channels].zero_()
        model.out_conv.bias[v_channels].zero_()
    out = model(torch.randn(3, 1, 28, 28), torch.tensor([0, 500, 999]))
    assert out[:, 1].abs().max() == 0 and out[:, 0].abs().max() > 0


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


def test_scale_shift_scales_and_shifts_the_second_norm_by_the_time_embedding() -> None:
    """ResBlock with scale_shift: h = conv2(silu(norm2(conv1(silu(norm1(x)))) * (1 + scale) + shift)) + skip(x),
    with (scale, shift) the two halves of the projected embedding (improved-diffusion's order)."""
    torch.manual_seed(0)
    block = randomize(ResBlock(8, 16, 12, dropout=0.0, groups=4, scale_shift=True)).eval()
    x, temb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)
    emb = block.time_proj(torch.nn.functional.silu(temb))
    scale, shift = emb[:, :16, None, None], emb[:, 16:, None, None]
    h = block.conv1(torch.nn.functional.silu(block.norm1(x)))
    h = torch.nn.functional.group_norm(h, 4, block.norm2.weight, block.norm2.bias) * (1 + scale) + shift
    expected = block.skip(x) + block.conv2(torch.nn.functional.silu(h))
    torch.testing.assert_close(block(x, temb), expected)
    assert block.time_proj.out_features == 32 and ResBlock(8, 16, 12, 0.0, 4).time_proj.out_features == 16


def test_patch_size_2_starts_at_14x14_and_maps_each_patch_back_to_its_pixels() -> None:
    """patch_size 2: the input conv sees the 4 pixels of each 2x2 patch as channels at 14x14, and
    the output conv's 4 channels are shuffled back to those 4 pixels."""
    model = randomize(UNet(ModelConfig(base_channels=16, channel_mult=[2, 4], attention_resolutions=[],
                                       patch_size=2))).eval()
    assert model.input_conv.in_channels == 4 and model.out_conv.out_channels == 4
    seen = []
    model.input_conv.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    x = torch.randn(2, 1, 28, 28)
    out = model(x, torch.tensor([3, 700]))
    assert seen == [(2, 4, 14, 14)] and out.shape == (2, 1, 28, 28)
    # the only weights that differ from the same U-Net at 28x28: the input conv's 3 more input
    # channels (16 filters) and the output conv's 3 more filters (of 32 channels, with biases)
    at_28 = UNet(ModelConfig(base_channels=16, channel_mult=[2, 4], attention_resolutions=[]))
    assert count_parameters(model) == count_parameters(at_28) + 3 * 9 * 16 + 3 * (9 * 32 + 1)
