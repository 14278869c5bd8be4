"""A run's folder: who may write it, what it holds, and what `--resume` and `--overwrite` do to it.

The folder's manifest (`paths.MANIFEST`) lists every file the tool wrote there, recorded before
each is written. `--overwrite` deletes exactly those files, and refuses, before deleting anything,
a folder that holds any other entry: a user's notes in samples/, a checkpoint of another tool, a
symlink. The manifest itself must be a regular file, it names only paths inside its folder, and no
two such folders nest (one's --overwrite would delete the other's files): each is refused in one
line. A folder without a manifest (a run of an older ddpm-mnist) adopts its checkpoints, event
file and config by name on --resume; --overwrite never guesses which of its files are ours.

One process writes a run folder at a time: it holds an exclusive `flock` on `<run>/.lock` for
the whole run, so a second `ddpm train` on the same folder (or an `--overwrite` of it) is refused
with the PID of the holder. The operating system releases the lock when its process dies, so a
killed run never blocks the next one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpm_mnist import checkpoint as ckpt
from ddpm_mnist.config import Config, dump_yaml, load_config, to_dict
from ddpm_mnist.errors import CheckpointError, RunError, UserError, note
from ddpm_mnist.paths import (
    MANIFEST,
    check_manifest,
    enclosing_output_folder,
    folder_entries,
    nested_output_folders,
    record_written,
    recorded,
    start_manifest,
    write_text,
)

if TYPE_CHECKING:
    from ddpm_mnist.trainstate import TrainState

LOCK = ".lock"
# What --resume refuses to change: the model's identity, and what decides the data order.
FROZEN_ON_RESUME = ("schedule", "model", "seed", "data.limit")
# The names this tool gives what it writes in a run folder: a folder written before the manifest
# existed adopts the files of these names (and only those) when it is resumed or overwritten.
OWN_NAMES = re.compile(r"config\.yaml|events\.out\.tfevents\.[^/]+|checkpoints/(latest|step_[0-9]{9,})\.pt")
# A temporary file of `paths.temporary_name` that a killed writer left: `.name.PID.RANDOM.tmp`
TEMPORARY = re.compile(r"(.*/)?\.(?P<name>[^/]+)\.[0-9]+\.[0-9a-f]{8}\.tmp")


class RunFolder:
    """`out_dir/name`, locked by this process until `release()` (a context manager does both)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.checkpoints = path / "checkpoints"
        self.latest = self.checkpoints / ckpt.LATEST  # the newest checkpoint, also kept as step_<N>.pt
        self.config_is_input = False  # the --config file is this folder's config.yaml (see prepare)
        self._lock_fd: int | None = None

    def __enter__(self) -> RunFolder:
        self.lock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def lock(self) -> None:
        """Take the folder's exclusive lock, or raise RunError naming the process that holds it (or
        refusing a folder that nests in another the tool writes, before creating anything)."""
        self._check_not_nested()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunError(f"cannot write the run folder {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunError(f"cannot lock the run folder {self.path}: {exc.strerror or exc}") from None
            raise RunError(
                f"{self.path} is in use by process {holder} (a ddpm train of the same run): wait for it to finish, "
                "stop it, or pick another name with --set name=NEW"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        """Give the lock back (closing the file releases the flock)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def holds_run(self) -> bool:
        """True when the folder already holds a run's config or checkpoints."""
        return (self.path / "config.yaml").exists() or any(self.checkpoints.glob("*.pt"))

    def prepare(self, cfg: Config, resume: bool, overwrite: bool,
                config_file: Path | None = None) -> ckpt.Checkpoint | None:
        """Apply --resume / --overwrite; return the checkpoint to resume from, if any. `config_file`:
        the --config the run was given, which the run's own config.yaml must not replace."""
        if resume and overwrite:
            raise UserError("--resume and --overwrite contradict each other: pick one")
        check_manifest(self.path)
        if config_file is not None:
            self._check_config_input(cfg, config_file, overwrite)
        if self.holds_run() and not (resume or overwrite):
            raise RunError(
                f"{self.path} already holds a run: add --resume to continue it, --overwrite to replace it, "
                "or pick another name with --set name=NEW"
            )
        if overwrite:
            self._remove_outputs()
        else:
            self._keep_manifest()
        if not resume:
            return None
        found = self.resume_checkpoint()
        if found is not None:
            check_frozen_keys(cfg, found.config, self.path)
        return found

    def resume_checkpoint(self) -> ckpt.Checkpoint | None:
        """latest.pt, or when it is missing the newest numbered checkpoint that loads (said on stdout).

        None only when the folder holds no checkpoint at all. A damaged latest.pt is an error, not a
        reason to go back silently: deleting it resumes from the numbered ones.
        """
        latest = self.latest
        if latest.exists():
            try:
                return ckpt.load(latest)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}; delete it to resume from the newest numbered checkpoint") from None
        numbered = ckpt.numbered_checkpoints(self.checkpoints)
        reasons = []
        for path in numbered:
            try:
                found = ckpt.load(path)
            except CheckpointError as exc:
                reasons.append(str(exc))
                continue
            skipped = f" ({len(reasons)} newer one(s) do not load)" if reasons else ""
            note(f"{latest} is missing: resuming from {path.name}, the newest checkpoint that loads{skipped}")
            return found
        if numbered:
            raise CheckpointError(f"no checkpoint in {self.checkpoints} loads; the newest says: {reasons[0]}")
        return None

    def _check_not_nested(self) -> None:
        """Refuse a run folder inside another folder the tool writes, or around one."""
        outer = enclosing_output_folder(self.path)
        inner = nested_output_folders(self.path) if self.path.is_dir() else []
        if outer is not None or inner:
            other = outer if outer is not None else inner[0]
            where = "inside" if outer is not None else "around"
            raise RunError(
                f"{self.path} lies {where} {other}, a folder ddpm-mnist writes (it holds a {MANIFEST}): the "
                "--overwrite of one would delete the other's files; pick another out_dir or name"
            )

    def _check_config_input(self, cfg: Config, config_file: Path, overwrite: bool) -> None:
        """The --config file may be the run's config.yaml: the tool's own (its manifest lists it), which
        the run rewrites as ever; or a user's file, only where nothing would replace it, a run whose
        resolved config is the file's (left as it is then, comments and all)."""
        try:
            same = os.path.samefile(self.path / "config.yaml", config_file)  # by inode: hard links too
        except OSError:  # no config.yaml in the folder yet
            same = False
        if not same or "config.yaml" in recorded(self.path):
            return
        if overwrite or load_config(config_file) != cfg:
            raise RunError(
                f"--config {config_file} is the run's own config.yaml, which --overwrite or a --set override "
                "would replace: copy it out of the run folder and give the copy"
            )
        self.config_is_input = True

    def _keep_manifest(self) -> None:
        """Start the manifest of a new folder, or adopt the tool's own files in a folder written before
        there was one."""
        if os.path.lexists(self.path / MANIFEST):
            return
        try:
            adopted = {name for name in self._entries()[0] if OWN_NAMES.fullmatch(name)}
            if self.config_is_input:
                adopted.discard("config.yaml")  # the user's --config, never to be deleted by an --overwrite
            start_manifest(self.path)
            for name in sorted(adopted):
                record_written(self.path / name)
        except OSError as exc:
            raise RunError(f"cannot write the run folder {self.path}: {exc.strerror or exc}") from None

    def _entries(self) -> tuple[set[str], set[str]]:
        """`paths.folder_entries` of the folder, but its lock."""
        files, others = folder_entries(self.path)
        return files - {LOCK}, others - {LOCK}

    def _remove_outputs(self) -> None:
        """Delete what the manifest lists (and temporary files a killed writer left), once nothing else is there."""
        files, others = self._entries()
        if not os.path.lexists(self.path / MANIFEST) and (files or others):
            raise RunError(
                f"--overwrite: {self.path} holds files and no {MANIFEST} (the record of what ddpm-mnist wrote there), "
                "so nothing in it is known to be the tool's: move them away, or pick another name with --set name=NEW"
            )
        ours = recorded(self.path)
        foreign = sorted(others | {name for name in files if name not in ours and not self._leftover(name, ours)})
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise RunError(
                f"--overwrite: {self.path} holds {len(foreign)} file(s) ddpm-mnist did not write ({shown}); it "
                "deletes only its own: move them away, or pick another name with --set name=NEW"
            )
        try:
            for name in sorted(files, reverse=True):
                (self.path / name).unlink()
            for where, _, _ in sorted(os.walk(self.path), reverse=True):
                if where != str(self.path) and not os.listdir(where):
                    os.rmdir(where)
            start_manifest(self.path)
        except OSError as exc:
            raise RunError(f"cannot clear the run folder {self.path}: {exc.strerror or exc}") from None

    @staticmethod
    def _leftover(name: str, ours: set[str]) -> bool:
        """A temporary file of one of our files (or of a write probe), left by a killed writer."""
        match = TEMPORARY.fullmatch(name)
        if match is None:
            return False
        folder = match.group(1) or ""
        return match["name"] == "probe" or f"{folder}{match['name']}" in ours

    def save(self, state: TrainState, cfg: Config, steps_per_epoch: int, rngs: list[dict[str, Any]]) -> Path:
        """Write a checkpoint of the state (`rngs`: every process's random streams) as latest.pt and
        step_<N>.pt, keeping the newest train.keep_checkpoints numbered ones."""
        contents = ckpt.checkpoint_contents(state, cfg, steps_per_epoch, rngs)
        return ckpt.save_checkpoint(contents, self.checkpoints, cfg.train.keep_checkpoints)

    def write_config(self, cfg: Config) -> None:
        """The resolved config as `<run>/config.yaml` (left as it is where it is the --config input)."""
        if self.config_is_input:
            return
        try:
            write_text(self.path / "config.yaml", dump_yaml(cfg))
        except UserError as exc:
            raise RunError(f"cannot write the run folder {self.path}: {exc}") from None


def check_frozen_keys(cfg: Config, saved: Config, run_dir: Path) -> None:
    """Refuse a resume whose config changes the model, the schedule or the data order."""
    saved_values, values = to_dict(saved), to_dict(cfg)
    for key in FROZEN_ON_RESUME:
        section, _, name = key.partition(".")
        before, now = saved_values[section], values[section]
        if name:
            before, now = before[name], now[name]
        if before != now:
            raise RunError(
                f"--resume: the config's {key} differs from the run's in {run_dir} "
                f"(see {run_dir / 'config.yaml'}); resume with the same {key}, or start a new run"
            )
