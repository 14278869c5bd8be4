"""Output paths: checked before the work that fills them, so a typo costs no sampling time."""

from __future__ import annotations

import os
from pathlib import Path

from ddpm_mnist.errors import UserError


def ensure_writable(path: Path, *, folder: bool = False) -> Path:
    """Create the folder that will hold `path` (or `path` itself when `folder`), or say why not."""
    target = path if folder else path.parent
    for parent in [target, *target.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"cannot write {path}: {parent} is a file, not a folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    if not os.access(target, os.W_OK):
        raise UserError(f"cannot write {path}: {target} is not writable")
    if not folder and path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    return path
