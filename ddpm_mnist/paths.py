"""Inputs and outputs: checked before any work, never confused, and written whole or not at all.

Every input (`--ckpt`, `--config`, `--samples`) must be a regular file: a FIFO would block and a
device would never end. Every output is resolved and compared with every input and with the
other outputs before any work (`check_paths`), by name and by inode (a checkpoint's `latest.pt`
is a hard link), so an output never replaces an input.

Every file the tool writes goes through `atomic_file`: it is written under a temporary name that
no other writer can pick (PID plus random), then renamed over its final name. So a reader, a
crash or a full disk never leaves half a file under a final name, and a failed write removes its
temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from ddpm_mnist.errors import UserError

# A run folder's record of the files this tool wrote there: one JSON string (a path relative to the
# folder) a line. `--overwrite` deletes those files and nothing else.
MANIFEST = ".ddpm-manifest"


def check_input_file(path: Path, what: str) -> None:
    """Refuse, in one line, an input that is missing, a folder, or not a regular file (a FIFO would block)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what} file") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise UserError(f"{path}: cannot read the {what}: {getattr(exc, 'strerror', None) or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{path}: is a folder, not a {what} file")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path}: not a regular file (a pipe, socket or device); give a {what} file")


def resolved(path: Path) -> Path:
    """The absolute path with symlinks followed, or one UserError line (a symlink loop)."""
    try:
        return path.resolve()
    except RuntimeError:  # Python 3.11 and 3.12 raise this for a loop, 3.13 an OSError
        raise UserError(f"cannot use {path}: it passes through a symlink loop") from None
    except OSError as exc:
        raise UserError(f"cannot use {path}: {exc.strerror or exc}") from None


def ensure_writable(path: Path, *, folder: bool = False) -> Path:
    """Create the folder that will hold `path` (or `path` itself when `folder`) and try writing a
    file there (root passes `os.access` on /proc and read-only mounts), or say why not."""
    target = path if folder else path.parent
    resolved(target)
    for parent in [target, *target.parents]:
        if parent.is_symlink() and not parent.exists():
            raise UserError(f"cannot write {path}: {parent} is a symlink to {os.readlink(parent)}, which is missing")
        if parent.exists() and not parent.is_dir():
            raise UserError(f"cannot write {path}: {parent} is a file, not a folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    if not folder and path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    probe = temporary_name(target / "probe")
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write {path}: {target} refuses new files ({exc.strerror or exc})") from None
    return path


def check_suffix(path: Path, option: str, suffixes: tuple[str, ...]) -> Path:
    """Refuse a file name whose extension does not match what will be written into it."""
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    return path


def _identity(path: Path) -> tuple[Path, tuple[int, int] | None]:
    """(resolved path, (device, inode) when the file exists): two names of one file compare equal."""
    where = resolved(path)
    try:
        info = where.stat()
    except OSError:
        return where, None
    return where, (info.st_dev, info.st_ino)


def check_paths(outputs: dict[str, Path | None], inputs: dict[str, Path | None] | None = None) -> None:
    """Refuse, before any work, an output (a file, or a folder such as --images-dir) that is an input
    or another output, by name or by inode. Keys are option names, for the message."""
    inputs = {option: path for option, path in (inputs or {}).items() if path is not None}
    read: dict[object, str] = {}
    for option, path in inputs.items():
        for key in _identity(path):
            if key is not None:
                read[key] = option
    written: dict[object, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        for key in _identity(path):
            if key is None:
                continue
            if key in read:
                raise UserError(f"{option} {path}: that is the file {read[key]} reads; an output never replaces "
                                "an input: give another path")
            if key in written:
                raise UserError(f"{written[key]} and {option} both write {path}: give them different paths")
            written[key] = option


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path` that no other writer picks: `.name.PID.RANDOM.tmp`."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_file(path: Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it over `path`, on any failure remove it.

    With `fsync`, the data and the folder entry are flushed to disk (checkpoints: a power cut must
    not leave a renamed but empty file).
    """
    record_written(path)
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


def run_folder_of(path: Path) -> Path | None:
    """The run folder an output lies in (its own folder, or the one above: checkpoints/, samples/)."""
    for folder in (path.parent, path.parent.parent):
        if os.path.lexists(folder / MANIFEST):
            return folder
    return None


def open_manifest(folder: Path, flags: int) -> int:
    """A file descriptor of the folder's manifest, which must be a regular file: never followed
    through a symlink (it would write outside the folder), never a pipe (it would block)."""
    where = folder / MANIFEST
    try:
        fd = os.open(where, flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        kind = "a symlink" if exc.errno == errno.ELOOP else (exc.strerror or str(exc))
        raise UserError(f"{where}: cannot use it as ddpm-mnist's record of the files it wrote ({kind}): "
                        "remove it") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{where}: not a regular file (a pipe, socket or device); ddpm-mnist keeps its record of the "
                        "files it wrote there: remove it")
    return fd


def check_manifest(folder: Path) -> None:
    """Refuse, in one line, a manifest that is a symlink, a pipe or a folder (see `open_manifest`)."""
    if os.path.lexists(folder / MANIFEST):
        os.close(open_manifest(folder, os.O_RDONLY))


def recorded(folder: Path) -> set[str]:
    """The files the manifest of a run folder lists, relative to it (empty when there is none); a
    listed path that leaves the folder ('..', absolute) is not one of its files."""
    if not os.path.lexists(folder / MANIFEST):
        return set()
    fd = open_manifest(folder, os.O_RDONLY)
    with open(fd, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    names = set()
    for line in lines:
        try:
            name = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash: its file, if any, is simply not ours
        if isinstance(name, str) and name and not name.startswith("/") and ".." not in name.split("/"):
            names.add(name)
    return names


def record_written(path: Path) -> None:
    """Add `path` to the manifest of the run folder it lies in, if any, before it is written (so that
    a crash never leaves a file of ours unrecorded)."""
    folder = run_folder_of(path)
    if folder is None:
        return
    name = path.relative_to(folder).as_posix()
    fd = open_manifest(folder, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with open(fd, "a", encoding="utf-8") as f:  # one short append: atomic beside other writers
        f.write(json.dumps(name) + "\n")


def start_manifest(folder: Path) -> None:
    """Create (or empty) the folder's manifest: from now on it records what the tool writes there."""
    os.close(open_manifest(folder, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))


def enclosing_output_folder(folder: Path) -> Path | None:
    """The folder above `folder` that holds a manifest (a run or export folder of its own), if any."""
    for parent in resolved(folder).parents:
        if os.path.lexists(parent / MANIFEST):
            return parent
    return None


def folder_entries(folder: Path) -> tuple[set[str], set[str]]:
    """(regular files, everything else: symlinks, pipes, sockets, devices) under a folder, relative
    to it, but its own manifest; symlinks are listed, never followed."""
    files, others = set(), set()
    for where, dirs, names in os.walk(folder):
        base = Path(where).relative_to(folder)
        for name in names + [d for d in dirs if os.path.islink(os.path.join(where, d))]:
            relative = (base / name).as_posix()
            if relative != MANIFEST:
                mode = os.lstat(os.path.join(where, name)).st_mode
                (files if stat.S_ISREG(mode) else others).add(relative)
    return files, others


def nested_output_folders(folder: Path) -> list[Path]:
    """The folders below `folder` that hold a manifest of their own (symlinks not followed)."""
    found = []
    for where, dirs, files in os.walk(folder):
        if where != str(folder) and MANIFEST in files + dirs:
            found.append(Path(where))
    return found


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
