"""The exceptions the CLI turns into one line: bad input (exit code 2) and requested stops (130, 143);
and `note`, the one way a command says something beside its output."""

from __future__ import annotations

import sys


def note(message: str) -> None:
    """One line on stderr, so that a command's output on stdout (`ddpm config > file.yaml`) stays clean."""
    print(f"note: {message}", file=sys.stderr, flush=True)


class UserError(Exception):
    """Bad input from the user (config, arguments, checkpoint, data): one line, no traceback."""


class ConfigError(UserError):
    """A config file or `--set` override that does not fit the schema."""


class DataError(UserError):
    """MNIST is missing, unreadable or cannot be downloaded."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, unreadable, unsafe or of another format."""


class RunError(UserError):
    """A run folder or training state that refuses the requested action."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that whatever cleans up after one
    cleans up after the other."""


class Stopped(Exception):
    """A stop the user asked for, with one line on what was kept; the CLI exits with 130 (Ctrl-C)
    or 143 (SIGTERM)."""

    def __init__(self, kept: str, terminated: bool) -> None:
        super().__init__(kept)
        self.kept, self.terminated = kept, terminated

    @classmethod
    def after(cls, interrupt: BaseException, kept: str) -> Stopped:
        """The stop that `interrupt` (a KeyboardInterrupt or Terminated) asked for."""
        return cls(kept, isinstance(interrupt, Terminated))
