"""checkpoint_checks: a checkpoint from a stranger is checked tensor by tensor before any use.

Each crafted file here once crashed, hung or silently sampled garbage: now each is one line with
exit code 2 that names the field, for `ddpm sample`, `ddpm eval` and `ddpm train --resume` alike.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_ROOT, ROOT, SMOKE, run_cli
from helpers import one_line_error

from ddpm_mnist.checkpoint import load
from ddpm_mnist.errors import CheckpointError

pytestmark = pytest.mark.slow  # every test reads the session's trained smoke run


def latest(run: Path) -> Path:
    return run / "checkpoints" / "latest.pt"


def crafted(trained_run: Path, tmp_path: Path, change) -> Path:
    """A copy of the smoke checkpoint, loaded, changed by `change(state)`, saved as a new file."""
    state = torch.load(latest(trained_run), weights_only=True)
    change(state)
    path = tmp_path / "crafted.pt"
    torch.save(state, path)
    return path


def refused_everywhere(path: Path, tmp_path: Path, capsys, says: str) -> None:
    """ddpm sample and ddpm eval both refuse the file in one line that says `says`, writing nothing."""
    code, _, err = run_cli(capsys, "sample", "--ckpt", path, "--n", "2", "--steps", "2", "--out", tmp_path / "g.png")
    one_line_error(code, err, says)
    code, _, err = run_cli(capsys, "eval", "--ckpt", path, "--n", "4", "--steps", "2", "--data", FIXTURE_ROOT)
    one_line_error(code, err, says)
    assert not (tmp_path / "g.png").exists()


def set_weight(key: str, value):
    def change(state: dict) -> None:
        state["ema"][key] = value
    return change


@pytest.mark.parametrize("value, says", [
    (torch.zeros(1).to_sparse(), "ema.out_conv.bias: a sparse_coo tensor"),
    (torch.zeros(1, device="meta"), "ema.out_conv.bias: a tensor on meta"),
    (torch.zeros(1, dtype=torch.int32), "ema.out_conv.bias: dtype int32, where float32 is expected"),
    (torch.zeros(1, dtype=torch.bool), "ema.out_conv.bias: dtype bool"),
    (torch.zeros(1, dtype=torch.complex64), "ema.out_conv.bias: dtype complex64"),
    (torch.zeros(2), "ema.out_conv.bias: shape (2,), where the model's is (1,)"),
])
def test_weights_of_another_layout_dtype_or_shape_are_refused(trained_run: Path, tmp_path: Path, capsys, value,
                                                              says: str) -> None:
    refused_everywhere(crafted(trained_run, tmp_path, set_weight("out_conv.bias", value)), tmp_path, capsys, says)


def test_a_view_claiming_more_elements_than_its_storage_is_refused_without_allocating(
        trained_run: Path, tmp_path: Path, capsys) -> None:
    state = torch.load(latest(trained_run), weights_only=True)
    shape = state["ema"]["out_conv.weight"].shape  # (1, C, 3, 3)
    giant = torch.zeros(1).as_strided(shape, (0, 0, 0, 0))  # every element is the one float
    state["ema"]["out_conv.weight"] = giant
    path = tmp_path / "view.pt"
    torch.save(state, path)
    refused_everywhere(path, tmp_path, capsys, "ema.out_conv.weight: a strided view")
    huge = torch.zeros(1).as_strided((10**6, 10**6), (0, 0))  # 4 TB if it were materialised
    refused_everywhere(crafted(trained_run, tmp_path, set_weight("out_conv.bias", huge)), tmp_path, capsys,
                       "shape (1000000, 1000000)")


def flip_byte_in_record(path: Path, record: str) -> None:
    """Change one byte in the middle of a zip record's data, leaving the archive's structure intact."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(record)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    data[start + info.file_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_tensor_record_is_caught_by_its_crc(trained_run: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "flipped.pt"
    shutil.copyfile(latest(trained_run), path)
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size).filename
    flip_byte_in_record(path, record)
    refused_everywhere(path, tmp_path, capsys, f"damaged: record {record} does not match its CRC")


