"""The `ddpm` command: thin Typer commands that parse arguments, then call one function each.

Bad input of any kind raises `UserError`; `main` turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import typer

from ddpm_mnist.config import Config, SampleRequest, apply_overrides, dump_yaml, load_config
from ddpm_mnist.errors import Stopped, Terminated, UserError

try:  # typer >= 0.20 carries its own copy of click
    from typer._click import exceptions as click_exceptions
except ImportError:  # older typer runs on click itself
    from click import exceptions as click_exceptions

app = typer.Typer(
    name="ddpm",
    help="Train and sample denoising diffusion models (DDPM) on MNIST from one YAML config.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SET_HELP = "Override a config key, e.g. --set train.lr=1e-4 (repeatable; the value is YAML)."


def _config(path: Path | None, overrides: list[str] | None) -> Config:
    """The config from a file (or the defaults when there is none) with --set overrides applied."""
    notes: list[str] = []
    if path is None:
        cfg = apply_overrides(Config(), overrides or [], "defaults", notes=notes)
    else:
        cfg = load_config(path, overrides or [], notes=notes)
    for note in notes:
        typer.echo(f"note: {note}", err=True)  # stderr: `ddpm config > file.yaml` stays YAML
    return cfg


@app.command()
def config(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config file (default: built-in defaults)."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Print the resolved config (file, then --set overrides) as YAML."""
    typer.echo(dump_yaml(_config(config, set_)), nl=False)


