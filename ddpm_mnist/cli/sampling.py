"""The sampling side's commands: `ddpm sample`, `ddpm eval` and `ddpm export`."""

from __future__ import annotations

from pathlib import Path

import typer

from ddpm_mnist.config import SampleRequest
from ddpm_mnist.errors import UserError

SAMPLER_HELP = ("ancestral (Ho et al.), ddim, dpmpp_2m, or in the sigma view euler, euler_ancestral, heun, lms "
                "(give --steps, e.g. 20) (default: ancestral).")


def sample(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint file (e.g. runs/cpu/checkpoints/latest.pt), an "
                              "exported .safetensors file, or a diffusers DDPMPipeline folder."),
    n: int = typer.Option(None, "--n", help="Number of images (default: sample.n, 64)."),
    steps: int = typer.Option(None, "--steps", help="Reverse steps (default: sample.steps; 0 = the full loop of T)."),
    seed: int = typer.Option(None, "--seed", help="Seed (default: the run's seed)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per forward pass; does not change the images "
                                   "(default: sample.batch_size; 0 = the smallest within 5% of the fastest here, "
                                   "timed at start)."),
    sampler: str = typer.Option(None, "--sampler", help=SAMPLER_HELP),
    eta: float = typer.Option(None, "--eta", help="DDIM eta: 0 deterministic (default: 0)."),
    ema: bool = typer.Option(None, "--ema/--no-ema", help="Use the EMA weights (default) or the raw ones."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (default: runtime.device)."),
    out: Path = typer.Option(
        None, "--out", help="Grid PNG (default: <run>/samples/<sampler><steps>_seed<s>_n<n>.png)."
    ),
    images_dir: Path = typer.Option(None, "--images-dir", help="Also write each image as a PNG in this folder."),
    tensor: Path = typer.Option(None, "--tensor", help="Also write all images to one .pt or .npz file (uint8)."),
    trajectory: Path = typer.Option(None, "--trajectory", help="Also write a GIF of the denoising (and a strip PNG)."),
    digit: int = typer.Option(None, "--digit", help="Conditional models: draw only this digit (0-9)."),
    digits: str = typer.Option(
        None, "--digits", help="Conditional models: draw these digits in turn, e.g. 0,3,8 (default: 0 to 9)."
    ),
    guidance: float = typer.Option(
        None, "--guidance", help="Conditional models: guidance weight W (1: plain conditional, 0: unconditional) "
        "(default: sample.guidance)."
    ),
    set_: list[str] = typer.Option(
        None, "--set", help="Override a sample.* or runtime.* key of the stored config, e.g. sample.eta=0.5."
    ),
) -> None:
    """Sample images from a checkpoint with the reverse process (1000 ancestral steps by default)."""
    from ddpm_mnist.sample_files import sample_from_checkpoint

    request = SampleRequest(n=n, steps=steps, seed=seed, batch_size=batch_size, sampler=sampler, eta=eta,
                            use_ema=ema, digits=_digits(digit, digits), guidance=guidance)
    sample_from_checkpoint(ckpt, request=request, device_name=device, out=out, images_dir=images_dir,
                           tensor_path=tensor, trajectory=trajectory, overrides=set_)


SWEEP_HELP = ("Compare settings from the same seeds, e.g. ancestral:1000,ddim:50,dpmpp_2m:20 "
              "(sampler:steps[:spacing]).")
PLOT_HELP = ("With --sweep: also plot fid_mnist against model evaluations (with --guidance W1,W2,...: fid_mnist and "
             "class_accuracy against W).")
NLL_HELP = ("Instead of sampling: the variational bound on -log p(x) of the first --n MNIST test digits "
            "(default 100), in bits/dim, term by term.")
NLL_TIMESTEPS_HELP = ("With --nll: estimate the sum over timesteps from this many stratified ones per digit "
                      "(default: every timestep, exact).")


