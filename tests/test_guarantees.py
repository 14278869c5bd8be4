"""The README's guarantees, tried as a hostile user would: each test names its item.

No lost runs (resume, the run folder's lock, full disks, partial files), no hangs (alias bombs,
huge --n), no silent garbage (NaN weights, sample-time overrides, duplicate keys, damaged MNIST,
process counts), and one line with exit code 2 for every bad input.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_ROOT, ROOT, SMOKE, run_cli
from helpers import digest, one_line_error, smoke_run, weights

from ddpm_mnist.checkpoint import load_checkpoint
from ddpm_mnist.config import Config, SampleRequest, config_from_dict, load_config
from ddpm_mnist.data import MNIST_FILES, known_sets, load_mnist
from ddpm_mnist.errors import ConfigError, DataError, RunError
from ddpm_mnist.paths import atomic_file, temporary_name
from ddpm_mnist.runfolder import RunFolder


def train_args(out_dir: Path, *sets: str) -> list[str]:
    args = ["train", "--config", SMOKE, "--set", f"data.root={FIXTURE_ROOT}", "--set", f"out_dir={out_dir}"]
    for item in sets:
        args += ["--set", item]
    return args


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real filesystem of a given size (tmpfs; needs root), unmounted afterwards."""
    mounted: list[Path] = []

    def make(size_kb: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}): needs root")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path) -> None:
    """Fill a filesystem to the last byte."""
    for name, block in (("filler", 65536), ("filler-tail", 1)):
        try:
            with open(disk / name, "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * block)
        except OSError:
            pass


# --- 1. --resume never starts over while checkpoints remain ---------------------------------------

@pytest.mark.slow
def test_1_resume_without_latest_continues_from_the_newest_numbered_checkpoint(smoke_cfg: Config, capsys) -> None:
    sets = ["train.checkpoint_every=5", "train.keep_checkpoints=5", "train.sample_every=0", "model.dropout=0.1"]
    straight = smoke_run(smoke_cfg, *sets, "name=straight")
    broken = smoke_cfg.run_dir.parent / "broken"
    shutil.copytree(straight, broken)
    checkpoints = broken / "checkpoints"
    for name in ("latest.pt", "step_000000020.pt"):
        (checkpoints / name).unlink()
    (checkpoints / "step_000000015.pt").write_bytes(b"torn")  # the newest numbered one does not load
    step10 = digest(checkpoints / "step_000000010.pt")
    capsys.readouterr()
    smoke_run(smoke_cfg, *sets, "name=broken", resume=True)
    out = capsys.readouterr().out
    assert "resuming from step_000000010.pt, the newest checkpoint that loads (1 newer one(s) do not load)" in out
    assert digest(checkpoints / "step_000000010.pt") == step10  # not overwritten by a fresh run
    a, b = weights(straight), weights(broken)
    assert all(torch.equal(a[key], b[key]) for key in a)  # the run continued, bit for bit


@pytest.mark.slow
def test_1_resume_refuses_when_no_checkpoint_loads(smoke_cfg: Config) -> None:
    run_dir = smoke_run(smoke_cfg, "train.steps=10", "train.checkpoint_every=5", "train.sample_every=0")
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "latest.pt").unlink()
    for path in checkpoints.glob("step_*.pt"):
        path.write_bytes(b"\0" * 10)
    before = sorted(p.name for p in checkpoints.iterdir())
    with pytest.raises(Exception, match=r"no checkpoint in .* loads; the newest says"):
        smoke_run(smoke_cfg, "train.steps=10", "train.checkpoint_every=5", resume=True)
    assert sorted(p.name for p in checkpoints.iterdir()) == before


# --- 2. one writer per run folder -------------------------------------------------------------------

@pytest.mark.slow
def test_2_a_second_writer_is_refused_with_the_pid_of_the_first(smoke_cfg: Config, capsys) -> None:
    run_dir = smoke_run(smoke_cfg, "train.steps=5", "train.sample_every=0")
    before = {p.name: digest(p) for p in (run_dir / "checkpoints").iterdir()}
    with RunFolder(run_dir):  # another `ddpm train` of this run, still going
        code, _, err = run_cli(capsys, *train_args(smoke_cfg.out_dir, "train.steps=10"), "--resume")
        one_line_error(code, err, f"{run_dir} is in use by process {os.getpid()}")
        code, _, err = run_cli(capsys, *train_args(smoke_cfg.out_dir, "train.steps=10"), "--overwrite")
        one_line_error(code, err, "is in use by process")
    assert {p.name: digest(p) for p in (run_dir / "checkpoints").iterdir()} == before  # nothing deleted


