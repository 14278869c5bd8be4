"""The `ddpm` application: its Typer app, the config every command starts from, and `main`,
which turns bad input of any kind (a `UserError`) into one line on stderr and exit code 2."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import typer

from ddpm_mnist.config import Config, apply_overrides, load_config
from ddpm_mnist.errors import Stopped, Terminated, UserError, note

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


def config_from(path: Path | None, overrides: list[str] | None) -> Config:
    """The config from a file (or the defaults when there is none) with --set overrides applied."""
    notes: list[str] = []
    if path is None:
        cfg = apply_overrides(Config(), overrides or [], "defaults", notes=notes)
    else:
        cfg = load_config(path, overrides or [], notes=notes)
    for line in notes:
        note(line)  # stderr: `ddpm config > file.yaml` stays YAML
    return cfg


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