def eval_(
    ckpt: Path = typer.Option(None, "--ckpt", help="Checkpoint (or exported weights file, or diffusers folder) to "
                              "sample from, then measure."),
    samples: Path = typer.Option(None, "--samples", help="Measure a .pt or .npz file written by ddpm sample --tensor."),
    n: int = typer.Option(None, "--n", help="Number of images (default: sample.n of the checkpoint)."),
    steps: int = typer.Option(None, "--steps", help="Reverse steps (default: sample.steps; 0 = the full loop of T)."),
    sampler: str = typer.Option(None, "--sampler", help=SAMPLER_HELP),
    seed: int = typer.Option(None, "--seed", help="Seed of the samples and of the real floor (default: the run's)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per forward pass (default: sample.batch_size; "
                                   "0 = the smallest within 5% of the fastest here, timed at start)."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
    data: str = typer.Option(None, "--data", help="Folder holding MNIST/raw/ (default: data.root of the run)."),
    json_path: Path = typer.Option(None, "--json", help="Also write the report as JSON."),
    sweep: str = typer.Option(None, "--sweep", help=SWEEP_HELP),
    plot: Path = typer.Option(None, "--plot", help=PLOT_HELP),
    guidance: str = typer.Option(None, "--guidance", help="Conditional models: guidance weight W, or several "
                                 "(1,2,3,5) for one row each."),
    set_: list[str] = typer.Option(None, "--set", help="Override a sample.* or runtime.* key of the stored config, "
                                   "e.g. sample.eta=0.5."),
    nll: bool = typer.Option(False, "--nll", help=NLL_HELP),
    nll_timesteps: int = typer.Option(None, "--nll-timesteps", help=NLL_TIMESTEPS_HELP),
) -> None:
    """Measure sample quality with the project's MNIST classifier, beside a floor of real digits; or,
    with --nll, the model's likelihood bound in bits per dimension."""
    if nll or nll_timesteps is not None:  # the bound samples nothing: refuse what only sampling would use
        from ddpm_mnist.nll import likelihood_bound

        likelihood_bound(ckpt, n=n, seed=seed, timesteps=nll_timesteps, device_name=device, data_root=data,
                         json_path=json_path, sampling_flags={"--samples": samples, "--sweep": sweep, "--plot": plot,
                         "--guidance": guidance, "--steps": steps, "--sampler": sampler, "--batch-size": batch_size,
                         "--set": set_, "--nll-timesteps without --nll": not nll})
        return
    from ddpm_mnist.sweep import evaluate_or_sweep

    request = SampleRequest(n=n, steps=steps, sampler=sampler, seed=seed, batch_size=batch_size)
    evaluate_or_sweep(ckpt, samples, sweep_text=sweep, guidance_text=guidance, plot_path=plot, request=request,
                      device_name=device, data_root=data, json_path=json_path, overrides=set_)


def export(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint file, e.g. runs/cpu/checkpoints/latest.pt."),
    out: Path = typer.Option(..., "--out", help="A folder (diffusers) or a .safetensors file (--format safetensors)."),
    fmt: str = typer.Option("diffusers", "--format", help="diffusers (a DDPMPipeline folder) or safetensors (one "
                            "weights file with the config in its metadata)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Export the EMA weights (default) or the raw ones."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the files of an earlier export at --out."),
) -> None:
    """Export a checkpoint for diffusers (DDPMPipeline.from_pretrained) or as a safetensors weights file."""
    import time

    from ddpm_mnist.export import describe, export_checkpoint

    started = time.perf_counter()
    files = export_checkpoint(ckpt, out, fmt=fmt, use_ema=ema, overwrite=overwrite)
    typer.echo(describe(files, started))


def _digits(digit: int | None, digits: str | None) -> tuple[int, ...] | None:
    """--digit 7 or --digits 0,3,8 as a list of digits (None: neither given)."""
    if digit is not None and digits is not None:
        raise UserError("--digit and --digits contradict each other: give one")
    if digit is None and digits is None:
        return None
    flag, text = ("--digit", str(digit)) if digit is not None else ("--digits", digits)
    items = [item.strip() for item in text.split(",")]
    for item in items:
        if len(item) != 1 or item not in "0123456789":  # str.isdigit() takes '²' and '⑦' too, int() does not
            raise UserError(f"{flag} {text}: each must be a digit 0 to 9, got {item!r}")
    return tuple(int(item) for item in items)