@pytest.mark.slow
def test_2_a_lock_left_by_a_killed_process_does_not_block(smoke_cfg: Config) -> None:
    run_dir = smoke_cfg.run_dir
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from ddpm_mnist.runfolder import RunFolder; "
        f"RunFolder(Path({str(run_dir)!r})).lock(); print('locked', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunError, match=f"in use by process {holder.pid}"):
        RunFolder(run_dir).lock()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    smoke_run(smoke_cfg, "train.steps=2", "train.sample_every=0")  # the OS released the lock
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["step"] == 2


def test_2_temporary_files_have_names_no_other_writer_picks(tmp_path: Path) -> None:
    target = tmp_path / "latest.pt"
    names = {temporary_name(target) for _ in range(100)}
    assert len(names) == 100 and all(str(os.getpid()) in n.name and n.name.startswith(".latest.pt.") for n in names)
    with pytest.raises(ZeroDivisionError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise ZeroDivisionError  # any failure while writing
    assert list(tmp_path.iterdir()) == []  # no final file, no temporary left


# --- 3. a full disk is one line, and the last checkpoint survives -----------------------------------

@pytest.mark.slow
def test_3_training_onto_a_full_disk_keeps_the_last_checkpoint(small_disk, capsys) -> None:
    disk = small_disk(1500)  # room for one smoke checkpoint (0.9 MB), not two
    args = train_args(disk, "train.sample_every=0", "train.keep_checkpoints=1")
    code, _, err = run_cli(capsys, *args)
    line = one_line_error(code, err, "cannot write checkpoint")
    assert "No space left on device" in line
    checkpoints = disk / "smoke" / "checkpoints"
    assert load_checkpoint(checkpoints / "latest.pt")["step"] == 10
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")] == []
    fill(disk)
    code, _, err = run_cli(capsys, *args, "--resume")  # the event file cannot even be opened now
    one_line_error(code, err, "No space left on device")
    assert load_checkpoint(checkpoints / "latest.pt")["step"] == 10


# --- 4. no partial file under a final name ------------------------------------------------------------

@pytest.mark.slow
def test_4_outputs_on_a_full_disk_leave_older_files_whole(trained_run: Path, small_disk, capsys) -> None:
    disk = small_disk(64)
    old_csv, old_png = disk / "s.csv", disk / "s.png"
    old_csv.write_text("an older schedule\n")
    old_png.write_bytes(b"an older plot")
    (disk / "each").mkdir()
    fill(disk)
    code, _, err = run_cli(capsys, "schedule", "--csv", old_csv)
    one_line_error(code, err, f"cannot write {old_csv}")
    code, _, err = run_cli(capsys, "schedule", "--plot", old_png)
    one_line_error(code, err, f"cannot write {old_png}")
    assert old_csv.read_text() == "an older schedule\n" and old_png.read_bytes() == b"an older plot"
    ckpt = trained_run / "checkpoints" / "latest.pt"
    for extra in (["--images-dir", disk / "each"], ["--tensor", disk / "t.pt"]):
        code, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", "2", "--steps", "2", "--out",
                               trained_run.parent / "grid.png", *extra)
        one_line_error(code, err, "cannot write")
    code, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", "2", "--steps", "2", "--out", disk / "g.png")
    one_line_error(code, err, f"cannot write {disk / 'g.png'}")
    leftovers = [p.name for p in disk.rglob("*") if p.name not in ("s.csv", "s.png", "each", "filler", "filler-tail")]
    assert leftovers == []  # no 0-byte PNG, no .tmp