@app.command()
def schedule(
    config: list[Path] = typer.Option(
        None, "--config", "-c", help="YAML config file; repeat to compare schedules in one plot."
    ),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    beta_schedule: list[str] = typer.Option(
        None, "--schedule", "-s",
        help="Show each config with this beta schedule (linear, scaled_linear, cosine, sigmoid); repeatable.",
    ),
    csv: Path = typer.Option(None, "--csv", help="Write every timestep (t,beta,alpha_bar,sigma,...) to this CSV."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG of beta, alpha-bar and sigma against t."),
) -> None:
    """Summarise a config's noise schedule; optionally write it as CSV and plot it."""
    from ddpm_mnist.schedule_report import report_schedules

    configs = {}
    for path in config or [None]:
        label = path.stem if path else "defaults"
        if not beta_schedule:
            configs[label] = _config(path, set_)
        for name in beta_schedule or []:
            configs[f"{label} {name}"] = _config(path, [*(set_ or []), f"schedule.beta_schedule={name}"])
    if csv is not None and len(configs) > 1:
        raise UserError("--csv writes one schedule: give one --config and at most one --schedule")
    typer.echo(report_schedules(configs, csv=csv, plot=plot, inputs=[path for path in config or [] if path]))


@app.command()
def train(
    config: Path = typer.Option(..., "--config", "-c", help="YAML config file (see configs/)."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in out_dir/name from its latest checkpoint (or newest that loads)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in out_dir/name."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (default: runtime.device)."),
    change_world_size: bool = typer.Option(
        False, "--change-world-size", help="Let --resume continue on another number of torchrun processes."
    ),
) -> None:
    """Train a DDPM on MNIST: checkpoints, TensorBoard logs and sample grids go to out_dir/name/."""
    from ddpm_mnist.previews import training_hooks
    from ddpm_mnist.train import train as run_training

    cfg = _config(config, set_)
    run_training(cfg, hooks=training_hooks(cfg), resume=resume, overwrite=overwrite, device_name=device,
                 change_world_size=change_world_size)


@app.command()
def sample(
    ckpt: Path = typer.Option(..., "--ckpt", help="Checkpoint file (e.g. runs/cpu/checkpoints/latest.pt), an "
                              "exported .safetensors file, or a diffusers DDPMPipeline folder."),
    n: int = typer.Option(None, "--n", help="Number of images (default: sample.n, 64)."),
    steps: int = typer.Option(None, "--steps", help="Reverse steps (default: sample.steps; 0 = the full loop of T)."),
    seed: int = typer.Option(None, "--seed", help="Seed (default: the run's seed)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per forward pass; does not change the images."),
    sampler: str = typer.Option(
        None, "--sampler", help="ancestral (Ho et al.), ddim, or dpmpp_2m (give --steps, e.g. 20) (default: ancestral)."
    ),
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


@app.command("eval")
def eval_(
    ckpt: Path = typer.Option(None, "--ckpt", help="Checkpoint (or exported weights file, or diffusers folder) to "
                              "sample from, then measure."),
    samples: Path = typer.Option(None, "--samples", help="Measure a .pt or .npz file written by ddpm sample --tensor."),
    n: int = typer.Option(None, "--n", help="Number of images (default: sample.n of the checkpoint)."),
    steps: int = typer.Option(None, "--steps", help="Reverse steps (default: sample.steps; 0 = the full loop of T)."),
    sampler: str = typer.Option(None, "--sampler", help="ancestral, ddim or dpmpp_2m (default: ancestral)."),
    seed: int = typer.Option(None, "--seed", help="Seed of the samples and of the real floor (default: the run's)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Images per forward pass."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
    data: str = typer.Option(None, "--data", help="Folder holding MNIST/raw/ (default: data.root of the run)."),
    json_path: Path = typer.Option(None, "--json", help="Also write the report as JSON."),
    sweep: str = typer.Option(
        None, "--sweep", help="Compare settings from the same seeds, e.g. ancestral:1000,ddim:50,dpmpp_2m:20 "
        "(sampler:steps[:spacing])."
    ),
    plot: Path = typer.Option(
        None, "--plot", help="With --sweep: also plot fid_mnist against model evaluations (with --guidance "
        "W1,W2,...: fid_mnist and class_accuracy against W)."
    ),
    guidance: str = typer.Option(
        None, "--guidance", help="Conditional models: guidance weight W, or several (1,2,3,5) for one row each."
    ),
    set_: list[str] = typer.Option(
        None, "--set", help="Override a sample.* or runtime.* key of the stored config, e.g. sample.eta=0.5."
    ),
) -> None:
    """Measure sample quality with the project's MNIST classifier, beside a floor of real digits."""
    from ddpm_mnist.sweep import evaluate_or_sweep

    request = SampleRequest(n=n, steps=steps, sampler=sampler, seed=seed, batch_size=batch_size)
    evaluate_or_sweep(ckpt, samples, sweep_text=sweep, guidance_text=guidance, plot_path=plot, request=request,
                      device_name=device, data_root=data, json_path=json_path, overrides=set_)


@app.command()
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

    from ddpm_mnist.export import describe
    from ddpm_mnist.export import export as run_export

    started = time.perf_counter()
    files = run_export(ckpt, out, fmt=fmt, use_ema=ema, overwrite=overwrite)
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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `ddpm` script: bad input of any kind is one line on stderr and exit code 2;
    Ctrl-C exits with 130 and SIGTERM with 143, each with one line on what was kept.

    The command is invoked here rather than through `app()`, whose non-standalone mode turns Ctrl-C
    into a returned 130 that a caller easily drops (it once exited 0)."""
    args = sys.argv[1:] if argv is None else argv
    previous = _on_sigterm(_terminate)
    try:
        command = typer.main.get_command(app)
        with command.make_context("ddpm", list(args)) as ctx:
            command.invoke(ctx)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, Stopped) as exc:
        stop = exc if isinstance(exc, Stopped) else Stopped.after(exc, "nothing was written by this command")
        typer.echo(f"stopped by {'SIGTERM' if stop.terminated else 'Ctrl-C'}: {stop.kept}", err=True)
        sys.exit(143 if stop.terminated else 130)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except click_exceptions.ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and getattr(exc, "ctx", None) is not None:
            typer.echo(exc.ctx.get_help(), err=True)  # `ddpm` alone: the help, as users expect
            sys.exit(2)
        command_path = exc.ctx.command_path if getattr(exc, "ctx", None) else "ddpm"
        typer.echo(f"error: {exc.format_message()} (see {command_path} --help)", err=True)
        sys.exit(2)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # the environment refused a file operation no check foresaw (a disk filling up)
        where = f"{exc.filename}: " if exc.filename else ""
        typer.echo(f"error: {where}{exc.strerror or exc}", err=True)
        sys.exit(2)
    finally:
        _on_sigterm(previous)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def _on_sigterm(handler: Any) -> Any:
    """Install a SIGTERM handler (where this is the main thread); return the one it replaces."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (a test runner's worker): leave signals alone
        return None