@pytest.mark.parametrize("content", ["zeros", "tar"])
def test_files_that_are_not_torch_archives_never_quote_torchs_unsafe_advice(tmp_path: Path, capsys,
                                                                          content: str) -> None:
    path = tmp_path / f"{content}.pt"
    if content == "zeros":
        path.write_bytes(b"\0" * 2048)
    else:
        with tarfile.open(path, "w") as tar:
            info = tarfile.TarInfo("x")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    code, _, err = run_cli(capsys, "sample", "--ckpt", path, "--n", "1", "--steps", "2", "--out", tmp_path / "g.png")
    line = one_line_error(code, err, "not a torch zip archive")
    assert "weights_only" not in line and "Re-run" not in line


def adamw_change(key: str, value, group: int | None = None):
    def change(state: dict) -> None:
        if group is not None:
            state["optimizer"]["param_groups"][group][key] = value
        else:
            state["optimizer"]["state"][0][key] = value
    return change


@pytest.mark.parametrize("change, says", [
    (adamw_change("exp_avg", torch.zeros(2)), "optimizer.state[0].exp_avg: shape (2,)"),
    (adamw_change("exp_avg_sq", -torch.ones(32, 8)), "optimizer.state[0].exp_avg_sq: holds negative values"),
    (adamw_change("step", torch.tensor(float("nan"))), "optimizer.state[0].step: must be finite and >= 0"),
    (adamw_change("betas", (2.0, 0.999), group=0), "optimizer.param_groups[0].betas[0]: must lie in [0, 1)"),
    (adamw_change("weight_decay", -0.1, group=0), "optimizer.param_groups[0].weight_decay: must lie in [0, inf]"),
    (adamw_change("lr", "0.001", group=1), "optimizer.param_groups[1].lr: must be a finite number, got '0.001'"),
    (adamw_change("eps", 0.0, group=0), "optimizer.param_groups[0].eps: must lie in (0, inf]"),
    (adamw_change("amsgrad", True, group=0), "optimizer.param_groups[0].amsgrad: must be false"),
])
def test_crafted_optimiser_state_is_refused_naming_the_field(trained_run: Path, tmp_path: Path, change,
                                                             says: str) -> None:
    path = crafted(trained_run, tmp_path, change)
    with pytest.raises(CheckpointError, match=r"^.*crafted\.pt: ") as caught:
        load(path)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_a_wrong_shaped_moment_refuses_resume_instead_of_corrupting_memory(trained_run: Path, tmp_path: Path) -> None:
    """The fused CPU AdamW once wrote past a too-small exp_avg: the process died with a segfault."""
    out = tmp_path / "runs"
    shutil.copytree(trained_run, out / "smoke")
    path = latest(out / "smoke")
    state = torch.load(path, weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(2)
    torch.save(state, path)
    done = subprocess.run([sys.executable, "-m", "ddpm_mnist", "train", "--config", str(SMOKE), "--resume",
                           "--set", f"data.root={FIXTURE_ROOT}", "--set", f"out_dir={out}", "--set", "train.steps=25"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    one_line_error(done.returncode, done.stderr, "optimizer.state[0].exp_avg: shape (2,), where the model's is (32, 8)")


@pytest.mark.parametrize("field, value, says", [
    ("lr_scheduler", {"base_lrs": [1e-3, 1e-3], "last_epoch": 20, "lr_lambdas": [None, None], "optimizer": 1},
     "lr_scheduler: holds 'optimizer'"),
    ("lr_scheduler", {"base_lrs": [1e-3, float("nan")], "last_epoch": 20, "_last_lr": [1e-3, 1e-3],
                      "lr_lambdas": [None, None]}, "lr_scheduler.base_lrs[1]: must be a finite number"),
    ("rng", [{"torch": torch.zeros(5056), "cuda": None, "train": torch.zeros(5056, dtype=torch.uint8)}],
     "rng[0].torch: dtype float32, where uint8 is expected"),
    ("ema_num_averaged", 2**70, "its ema_num_averaged must be a whole number >= 0"),
])
def test_crafted_schedule_rng_and_counters_are_refused(trained_run: Path, tmp_path: Path, field: str, value,
                                                       says: str) -> None:
    def change(state: dict) -> None:
        state[field] = value
    with pytest.raises(CheckpointError) as caught:
        load(crafted(trained_run, tmp_path, change))
    assert says in str(caught.value)


def test_the_trained_checkpoint_passes_every_check(trained_run: Path) -> None:
    state = load(latest(trained_run)).contents
    assert state["step"] == 20 and set(state["optimizer"]) == {"state", "param_groups"}


@pytest.mark.slow
def test_a_checkpoint_with_one_nan_bias_is_refused(trained_run: Path, tmp_path: Path, capsys) -> None:
    state = torch.load(trained_run / "checkpoints" / "latest.pt", weights_only=True)
    state["ema"]["out_conv.bias"][0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    code, _, err = run_cli(capsys, "sample", "--ckpt", bad, "--n", "2", "--steps", "2", "--out", tmp_path / "g.png")
    one_line_error(code, err, "EMA weights hold NaN or infinite values (1 tensor(s), e.g. out_conv.bias)")
    code, _, err = run_cli(capsys, "eval", "--ckpt", bad, "--n", "4", "--steps", "2")
    one_line_error(code, err, "NaN or infinite")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("field, value, says", [
    ("step", "10", "its step must be a whole number >= 0, got '10'"),
    ("step", None, "its step must be a whole number >= 0, got None"),
    ("step", -3, "its step must be a whole number >= 0, got -3"),
    ("world_size", True, "its world_size must be a whole number >= 0, got True"),
    ("ema", {"w": "not a tensor"}, "its ema weights are not a mapping of names to tensors"),
    ("config", {"train": {"lr": 10**400}}, "train.lr: must be a finite number"),
    ("config", {"train": {"lr": [[[[[[[[[[1]]]]]]]]]]}}, "train.lr: must be a number"),
    ("format_version", "2", "checkpoint format version '2'"),
])
def test_checkpoint_fields_of_the_wrong_type_are_one_line(trained_run: Path, tmp_path: Path, capsys,
                                                             field: str, value: object, says: str) -> None:
    state = torch.load(trained_run / "checkpoints" / "latest.pt", weights_only=True)
    state[field] = value
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    code, _, err = run_cli(capsys, "sample", "--ckpt", bad, "--n", "2", "--steps", "2", "--out", tmp_path / "g.png")
    one_line_error(code, err, says)


@pytest.mark.slow
def test_fuzzed_checkpoints_are_one_line(trained_run: Path, tmp_path: Path, capsys) -> None:
    import random

    good = torch.load(trained_run / "checkpoints" / "latest.pt", weights_only=True)
    odd = [None, True, -1, 10**400, 1.5, float("nan"), "", "x" * 10_000, [], {}, [[[[]]]], b"bytes",
           torch.zeros(3), {"a": torch.ones(1)}]
    rng = random.Random(0)
    for i in range(40):
        state = dict(good)
        for field in rng.sample(sorted(state), 2):
            state[field] = rng.choice(odd)
        path = tmp_path / f"fuzz{i}.pt"
        torch.save(state, path)
        code, _, err = run_cli(capsys, "sample", "--ckpt", path, "--n", "2", "--steps", "2",
                               "--out", tmp_path / f"g{i}.png")
        if code != 0:  # some changes are harmless (the epoch, the versions)
            one_line_error(code, err, "")


@pytest.mark.slow
def test_a_code_running_pickle_names_the_global_and_gives_no_unsafe_advice(tmp_path: Path, capsys) -> None:
    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo this ran code",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "ddpm-mnist-checkpoint", "payload": Exploit()}, evil)
    code, out, err = run_cli(capsys, "sample", "--ckpt", evil, "--n", "1", "--steps", "2")
    line = one_line_error(code, err, f"refused: the file asks to load the Python object {os.system.__module__}.system")
    assert "weights_only" not in line and "this ran code" not in out