def test_4_a_killed_writer_leaves_no_partial_png(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    from ddpm_mnist.images import save_each

    def dies_halfway(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        Path(fp).write_bytes(b"\x89PNG half")  # type: ignore[arg-type]
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(Image.Image, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_each(torch.zeros(3, 1, 28, 28, dtype=torch.uint8), tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- 5. YAML alias bombs, deep nesting, huge values ---------------------------------------------------

BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9))


def test_5_alias_bombs_and_deep_nesting_are_one_short_line(tmp_path: Path, capsys) -> None:
    cases = {"bomb.yaml": (BILLION_LAUGHS, "aliases (*a) are not allowed"),
             "deep.yaml": ("train: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 8 levels deep"),
             "huge.yaml": ("seed: " + "x" * 5_000_000 + "\n", "5,000,007 bytes; a config is at most 1,048,576")}
    for name, (text, says) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        code, _, err = run_cli(capsys, "config", "--config", path)
        line = one_line_error(code, err, says)
        assert len(line) < 400, line


def test_5_a_stored_config_bomb_is_described_briefly() -> None:
    bomb: list = ["lol"] * 9
    for _ in range(9):
        bomb = [bomb] * 9  # 9**10 leaves, shared: cheap to hold, ruinous to repr()
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    for value in (bomb, deep):
        with pytest.raises(ConfigError) as info:
            config_from_dict({"train": {"lr": value}}, "ckpt (its stored config)")
        assert "train.lr: must be a number" in str(info.value) and len(str(info.value)) < 300


# --- 6. --n and --batch-size that cannot fit are refused up front ------------------------------------

@pytest.mark.slow
def test_6_an_impossible_sample_size_is_refused_before_sampling(trained_run: Path, tmp_path: Path, capsys) -> None:
    ckpt = trained_run / "checkpoints" / "latest.pt"
    code, out, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", "10000000", "--batch-size", "65536",
                             "--out", tmp_path / "g.png", "--tensor", tmp_path / "all.pt")
    one_line_error(code, err, "GiB")
    assert "sampling" not in out and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_6_eval_checks_memory_before_sampling_too(trained_run: Path, monkeypatch, capsys) -> None:
    import ddpm_mnist.sample as sample

    monkeypatch.setattr(sample, "available_memory_bytes", lambda device: 50 * 2**20)  # a nearly full machine
    code, out, err = run_cli(capsys, "eval", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "500",
                             "--steps", "2", "--batch-size", "500")
    one_line_error(code, err, "sampling 500 images in batches of 500 needs about 0.5 GiB, and 0.0 GiB is free")
    assert "sampling 500 images to evaluate" in out and "eval:" not in err  # refused before the first step


@pytest.mark.slow
def test_6_images_stream_to_their_files_batch_by_batch(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    import ddpm_mnist.sample_files as sample_files

    calls: list[tuple[int, int]] = []
    real = sample_files.save_each

    def recording(images: torch.Tensor, folder: Path, first: int) -> Path:
        calls.append((first, len(images)))
        return real(images, folder, first)

    monkeypatch.setattr(sample_files, "save_each", recording)
    sample_files.sample_from_checkpoint(trained_run / "checkpoints" / "latest.pt",
                                        request=SampleRequest(n=10, steps=2, batch_size=4),
                                        out=tmp_path / "g.png", images_dir=tmp_path / "each")
    assert calls == [(0, 4), (4, 4), (8, 2)]
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == [f"{k:06d}.png" for k in range(10)]


# --- 7. non-finite weights and images ----------------------------------------------------------------

@pytest.mark.slow
def test_7_a_checkpoint_with_one_nan_bias_is_refused(trained_run: Path, tmp_path: Path, capsys) -> None:
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
def test_7_non_finite_images_stop_sampling(trained_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from ddpm_mnist.maths.unet import UNet

    real = UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, x, t: real(self, x, t) * float("inf"))
    code, _, err = run_cli(capsys, "sample", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "3",
                           "--steps", "3", "--out", tmp_path / "g.png", "--set", "sample.clip_sample=false")
    one_line_error(code, err, "sampling produced NaN or infinite values in 3 of 3 images")
    assert not (tmp_path / "g.png").exists()


# --- 8. sample-time overrides cannot change the trained model ----------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("override", ["schedule.num_timesteps=10", "schedule.beta_schedule=cosine",
                                      "model.prediction_type=x0", "train.lr=1"])
def test_8_sample_time_set_cannot_change_the_trained_model(trained_run: Path, tmp_path: Path, capsys,
                                                           override: str) -> None:
    key = override.split("=")[0]
    for command in ("sample", "eval"):
        code, _, err = run_cli(capsys, command, "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "2",
                               "--steps", "2", "--set", override)
        one_line_error(code, err, f"{key} belongs to the trained model")


