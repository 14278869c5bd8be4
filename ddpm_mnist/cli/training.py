"""The training side's commands: `ddpm config`, `ddpm schedule` and `ddpm train`."""

from __future__ import annotations

from pathlib import Path

import typer

from ddpm_mnist.cli.app import SET_HELP, config_from
from ddpm_mnist.config import check_trainable, dump_yaml
from ddpm_mnist.errors import UserError


def config(
    config: Path = typer.Option(None, "--config", "-c", help="YAML config file (default: built-in defaults)."),
    set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Print the resolved config (file, then --set overrides) as YAML."""
    typer.echo(dump_yaml(config_from(config, set_)), nl=False)


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
    steps: int = typer.Option(
        None, "--steps", min=1,
        help="Also list the sigmas the config's sample.sampler visits in this many steps (--set sample.sampler=euler, "
        "--set sample.sigma_schedule=karras to choose), and mark them on the plot.",
    ),
) -> None:
    """Summarise a config's noise schedule; optionally write it as CSV and plot it."""
    from ddpm_mnist.schedule_report import report_schedules

    configs = {}
    set_ = [*(set_ or []), *([f"sample.steps={steps}"] if steps else [])]
    for path in config or [None]:
        label = path.stem if path else "defaults"
        if not beta_schedule:
            configs[label] = config_from(path, set_)
        for name in beta_schedule or []:
            configs[f"{label} {name}"] = config_from(path, [*(set_ or []), f"schedule.beta_schedule={name}"])
    if csv is not None and len(configs) > 1:
        raise UserError("--csv writes one schedule: give one --config and at most one --schedule")
    typer.echo(report_schedules(configs, csv=csv, plot=plot, inputs=[path for path in config or [] if path],
                                visits=steps is not None))


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
    from ddpm_mnist.train import run_training

    cfg = config_from(config, set_)
    check_trainable(cfg, str(config))
    run_training(cfg, hooks=training_hooks(cfg), resume=resume, overwrite=overwrite, device_name=device,
                 change_world_size=change_world_size, config_file=config)
