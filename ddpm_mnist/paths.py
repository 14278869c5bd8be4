"""Output files: checked before the work that fills them, and written whole or not at all.

Every file the tool writes goes through `atomic_file`: it is written under a temporary name that
no other writer can pick (PID plus random), then renamed over its final name. So a reader, a
crash or a full disk never leaves half a file under a final name, and a failed write removes its
temporary file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
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


def check_suffix(path: Path, option: str, suffixes: tuple[str, ...]) -> Path:
    """Refuse a file name whose extension does not match what will be written into it."""
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    return path


def check_distinct(outputs: dict[str, Path | None]) -> None:
    """Refuse two outputs (option name -> path) that would write the same file."""
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        key = path.resolve()
        if key in seen:
            raise UserError(f"{seen[key]} and {option} both write {path}: give them different paths")
        seen[key] = option


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path` that no other writer picks: `.name.PID.RANDOM.tmp`."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_file(path: Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it over `path`, on any failure remove it.

    With `fsync`, the data and the folder entry are flushed to disk (checkpoints: a power cut must
    not leave a renamed but empty file).
    """
    tmp = temporary_name(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_folder(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename) to disk, where the platform can open folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> Path:
    """Write a text file atomically; a refused write (no space, no permission) is one UserError line."""
    try:
        with atomic_file(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
