"""A small U-Net for 1 x 28 x 28 images with a sinusoidal time embedding.

It maps (x, t) to an output of the same shape as x. It knows nothing about diffusion: what the
output means (epsilon, v or x0) is decided by whoever trains it.
Layout after Ho et al. 2020 (Appendix B) and improved-diffusion: residual blocks with GroupNorm
and SiLU, the time embedding added in every block (or scaling and shifting its second norm),
self-attention at chosen resolutions, and skip connections from every block on the way down to
a block on the way up. Optionally, 2x2 patches of pixels become channels before the first level.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_mnist.config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of t: (B,) -> (B, dim) float32.

    Half the channels are cos(t * f_i), half sin(t * f_i), with f_i = max_period^(-i / (dim / 2)).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _zero(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so its block starts as the identity (improved-diffusion's init)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected time embedding, GroupNorm-SiLU-dropout-conv, plus skip.

    With `scale_shift` the time embedding scales and shifts the second GroupNorm's output instead of
    being added before it (improved-diffusion's use_scale_shift_norm; diffusers' "scale_shift").
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float, groups: int,
                 scale_shift: bool = False) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: (B, in_ch, H, W), temb: (B, time_dim) -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        emb = self.time_proj(F.silu(temb))[:, :, None, None]  # (B, out_ch or 2 * out_ch, 1, 1)
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)  # each (B, out_ch, 1, 1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, num_heads: int, groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, H*W, C / heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C / heads)
        return x + self.proj(out.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: 28 -> 14 -> 7."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour doubling then a 3x3 convolution: 7 -> 14 -> 28."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The residual blocks (each optionally followed by attention) of one resolution."""

    def __init__(self, in_chs: list[int], out_ch: int, time_dim: int, cfg: ModelConfig, attention: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(c, out_ch, time_dim, cfg.dropout, cfg.num_groups, cfg.time_conditioning == "scale_shift")
            for c in in_chs
        )
        self.attentions = nn.ModuleList(
            AttentionBlock(out_ch, cfg.num_heads, cfg.num_groups) if attention else nn.Identity() for _ in in_chs
        )


class UNet(nn.Module):
    """epsilon_theta(x_t, t) (or v, or x0): (B, 1, 28, 28) float, (B,) int64 -> (B, 1, 28, 28); with
    learn_variance, (B, 2, 28, 28): the prediction, then v of the step's variance."""

    def __init__(self, cfg: ModelConfig, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        base = cfg.base_channels
        time_dim = 4 * base
        self.base_channels = base
        self.time_mlp = nn.Sequential(nn.Linear(base, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        # the digit, as diffusers' UNet2DModel(num_class_embeds=...): a learned embedding added to the
        # time embedding; row num_classes is "no class", the unconditional half of guidance
        self.num_classes = cfg.num_classes
        self.class_embedding = nn.Embedding(cfg.num_classes + 1, time_dim) if cfg.num_classes else None
        # patch_size 2: each 2x2 patch of pixels as 4 channels, so the first level is 14x14
        self.patchify = nn.PixelUnshuffle(cfg.patch_size) if cfg.patch_size > 1 else nn.Identity()
        self.unpatchify = nn.PixelShuffle(cfg.patch_size) if cfg.patch_size > 1 else nn.Identity()
        pixels = in_channels * cfg.patch_size**2  # channels of one position at the first level
        self.input_conv = nn.Conv2d(pixels, base, 3, padding=1)

        skip_chs, ch, resolution = self._build_down(cfg, time_dim, image_size // cfg.patch_size)
        scale_shift = cfg.time_conditioning == "scale_shift"
        self.mid_block1 = ResBlock(ch, ch, time_dim, cfg.dropout, cfg.num_groups, scale_shift)
        self.mid_attention = AttentionBlock(ch, cfg.num_heads, cfg.num_groups)
        self.mid_block2 = ResBlock(ch, ch, time_dim, cfg.dropout, cfg.num_groups, scale_shift)
        ch = self._build_up(cfg, time_dim, skip_chs, ch, resolution)
        self.out_norm = nn.GroupNorm(cfg.num_groups, ch)
        # learn_variance: a second channel per pixel, v in [-1, 1] of the step's variance (improved-diffusion's
        # learn_sigma); the pixel shuffle keeps the channels apart, the prediction first
        self.out_channels = in_channels * (2 if cfg.learn_variance else 1)
        self.out_conv = _zero(nn.Conv2d(ch, self.out_channels * cfg.patch_size**2, 3, padding=1))

    def _build_down(self, cfg: ModelConfig, time_dim: int, image_size: int) -> tuple[list[int], int, int]:
        """Down: each level's blocks, then a Downsample except after the last level. Returns the
        channels of every skip (in the order they are pushed), the width and the resolution at the bottom."""
        base = cfg.base_channels
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_chs, ch, resolution = [base], base, image_size
        for level, mult in enumerate(cfg.channel_mult):
            out_ch = base * mult
            in_chs = [ch] + [out_ch] * (cfg.num_res_blocks - 1)
            self.down.append(Level(in_chs, out_ch, time_dim, cfg, resolution in cfg.attention_resolutions))
            ch = out_ch
            skip_chs += [ch] * cfg.num_res_blocks
            if level < len(cfg.channel_mult) - 1:
                self.downsample.append(Downsample(ch))
                skip_chs.append(ch)
                resolution //= 2
        return skip_chs, ch, resolution

    def _build_up(self, cfg: ModelConfig, time_dim: int, skip_chs: list[int], ch: int, resolution: int) -> int:
        """Up: num_res_blocks + 1 blocks per level, each taking one skip; Upsample between levels.
        Returns the width at the top."""
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            out_ch = cfg.base_channels * mult
            in_chs = []
            for _ in range(cfg.num_res_blocks + 1):
                in_chs.append(ch + skip_chs.pop())
                ch = out_ch
            self.up.append(Level(in_chs, out_ch, time_dim, cfg, resolution in cfg.attention_resolutions))
            if level > 0:
                self.upsample.append(Upsample(ch))
                resolution *= 2
        return ch

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, 1, 28, 28), t: (B,) timesteps, class_labels: (B,) digits, or num_classes for
        "no class" (None: no class for all; ignored by an unconditional model) -> (B, out_channels, 28, 28)."""
        temb = self.time_mlp(timestep_embedding(t, self.base_channels).to(x.dtype))  # (B, 4 * base)
        if self.class_embedding is not None:
            if class_labels is None:
                class_labels = torch.full_like(t, self.num_classes)
            temb = temb + self.class_embedding(class_labels)  # (B, 4 * base)
        h = self.input_conv(self.patchify(x))
        skips = [h]
        for i, level in enumerate(self.down):
            for block, attention in zip(level.blocks, level.attentions, strict=True):
                h = attention(block(h, temb))
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)
        h = self.mid_block2(self.mid_attention(self.mid_block1(h, temb)), temb)
        for i, level in enumerate(self.up):
            for block, attention in zip(level.blocks, level.attentions, strict=True):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), temb))
            if i < len(self.upsample):
                h = self.upsample[i](h)
        return self.unpatchify(self.out_conv(F.silu(self.out_norm(h))))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights (2 or more dimensions) only, not on biases and GroupNorm scales (as nanoGPT)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
