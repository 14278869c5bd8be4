"""The `ddpm` command: thin Typer commands that parse arguments, then call one function each.

Bad input of any kind raises `UserError`; `main` turns it into one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ddpm_mnist.config import Config, apply_overrides, dump_yaml, load_config
from ddpm_mnist.errors import UserError

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
    if path is None:
        return apply_overrides(Config(), overrides or [], "defaults")
    return load_config(path, overrides or [])


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
    from ddpm_mnist.report import report_schedules

    configs = {}
    for path in config or [None]:
        label = path.stem if path else "defaults"
        if not beta_schedule:
            configs[label] = _config(path, set_)
        for name in beta_schedule or []:
            configs[f"{label} {name}"] = _config(path, [*(set_ or []), f"schedule.beta_schedule={name}"])
    if csv is not None and len(configs) > 1:
        raise UserError("--csv writes one schedule: give one --config and at most one --schedule")
    typer.echo(report_schedules(configs, csv=csv, plot=plot))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `ddpm` script: run the app, turning bad input into one line and exit 2."""
    try:
        app(args=argv, prog_name="ddpm")
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