@pytest.mark.slow
def test_8_sample_and_runtime_keys_can_change(trained_run: Path, tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "sample", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "2",
                             "--out", tmp_path / "g.png", "--set", "sample.steps=3", "--set", "runtime.device=cpu",
                             "--set", "seed=5")
    assert code == 0, err
    assert "3 steps (leading), seed 5" in out


# --- 9. duplicate keys -------------------------------------------------------------------------------

def test_9_duplicate_keys_name_the_key_and_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  batch_size: 32\n  lr: 0.001\nmodel: {}\ntrain:\n  batch_size: 128\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'train' \(lines 1 and 5\)"):
        load_config(path)
    path.write_text("train:\n  lr: 0.001\n  lr: 0.0002\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' \(lines 2 and 3\)"):
        load_config(path)


# --- 10. MNIST contents ------------------------------------------------------------------------------

def copy_fixture(tmp_path: Path) -> Path:
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(FIXTURE_ROOT / "MNIST" / "raw", raw)
    return raw


def test_10_garbled_pixels_are_refused_with_both_hashes(tmp_path: Path) -> None:
    raw = copy_fixture(tmp_path)
    data = bytearray((raw / "train-images-idx3-ubyte").read_bytes())
    for i in range(16, len(data), 97):
        data[i] ^= 0x5A
    (raw / "train-images-idx3-ubyte").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte has MD5 [0-9a-f]{32} \(damaged, or not MNIST\), "
                                        r"not the published 6bbc9ace898e44ae57da46a324031adb"):
        load_mnist(tmp_path, download=False)


def test_10_test_files_copied_over_the_training_files_are_named(tmp_path: Path) -> None:
    raw = copy_fixture(tmp_path)
    shutil.copyfile(raw / "t10k-images-idx3-ubyte", raw / "train-images-idx3-ubyte")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte has MD5 \w+ \(that of t10k-images-idx3-ubyte\)"):
        load_mnist(tmp_path, download=False)


@pytest.mark.parametrize("damage", ["magic", "count", "rows", "short"])
def test_10_damaged_headers_give_a_reason(tmp_path: Path, damage: str) -> None:
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


def test_10_one_table_of_md5s_serves_the_loader_and_the_fetch_script() -> None:
    sets = known_sets()
    assert set(sets) == {"mnist", "fixture-1000"} and all(set(s) == set(MNIST_FILES) for s in sets.values())
    script = (ROOT / "scripts" / "fetch_mnist.sh").read_text()
    assert "ddpm_mnist/assets/mnist.md5" in script
    assert not any(md5 in script for md5 in sets["mnist"].values())  # no second copy of the hashes
    shown = subprocess.run(["scripts/fetch_mnist.sh", "--md5s"], cwd=ROOT, capture_output=True, text=True)
    assert dict(line.split() for line in shown.stdout.splitlines()) == sets["mnist"], shown.stderr


