"""What a training run shows of its EMA model: preview grids and classifier metrics, as `loop.Hooks`.

The CLI builds these and hands them to `train`, so the training loop itself knows nothing of
sampling or evaluation. Both draw EMA samples with train.preview_sampler at train.preview_steps
(by default the ancestral loop at 50 steps: the fastest setting that `ddpm eval --sweep` found as
good as the full loop) from fixed noise: the same noise at every call, so successive grids show
the same digits taking shape.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ddpm_mnist.evaluate import Reference, training_metrics
from ddpm_mnist.images import save_grid
from ddpm_mnist.loop import Hooks
from ddpm_mnist.maths.samplers import NoiseSource, sampler_for
from ddpm_mnist.rng import EVAL_NOISE, PREVIEW_NOISE, derive_seed
from ddpm_mnist.sample import for_images, generate

if TYPE_CHECKING:
    from ddpm_mnist.config import Config
    from ddpm_mnist.device import Runtime

METRICS = ("fid_mnist", "inception_score", "confidence", "class_kl")  # logged as eval/<name>


class EMASamples:
    """EMA samples from fixed noise with train.preview_sampler at train.preview_steps (built on first use)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._sampler = None

    def __call__(self, model: nn.Module, runtime: Runtime, stream: int, n: int) -> torch.Tensor:
        """n images (n, 1, 28, 28) in [-1, 1], the same noise at every call."""
        device = runtime.device
        if self._sampler is None:  # the preview sampler (DDIM: eta 0) with the sample section's clipping
            sample = dataclasses.replace(self.cfg.sample, sampler=self.cfg.preview_sampler,
                                         steps=self.cfg.preview_steps, eta=0.0, sigma_schedule="spaced")
            self._sampler = sampler_for(dataclasses.replace(self.cfg, sample=sample), device)
        noise = NoiseSource(derive_seed(self.cfg.seed, stream), range(n), device, stream)
        model = for_images(model, self.cfg, range(n), device)  # a conditional model: digit k mod 10, sample.guidance
        return generate(model, self._sampler, noise, runtime, static=device.type == "cuda")


class Preview:
    """The preview hook: train.preview_n EMA samples as `<run>/samples/step_N.png`; returns the grid."""

    def __init__(self, samples: EMASamples, n: int, folder: Path) -> None:
        self.samples, self.n, self.folder = samples, n, folder
        self.nrow = 10 if samples.cfg.model.num_classes else None  # conditional: a column per digit

    def __call__(self, model: nn.Module, runtime: Runtime, step: int) -> torch.Tensor:
        images = self.samples(model, runtime, PREVIEW_NOISE, self.n)
        return save_grid(images, self.folder / f"step_{step:09d}.png", self.nrow)


class Metrics:
    """The metrics hook: classifier metrics (evaluate.py) of train.eval_n EMA samples against the test set."""

    def __init__(self, samples: EMASamples, cfg: Config) -> None:
        self.samples, self.cfg = samples, cfg
        self._reference: Reference | None = None

    def __call__(self, model: nn.Module, runtime: Runtime) -> dict[str, float]:
        if self._reference is None:
            self._reference = Reference.test_set(self.cfg.data.root, self.cfg.data.download, runtime.device)
        metrics = training_metrics(self._reference, self.samples(model, runtime, EVAL_NOISE, self.cfg.train.eval_n))
        return {key: metrics[key] for key in METRICS}


def training_hooks(cfg: Config) -> Hooks:
    """The CLI's hooks: a preview grid every train.sample_every steps, metrics every train.eval_every."""
    samples = EMASamples(cfg)
    return Hooks(preview=Preview(samples, cfg.train.preview_n, cfg.run_dir / "samples"),
                 metrics=Metrics(samples, cfg) if cfg.train.eval_every else None)
