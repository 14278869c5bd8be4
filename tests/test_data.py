"""MNIST: the fixture through torchvision's class, the [-1, 1] range, seeded epoch batches."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_ROOT, ROOT
from helpers import copy_fixture

from ddpm_mnist.data import MNIST_FILES, EpochBatches, known_sets, load_mnist, to_model_range, to_uint8
from ddpm_mnist.errors import DataError


def test_fixture_loads_through_torchvision() -> None:
    images, labels = load_mnist(FIXTURE_ROOT, train=True, download=False)
    assert images.shape == (1000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (1000,) and labels[:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's first digits
    assert set(labels.tolist()) == set(range(10))
    test_images, _ = load_mnist(FIXTURE_ROOT, train=False, download=False)
    assert test_images.shape == (1000, 1, 28, 28) and not torch.equal(test_images, images)


def test_model_range_is_minus_one_to_one_and_invertible() -> None:
    images, _ = load_mnist(FIXTURE_ROOT, download=False)
    x = to_model_range(images)
    assert x.dtype == torch.float32 and x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.equal(to_uint8(x), images)
    every_value = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_model_range(every_value)), every_value)
    assert to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]  # out of range is clipped


def test_missing_data_without_download_names_the_files_and_the_script(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "scripts/fetch_mnist.sh" in message
    assert all(name in message for name in MNIST_FILES) and "\n" not in message


def test_failed_download_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.mnist as tv_mnist

    def offline(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    with pytest.raises(DataError, match=r"the download failed \(Error downloading train-images-idx3-ubyte.gz:\)"):
        load_mnist(tmp_path, download=True)


def test_truncated_file_is_reported(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(FIXTURE_ROOT / "MNIST" / "raw", raw)
    data = (raw / "train-images-idx3-ubyte").read_bytes()
    (raw / "train-images-idx3-ubyte").write_bytes(data[:5000])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte has MD5 [0-9a-f]{32} \(damaged, or not MNIST\), "
                                        r"not the published 6bbc9ace898e44ae57da46a324031adb"):
        load_mnist(tmp_path, download=False)


def test_epoch_batches_are_seeded_permutations() -> None:
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 1, 28, 28).contiguous()
    batches = EpochBatches(images, batch_size=10, seed=3)
    assert batches.steps_per_epoch == 10
    seen = [to_uint8(batches.batch(step))[:, 0, 0, 0] for step in range(20)]
    epoch0, epoch1 = torch.cat(seen[:10]), torch.cat(seen[10:])
    assert sorted(epoch0.tolist()) == list(range(100)) == sorted(epoch1.tolist())  # each epoch sees all once
    assert not torch.equal(epoch0, epoch1)  # in a new order
    again = EpochBatches(images, batch_size=10, seed=3)
    assert torch.equal(to_uint8(again.batch(13)), to_uint8(batches.batch(13)))  # any step, from the step alone
    other = EpochBatches(images, batch_size=10, seed=4)
    assert not torch.equal(to_uint8(other.batch(0)), to_uint8(batches.batch(0)))


def test_ranks_get_disjoint_shards_of_the_same_order() -> None:
    images = torch.arange(101, dtype=torch.uint8).view(101, 1, 1, 1).expand(101, 1, 28, 28).contiguous()
    shards = [EpochBatches(images, batch_size=5, seed=0, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        a, b = (set(s.epoch_order(epoch).tolist()) for s in shards)
        assert not a & b and len(a) == len(b) == 50


def test_batch_larger_than_the_data_is_refused() -> None:
    with pytest.raises(DataError, match="larger than the 8 training images"):
        EpochBatches(torch.zeros(8, 1, 28, 28, dtype=torch.uint8), batch_size=16, seed=0)


FULL_MNIST = ROOT / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte"


@pytest.mark.skipif(not FULL_MNIST.exists(), reason="full MNIST not in data/")
def test_fetch_script_does_nothing_when_the_files_are_there() -> None:
    raw = ROOT / "data" / "MNIST" / "raw"
    before = {p.name: p.stat().st_mtime_ns for p in raw.iterdir()}
    result = subprocess.run(["scripts/fetch_mnist.sh", "data"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "already in" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in raw.iterdir()} == before


def test_garbled_pixels_are_refused_with_both_hashes(tmp_path: Path) -> None:
    raw = copy_fixture(tmp_path)
    data = bytearray((raw / "train-images-idx3-ubyte").read_bytes())
    for i in range(16, len(data), 97):
        data[i] ^= 0x5A
    (raw / "train-images-idx3-ubyte").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte has MD5 [0-9a-f]{32} \(damaged, or not MNIST\), "
                                        r"not the published 6bbc9ace898e44ae57da46a324031adb"):
        load_mnist(tmp_path, download=False)


def test_mnist_test_files_copied_over_the_training_files_are_named(tmp_path: Path) -> None:
    raw = copy_fixture(tmp_path)
    shutil.copyfile(raw / "t10k-images-idx3-ubyte", raw / "train-images-idx3-ubyte")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte has MD5 \w+ \(that of t10k-images-idx3-ubyte\)"):
        load_mnist(tmp_path, download=False)


@pytest.mark.parametrize("damage", ["magic", "count", "rows", "short"])
def test_damaged_headers_give_a_reason(tmp_path: Path, damage: str) -> None:
    raw = copy_fixture(tmp_path)
    path = raw / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    if damage == "magic":
        data[2] = 7
    elif damage == "count":
        data[7] += 1
    elif damage == "rows":
        data = data[:8] + data[8:] + b"\0"
    else:
        data = data[:6]
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path, download=False)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte has MD5" in message and not message.rstrip().endswith(":")


def test_one_table_of_md5s_serves_the_loader_and_the_fetch_script() -> None:
    sets = known_sets()
    assert set(sets) == {"mnist", "fixture-1000"} and all(set(s) == set(MNIST_FILES) for s in sets.values())
    script = (ROOT / "scripts" / "fetch_mnist.sh").read_text()
    assert "ddpm_mnist/assets/mnist.md5" in script
    assert not any(md5 in script for md5 in sets["mnist"].values())  # no second copy of the hashes
    shown = subprocess.run(["scripts/fetch_mnist.sh", "--md5s"], cwd=ROOT, capture_output=True, text=True)
    assert dict(line.split() for line in shown.stdout.splitlines()) == sets["mnist"], shown.stderr


def test_the_fetch_script_refuses_a_root_that_is_a_file_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = subprocess.run([str(ROOT / "scripts" / "fetch_mnist.sh"), str(tmp_path / "file")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    root = tmp_path / "file"
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: cannot create {root}/MNIST/raw (is {root}, or a folder on the way, a file?): give a folder for MNIST"]