# --- 11. resuming on another number of processes -----------------------------------------------------

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python")
def test_11_resuming_on_another_process_count_is_refused_unless_asked(smoke_cfg: Config, tmp_path: Path) -> None:
    smoke_run(smoke_cfg, "train.steps=4", "train.sample_every=0")
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "ddpm_mnist",
               *map(str, train_args(smoke_cfg.out_dir, "train.steps=6", "train.sample_every=0")), "--device", "cpu",
               "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    refused = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    says = ("the run was trained by 1 process(es) and this is 2: the effective batch would go from 32 to 64, "
            "an epoch from 31 to 15 steps")
    assert says in refused.stderr, refused.stderr[-2000:]
    assert load_checkpoint(smoke_cfg.run_dir / "checkpoints" / "latest.pt")["step"] == 4
    allowed = subprocess.run([*command, "--change-world-size"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "note: resuming a 1-process run on 2" in allowed.stdout
    assert load_checkpoint(smoke_cfg.run_dir / "checkpoints" / "latest.pt")["world_size"] == 2


# --- 12. values that used to raise tracebacks --------------------------------------------------------

@pytest.mark.parametrize("override, says", [
    ("train.lr=1" + "0" * 400, "train.lr: must be a finite number"),
    ("seed=" + "1" * 5000, "not a value a config can hold"),
    ("train.lr=!!float abc", "not a value a config can hold"),
    ("train.steps=" + "[" * 3000 + "]" * 3000, "nested more than 8 levels deep"),
    ("out_dir=a\0b", "not valid YAML"),
    ('data.root="a\\0b"', "must not contain a NUL character"),
])
def test_12_override_values_that_raised_are_one_line(override: str, says: str, capsys) -> None:
    code, _, err = run_cli(capsys, "config", "--set", override)
    line = one_line_error(code, err, says)
    assert len(line) < 400


def test_12_a_date_like_name_is_a_name(capsys) -> None:
    code, out, err = run_cli(capsys, "config", "--set", "name=2001-13-45")
    assert code == 0 and "name: '2001-13-45'" in out, err  # quoted, so that any YAML reader sees a string


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
def test_12_checkpoint_fields_of_the_wrong_type_are_one_line(trained_run: Path, tmp_path: Path, capsys,
                                                             field: str, value: object, says: str) -> None:
    state = torch.load(trained_run / "checkpoints" / "latest.pt", weights_only=True)
    state[field] = value
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    code, _, err = run_cli(capsys, "sample", "--ckpt", bad, "--n", "2", "--steps", "2", "--out", tmp_path / "g.png")
    one_line_error(code, err, says)


@pytest.mark.slow
def test_12_fuzzed_checkpoints_are_one_line(trained_run: Path, tmp_path: Path, capsys) -> None:
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


# --- 13. code-running pickles: the refused global, never torch's advice -------------------------------

@pytest.mark.slow
def test_13_a_code_running_pickle_names_the_global_and_gives_no_unsafe_advice(tmp_path: Path, capsys) -> None:
    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo this ran code",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "ddpm-mnist-checkpoint", "payload": Exploit()}, evil)
    code, out, err = run_cli(capsys, "sample", "--ckpt", evil, "--n", "1", "--steps", "2")
    line = one_line_error(code, err, f"refused: the file asks to load the Python object {os.system.__module__}.system")
    assert "weights_only" not in line and "this ran code" not in out


# --- 14. eval checks every argument before sampling ---------------------------------------------------

@pytest.mark.slow
def test_14_eval_checks_n_against_the_floor_before_sampling(trained_run: Path, tmp_path: Path, capsys) -> None:
    started = time.perf_counter()
    code, out, err = run_cli(capsys, "eval", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "1001",
                             "--steps", "1000", "--set", "sample.batch_size=1001")
    one_line_error(code, err, "n = 1001 is more than the 1000 real digits of the floor")
    assert "sampling" not in out
    assert time.perf_counter() - started < 120  # 1001 images x 1000 steps would take many minutes here


@pytest.mark.slow
def test_14_eval_refuses_a_negative_n(trained_run: Path, tmp_path: Path, capsys) -> None:
    tensor = tmp_path / "s.pt"
    assert run_cli(capsys, "sample", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "15", "--steps", "2",
                   "--tensor", tensor, "--out", tmp_path / "g.png")[0] == 0
    for n in ("-1", "0", "16"):
        code, _, err = run_cli(capsys, "eval", "--samples", tensor, "--n", n, "--data", FIXTURE_ROOT)
        one_line_error(code, err, f"--n {n}: {tensor} holds 15 images")


# --- 15. output names --------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("args, says", [
    (["--out", "x.jpg"], "--out x.jpg: the file name must end in .png"),
    (["--trajectory", "traj.png"], "--trajectory traj.png: the file name must end in .gif"),
    (["--tensor", "x.txt"], "--tensor x.txt: the file name must end in .pt or .npz"),
    (["--out", "t_strip.png", "--trajectory", "t.gif"], "--out and --trajectory's strip both write t_strip.png"),
])
def test_15_output_names_are_checked(trained_run: Path, tmp_path: Path, capsys, monkeypatch, args: list[str],
                                     says: str) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "sample", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "2",
                             "--steps", "2", *args)
    one_line_error(code, err, says)
    assert list(tmp_path.iterdir()) == []


def test_15_schedule_outputs_and_eval_json_are_checked(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "schedule", "--csv", tmp_path / "s.png")
    one_line_error(code, err, "the file name must end in .csv")
    code, _, err = run_cli(capsys, "schedule", "--plot", tmp_path / "s.csv")
    one_line_error(code, err, "the file name must end in .png")
    code, _, err = run_cli(capsys, "eval", "--samples", tmp_path / "x.pt", "--json", tmp_path / "m.txt")
    one_line_error(code, err, "the file name must end in .json")
    assert list(tmp_path.iterdir()) == []
