"""MNIST: finding or fetching it, scaling it to [-1, 1], and drawing batches.

Data range (the one place it is stated): images are uint8 in [0, 255] on disk and in memory, and
the model sees float32 `x = u / 127.5 - 1`, in [-1, 1]. `to_uint8` is the exact inverse.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from functools import cache
from importlib import resources
from pathlib import Path

import torch

from ddpm_mnist.errors import DataError
from ddpm_mnist.rng import DATA_ORDER, derive_seed

# The four raw IDX files torchvision's MNIST reads from <root>/MNIST/raw/.
MNIST_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
)
CHECKSUMS = "mnist.md5"  # in the package's assets: the MD5s of each known set of the four files
_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> MD5, so a process hashes a file once


@cache
def known_sets() -> dict[str, dict[str, str]]:
    """set name -> file name -> MD5, from assets/mnist.md5 (shared with scripts/fetch_mnist.sh)."""
    sets: dict[str, dict[str, str]] = {}
    text = (resources.files("ddpm_mnist") / "assets" / CHECKSUMS).read_text()
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, file, md5 = line.split()
            sets.setdefault(name, {})[file] = md5
    return sets


def file_md5(path: Path) -> str:
    """The file's MD5 (0.1 s for the 47 MB training images), computed once per process per version of it."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def verify_mnist(raw: Path) -> str:
    """Check the four files against the known sets; return the set's name, or raise one DataError line."""
    digests = {name: file_md5(raw / name) for name in MNIST_FILES}
    for set_name, expected in known_sets().items():
        if digests == expected:
            return set_name
    published = known_sets()["mnist"]
    for name in MNIST_FILES:
        if all(digests[name] != files[name] for files in known_sets().values()):
            twin = next((other for files in known_sets().values() for other, md5 in files.items()
                         if md5 == digests[name]), None)
            what = f"that of {twin}" if twin else "damaged, or not MNIST"
            raise DataError(
                f"MNIST file {raw / name} has MD5 {digests[name]} ({what}), not the published {published[name]}: "
                f"fetch it again with scripts/fetch_mnist.sh"
            )
    raise DataError(
        f"the MNIST files in {raw} mix files of different sets ({', '.join(known_sets())}): fetch them again"
    )


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 1, 28, 28) in [0, 255] -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (B, 1, 28, 28) in [-1, 1] -> uint8 in [0, 255] (values outside are clipped)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _missing_message(root: Path, reason: str) -> str:
    raw = root / "MNIST" / "raw"
    return (
        f"MNIST not found in {raw} and {reason}: put the four IDX files "
        f"({', '.join(MNIST_FILES)}) there, or run scripts/fetch_mnist.sh {root}"
    )


def load_mnist(root: str | Path, train: bool = True, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Read MNIST through torchvision's `MNIST` class, downloading it if allowed and missing.

    Returns images uint8 (N, 1, 28, 28) in [0, 255] and labels int64 (N,).
    """
    from torchvision.datasets import MNIST  # import here: torchvision is slow to import

    root = Path(root)
    raw = root / "MNIST" / "raw"
    if not all((raw / name).is_file() for name in MNIST_FILES):
        if not download:
            raise DataError(_missing_message(root, "data.download is false"))
        try:
            # torchvision prints its progress on stdout; keep stdout for our own output
            with contextlib.redirect_stdout(sys.stderr):
                MNIST(str(root), train=train, download=True)
        except Exception as exc:  # URLError, RuntimeError, OSError: every failure reads the same
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(_missing_message(root, f"the download failed ({first_line})")) from None
    verify_mnist(raw)
    try:
        dataset = MNIST(str(root), train=train, download=False)
    except Exception as exc:  # unreadable files (verified ones never are)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else f"{type(exc).__name__} while parsing"
        raise DataError(f"cannot read MNIST in {raw}: {reason}") from None
    images = dataset.data.unsqueeze(1).contiguous()  # (N, 1, 28, 28) uint8
    labels = dataset.targets.long()
    if images.dtype != torch.uint8 or images.shape[1:] != (1, 28, 28) or len(images) != len(labels):
        raise DataError(f"MNIST in {raw} has an unexpected shape {tuple(images.shape)}")
    return images, labels


class EpochBatches:
    """Batches from a uint8 image tensor kept on the training device, in a seeded order per epoch.

    The order of epoch e is `randperm(N)` from a generator seeded with (seed, e), and step s reads
    batch s mod steps_per_epoch of epoch s // steps_per_epoch. So any step's batch is known from
    the step number alone: resuming needs no loader state, and with `world_size` > 1 each rank
    takes its own disjoint shard of the same order. The last incomplete batch of an epoch is
    dropped, so every step sees `batch_size` images.
    """

    def __init__(
        self, images: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
        labels: torch.Tensor | None = None,
    ) -> None:
        """images: uint8 (N, 1, 28, 28) on the device that trains; labels: their digits (N,) int64
        on the same device, for a conditional model."""
        per_rank = len(images) // world_size
        if per_rank < batch_size:
            raise DataError(
                f"train.batch_size {batch_size} is larger than the {per_rank} training images "
                f"per process ({len(images)} images, {world_size} process(es)); lower it or raise data.limit"
            )
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = per_rank // batch_size
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """This rank's image indices for `epoch`, on the images' device, (steps_per_epoch * B,)."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, DATA_ORDER, epoch))
            order = torch.randperm(len(self.images), generator=generator)
            shard = order[self.rank :: self.world_size][: self.steps_per_epoch * self.batch_size]
            self._order = shard.to(self.images.device)
            self._epoch = epoch
        return self._order

    def rows(self, step: int) -> torch.Tensor:
        """The image indices of optimiser step `step` (0-based): (B,) on the images' device."""
        epoch, index = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]

    def batch(self, step: int) -> torch.Tensor:
        """The batch of optimiser step `step` (0-based): float32 (B, 1, 28, 28) in [-1, 1]."""
        return to_model_range(self.images.index_select(0, self.rows(step)))

    def batch_labels(self, step: int) -> torch.Tensor:
        """The digits of step `step`'s batch: (B,) int64 (needs the labels)."""
        return self.labels.index_select(0, self.rows(step))
