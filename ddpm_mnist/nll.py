"""`ddpm eval --nll`: the variational bound of a checkpoint on MNIST's test digits, in bits per
dimension, term by term (`maths.likelihood`).

Each of the first n test digits, scaled to [-1, 1] from its 256 grey levels (no dequantisation
noise: the decoder's bins are the data's own, as in improved-diffusion's `image_nll.py`), gets the
prior term, the decoder term at t = 0, and the sum of the step terms over t = 1 .. T-1: exact
(every t) by default, or estimated from K stratified timesteps per image. The standard error is
that of the mean over the n digits (it shrinks as 1 / sqrt(n)) and includes the stratified
estimate's own spread.

The model runs in float32 whatever `runtime.mixed_precision` says: at small t the step terms
divide by variances near 1e-4, where bf16's three digits would dominate the bound. A conditional
model is measured by its unconditional half, the bound on p(x). x0_hat is clipped to [-1, 1] and
the step's variance is `sample.variance_type`'s: the fixed one, or the one a model with
`model.learn_variance` outputs (learned_range), as improved-diffusion's `calc_bpd_loop` computes it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ddpm_mnist import checkpoint as ckpt
from ddpm_mnist.data import load_mnist, to_model_range
from ddpm_mnist.device import setup_runtime
from ddpm_mnist.errors import UserError
from ddpm_mnist.maths import bound, likelihood
from ddpm_mnist.paths import check_paths, check_suffix, ensure_writable, write_text

NLL_N = 100  # test digits by default: the exact bound makes T model calls per digit
NLL_BATCH = 100
IMAGE_DIMS = 28 * 28


class Unconditional(torch.nn.Module):
    """A conditional model asked for no class: the model of p(x)."""

    def __init__(self, model: torch.nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model, self.num_classes = model, num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t, torch.full_like(t, self.num_classes))


def measure_nll(ckpt_path: Path, *, n: int | None, timesteps: int | None, seed: int | None, use_ema: bool | None,
                device_name: str | None, data_root: str | None) -> dict[str, Any]:
    """The bound of a checkpoint on its first n test digits, checked arguments first: a report for
    `format_nll` and JSON."""
    n = NLL_N if n is None else n
    checkpoint = ckpt.load(ckpt_path)
    cfg = checkpoint.config
    T = cfg.schedule.num_timesteps
    if timesteps is not None and not 1 <= timesteps <= T - 1:
        raise UserError(f"--nll-timesteps {timesteps}: give 1 to {T - 1} (T - 1; leave it out for every timestep)")
    images, _ = load_mnist(data_root or cfg.data.root, train=False, download=cfg.data.download)
    if not 2 <= n <= len(images):
        raise UserError(f"--n {n}: --nll measures 2 to {len(images):,} test digits (default {NLL_N})")
    runtime = setup_runtime(cfg.runtime, device_name)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 means float32 here
    model = checkpoint.build_model(cfg.sample.use_ema if use_ema is None else use_ema).to(runtime.device)
    if cfg.model.num_classes:
        model = Unconditional(model, cfg.model.num_classes)
    seed = cfg.seed if seed is None else seed
    count = T - 1 if timesteps is None else timesteps
    print(f"the bound on {n} test digits: {checkpoint.describe(cfg.sample.use_ema if use_ema is None else use_ema)}, "
          f"{'every timestep' if timesteps is None else f'{timesteps} stratified timesteps'} per digit, "
          f"{cfg.sample.variance_type} variance, float32, {runtime.device}")
    parts: dict[str, list[torch.Tensor]] = {"prior": [], "steps": [], "decoder": []}
    with tqdm(total=(count + 1) * math.ceil(n / NLL_BATCH), unit="step", desc="nll", dynamic_ncols=True) as bar:
        for first in range(0, n, NLL_BATCH):
            indices = range(first, min(first + NLL_BATCH, n))
            x0 = to_model_range(images[indices.start:indices.stop]).to(runtime.device)
            with torch.inference_mode():
                batch = bound.bound(model, cfg.schedule, x0, indices, seed=seed, timesteps=timesteps,
                                    prediction_type=cfg.model.prediction_type,
                                    variance_type=cfg.sample.variance_type, progress=bar.update)
            bar.update(1)
            for key, value in batch.items():
                parts[key].append(value.cpu())
    report = summary({key: torch.cat(value) for key, value in parts.items()}, timesteps, T)
    return {**report, "checkpoint": str(ckpt_path), "step": checkpoint.step, "seed": seed,
            "variance_type": cfg.sample.variance_type}


def summary(parts: dict[str, torch.Tensor], timesteps: int | None, T: int) -> dict[str, Any]:
    """Bits per dimension: the mean over the digits, its standard error, and each part's mean and share."""
    total = likelihood.bits_per_dim(sum(parts.values()), IMAGE_DIMS)  # (n,)
    mean = float(total.mean())
    shares = {}
    for name, value in parts.items():
        part = float(likelihood.bits_per_dim(value, IMAGE_DIMS).mean())
        shares[name] = {"bits_per_dim": part, "share": part / mean}
    return {"bits_per_dim": mean, "standard_error": float(total.std()) / math.sqrt(len(total)), "n": len(total),
            "timesteps": f"all {T}" if timesteps is None else f"{timesteps} stratified", "parts": shares}


def format_nll(report: dict[str, Any]) -> str:
    """The bound and its parts, as a table."""
    lines = [f"{'term':<38} {'bits/dim':>9} {'share':>7}"]
    names = {"prior": "prior, KL(q(x_T | x_0) || N(0, I))", "steps": "steps, the KL terms of t = 1 .. T-1",
             "decoder": "decoder, -log p(x_0 | x_1)"}
    for key, name in names.items():
        part = report["parts"][key]
        value = f"{part['bits_per_dim']:.4f}" if part["bits_per_dim"] >= 1e-3 else f"{part['bits_per_dim']:.1e}"
        lines.append(f"{name:<38} {value:>9} {part['share']:>7.1%}")
    lines.append(f"{'total: the bound on -log p(x)':<38} {report['bits_per_dim']:>9.4f}")
    lines.append(f"n = {report['n']} MNIST test digits, timesteps: {report['timesteps']}; standard error of the "
                 f"mean {report['standard_error']:.4f} bits/dim (it shrinks as 1/sqrt(n))")
    return "\n".join(lines)


def likelihood_bound(ckpt_path: Path | None, *, n: int | None, seed: int | None, timesteps: int | None,
                     device_name: str | None, data_root: str | None, json_path: Path | None,
                     sampling_flags: dict[str, object] | None = None) -> dict[str, Any]:
    """`ddpm eval --nll`: the bound in bits/dim, printed as a table and written as JSON. It samples
    nothing, so `sampling_flags` given (--samples, --sweep, --steps, ...) are refused in one line."""
    given = [flag for flag, value in (sampling_flags or {}).items() if value]
    if given or ckpt_path is None:
        raise UserError("--nll measures the bound of --ckpt on test digits and samples nothing: give --ckpt "
                        "(with --n, --nll-timesteps, --seed, --json), without " + (", ".join(given) or "--samples"))
    if json_path is not None:
        ensure_writable(check_suffix(json_path, "--json", (".json",)))
        check_paths({"--json": json_path}, inputs={"--ckpt": ckpt_path})
    report = measure_nll(ckpt_path, n=n, timesteps=timesteps, seed=seed, use_ema=None, device_name=device_name,
                         data_root=data_root)
    print(format_nll(report))
    if json_path is not None:
        write_text(json_path, json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_path}")
    return report
