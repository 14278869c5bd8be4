"""ddpm export: a diffusers DDPMPipeline folder and a safetensors weights file, and reading both back.

diffusers (a dev extra) loads the folder with no code of ours; `ddpm sample` reads it back to the
same bytes as the checkpoint it came from.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_ROOT, SMOKE, run_cli
from helpers import digest, one_line_error, smoke_run
from safetensors.torch import save_file

from ddpm_mnist.checkpoint import load
from ddpm_mnist.config import Config, ModelConfig, load_config
from ddpm_mnist.diffusers_format import to_diffusers, unet_config
from ddpm_mnist.maths.schedule import make_schedule
from ddpm_mnist.maths.unet import UNet

diffusers = pytest.importorskip("diffusers", reason="diffusers (the dev extra) checks the exported folder")
pytestmark = pytest.mark.slow

CONDITIONAL = ["model.num_classes=10"]
LEARNED = ["model.learn_variance=true", "train.loss=hybrid", "sample.variance_type=learned_range"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Smoke checkpoints: unconditional for each prediction type, and conditional, 4 steps each."""
    out = tmp_path_factory.mktemp("export_runs")
    found = {}
    for name, sets in {"epsilon": [], "v": ["model.prediction_type=v"], "x0": ["model.prediction_type=x0",
                       "schedule.beta_schedule=cosine", "sample.clip_sample=false"],
                       "conditional": CONDITIONAL, "scale_shift": ["model.time_conditioning=scale_shift"],
                       "learned": LEARNED}.items():
        cfg = load_config(SMOKE, [f"data.root={FIXTURE_ROOT}", f"out_dir={out}", f"name={name}", "train.steps=4",
                                  "train.sample_every=0", *sets])
        found[name] = smoke_run(cfg) / "checkpoints" / "latest.pt"
    return found


def export(capsys, ckpt: Path, out: Path, *more: str) -> None:
    code, _, err = run_cli(capsys, "export", "--ckpt", ckpt, "--out", out, *more)
    assert code == 0, err


@pytest.mark.parametrize("kind", ["epsilon", "v", "x0", "conditional", "scale_shift", "learned"])
def test_diffusers_loads_the_folder_and_computes_our_unets_output(runs, tmp_path: Path, capsys, kind: str) -> None:
    ckpt = runs[kind]
    export(capsys, ckpt, tmp_path / "pipe")
    checkpoint = load(ckpt)
    cfg = checkpoint.config
    ours = checkpoint.build_model(use_ema=True)
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet").eval()
    torch.manual_seed(0)
    x, t = torch.randn(6, 1, 28, 28), torch.randint(0, 1000, (6,))
    labels = torch.tensor([0, 3, 9, 10, 10, 5]) if cfg.model.num_classes else None  # 10: "no class"
    with torch.no_grad():
        expected = ours(x, t, labels)
        got = unet(x, t, class_labels=labels).sample
    assert (expected - got).abs().max() < 1e-5
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "pipe" / "scheduler")
    assert (scheduler.betas.double() - make_schedule(cfg.schedule).betas.double()).abs().max() < 1e-6
    assert scheduler.config.prediction_type == {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}[
        cfg.model.prediction_type]
    assert (scheduler.config.clip_sample, scheduler.config.variance_type, scheduler.config.timestep_spacing) == (
        cfg.sample.clip_sample, cfg.sample.variance_type, cfg.sample.timestep_spacing)
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert "DDPMPipeline" in card and "steps: 4" in card and ("class_labels" in card) == bool(cfg.model.num_classes)


@pytest.mark.parametrize("options", [{}, {"time_conditioning": "scale_shift"},
                                     {"time_conditioning": "scale_shift", "num_classes": 10}],
                         ids=["add", "scale-shift", "scale-shift-conditional"])
def test_unet2dmodel_with_our_config_and_weights_computes_our_output(options: dict) -> None:
    """Every weight random (none zero, as at initialisation), so each block's time path counts."""
    model = ModelConfig(base_channels=16, channel_mult=[1, 2, 2], attention_resolutions=[7], num_groups=4,
                        dropout=0.0, **options)
    torch.manual_seed(0)
    ours = UNet(model).eval()
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.1)
    theirs = diffusers.UNet2DModel(**{k: v for k, v in unet_config(model).items() if not k.startswith("_")}).eval()
    theirs.load_state_dict(to_diffusers(ours.state_dict()))
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([0, 10, 500, 999])
    labels = torch.tensor([1, 7, 10, 4]) if model.num_classes else None
    with torch.no_grad():
        expected, got = ours(x, t, labels), theirs(x, t, class_labels=labels).sample
    assert expected.abs().mean() > 0.01 and (expected - got).abs().max() < 1e-4 * expected.abs().max()


def test_ddpm_pipeline_runs_on_the_folder(runs, tmp_path: Path, capsys) -> None:
    export(capsys, runs["epsilon"], tmp_path / "pipe")
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (28, 28)


def test_diffusers_euler_scheduler_on_the_folder_draws_what_ddpm_sample_euler_draws(runs, tmp_path: Path,
                                                                                   capsys) -> None:
    """The loop docs/export.md shows: EulerDiscreteScheduler.from_config on the exported scheduler, started
    from ddpm sample's x_T, against `ddpm sample --sampler euler` (which clips x0_hat unless told not to;
    diffusers' Euler never clips)."""
    from ddpm_mnist.data import to_uint8
    from ddpm_mnist.maths.samplers import NoiseSource

    export(capsys, runs["epsilon"], tmp_path / "pipe")
    code, _, err = run_cli(capsys, "sample", "--ckpt", runs["epsilon"], "--sampler", "euler", "--steps", "12",
                           "--n", "4", "--seed", "3", "--tensor", tmp_path / "ours.pt", "--out", tmp_path / "o.png",
                           "--set", "sample.clip_sample=false", "--set", "runtime.mixed_precision=fp32")
    assert code == 0, err
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "pipe", subfolder="unet").eval()
    scheduler = diffusers.EulerDiscreteScheduler.from_config(
        diffusers.DDPMScheduler.load_config(tmp_path / "pipe", subfolder="scheduler"))
    scheduler.set_timesteps(12)
    x = NoiseSource(3, range(4), torch.device("cpu")).initial() * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    theirs, ours = to_uint8(x.clamp(-1, 1)), torch.load(tmp_path / "ours.pt")
    assert (theirs.int() - ours.int()).abs().max() <= 1  # uint8 levels: float rounding may cross one


def test_ddpm_pipeline_samples_a_learned_variance_as_ddpm_sample_does(runs, tmp_path: Path, capsys,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers' own loop on the exported folder (UNet2DModel with out_channels 2, DDPMScheduler with
    learned_range), given ddpm sample's x_T and z, draws ddpm sample's images; DDPMPipeline runs it as is."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    from ddpm_mnist.data import to_uint8
    from ddpm_mnist.maths.samplers import NoiseSource

    export(capsys, runs["learned"], tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "unet" / "config.json").read_text())["out_channels"] == 2
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert len(pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images) == 2
    code, _, err = run_cli(capsys, "sample", "--ckpt", runs["learned"], "--steps", "6", "--n", "4", "--seed", "3",
                           "--tensor", tmp_path / "ours.pt", "--out", tmp_path / "o.png",
                           "--set", "runtime.mixed_precision=fp32")
    assert code == 0, err
    noise = NoiseSource(3, range(4), torch.device("cpu"))
    monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *args, **kwargs: noise.next())
    scheduler = pipe.scheduler
    scheduler.set_timesteps(6)
    x = noise.initial()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(pipe.unet(x, t).sample, t, x).prev_sample
    theirs, ours = to_uint8(x.clamp(-1, 1)), torch.load(tmp_path / "ours.pt")
    assert (theirs.int() - ours.int()).abs().max() <= 1  # uint8 levels: float rounding may cross one


def test_a_learned_variance_folder_diffusers_wrote_itself_samples_and_measures(tmp_path: Path, capsys) -> None:
    """A DDPMPipeline saved by diffusers (UNet2DModel with out_channels 2, learned_range) reads as a model
    that learns its variance: ddpm sample and ddpm eval --nll run on it."""
    model = ModelConfig(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[14],
                        num_groups=4, dropout=0.0, learn_variance=True)
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**{k: v for k, v in unet_config(model).items() if not k.startswith("_")})
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "theirs")
    code, out, err = run_cli(capsys, "sample", "--ckpt", tmp_path / "theirs", "--steps", "3", "--n", "2",
                             "--out", tmp_path / "grid.png")
    assert code == 0, err
    assert (tmp_path / "grid.png").exists()
    code, out, err = run_cli(capsys, "eval", "--ckpt", tmp_path / "theirs", "--nll", "--n", "2", "--nll-timesteps",
                             "2", "--data", FIXTURE_ROOT, "--json", tmp_path / "nll.json")
    assert code == 0, err
    report = json.loads((tmp_path / "nll.json").read_text())
    assert report["variance_type"] == "learned_range" and math.isfinite(report["bits_per_dim"])


@pytest.mark.parametrize("fmt, kind", [("diffusers", "conditional"), ("safetensors", "conditional"),
                                       ("diffusers", "scale_shift"), ("diffusers", "learned")])
def test_an_export_read_back_samples_the_same_bytes(runs, tmp_path: Path, capsys, fmt: str, kind: str) -> None:
    out = tmp_path / ("pipe" if fmt == "diffusers" else "weights.safetensors")
    export(capsys, runs[kind], out, "--format", fmt)
    for source, grid in ((runs[kind], tmp_path / "a.png"), (out, tmp_path / "b.png")):
        # the precision is the machine's choice (auto: bf16 on a CPU with it), not the model's: fix it for both
        code, _, err = run_cli(capsys, "sample", "--ckpt", source, "--n", "10", "--steps", "4", "--seed", "3",
                               "--out", grid, "--set", "runtime.mixed_precision=fp32")
        assert code == 0, err
    assert digest(tmp_path / "a.png") == digest(tmp_path / "b.png")
    code, _, err = run_cli(capsys, "eval", "--ckpt", out, "--n", "8", "--steps", "2", "--data", FIXTURE_ROOT)
    assert code == 0, err


def test_the_weights_file_holds_the_ema_weights_and_the_config(runs, tmp_path: Path, capsys) -> None:
    out = tmp_path / "w.safetensors"
    export(capsys, runs["v"], out, "--format", "safetensors")
    trained, read = load(runs["v"]), load(out)
    assert read.config == trained.config and read.step == trained.step
    assert read.weights(use_ema=True).keys() == trained.weights(use_ema=True).keys()
    assert all(torch.equal(read.weights(use_ema=True)[k], v) for k, v in trained.weights(use_ema=True).items())
    raw = tmp_path / "raw.safetensors"
    export(capsys, runs["v"], raw, "--format", "safetensors", "--no-ema")
    exported_raw = load(raw).weights(use_ema=True)
    assert all(torch.equal(exported_raw[k], v) for k, v in trained.weights(use_ema=False).items())


def test_bad_exports_are_one_line_and_write_nothing(runs, smoke_cfg: Config, tmp_path: Path, capsys) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\0" * 100)
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("mine\n")
    wide = smoke_run(smoke_cfg, "train.steps=2", "train.sample_every=0", "name=wide",
                     "model.attention_resolutions=[28, 14]")  # 8 and 16 channels, one head: two head sizes
    patched = smoke_run(smoke_cfg, "train.steps=2", "train.sample_every=0", "name=patched", "model.patch_size=2",
                        "model.channel_mult=[1, 2]", "model.attention_resolutions=[]")
    for args, says in ((["--ckpt", tmp_path / "missing.pt", "--out", tmp_path / "o"], "no such checkpoint file"),
                       (["--ckpt", garbage, "--out", tmp_path / "o"], "not a torch zip archive"),
                       (["--ckpt", runs["epsilon"], "--out", full], "exists and is not empty: add --overwrite"),
                       (["--ckpt", wide / "checkpoints" / "latest.pt", "--out", tmp_path / "o"],
                        "UNet2DModel cannot represent this model: its attention blocks have 2 widths"),
                       (["--ckpt", patched / "checkpoints" / "latest.pt", "--out", tmp_path / "o"],
                        "model.patch_size 2 (pixels unshuffled into channels before the first level)"),
                       (["--ckpt", runs["epsilon"], "--out", tmp_path / "o.pt", "--format", "safetensors"],
                        "must end in .safetensors"),
                       (["--ckpt", runs["epsilon"], "--out", tmp_path / "o", "--format", "onnx"], "--format onnx")):
        code, _, err = run_cli(capsys, "export", *args)
        one_line_error(code, err, says)
    assert not (tmp_path / "o").exists() and sorted(p.name for p in full.iterdir()) == ["x"]


def test_folders_and_files_that_do_not_fit_are_one_line(runs, tmp_path: Path, capsys) -> None:
    export(capsys, runs["epsilon"], tmp_path / "pipe")
    config_path = tmp_path / "pipe" / "unet" / "config.json"
    good = json.loads(config_path.read_text())
    for key, value, says in (("in_channels", 3, "in_channels is 3; ddpm-mnist's U-Net has 1"),
                             ("block_out_channels", [8, 12], "block_out_channels must be 1 to 3 multiples"),
                             ("resnet_time_scale_shift", "spatial", "resnet_time_scale_shift is 'spatial'"),
                             # diffusers then drops the middle attention's GroupNorm, which ours has
                             ("resnet_time_scale_shift", "scale_shift", "attn_norm_num_groups is None")):
        config_path.write_text(json.dumps({**good, key: value}))
        code, _, err = run_cli(capsys, "sample", "--ckpt", tmp_path / "pipe", "--n", "1", "--steps", "2",
                               "--out", tmp_path / "g.png")
        one_line_error(code, err, says)
    config_path.write_text(json.dumps(good))
    weights = tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    code, _, err = run_cli(capsys, "sample", "--ckpt", tmp_path / "pipe", "--n", "1", "--out", tmp_path / "g.png")
    one_line_error(code, err, "not a readable safetensors file")
    state = load(runs["epsilon"]).contents
    for metadata, says in (({"format": "ddpm-mnist-weights", "config": "{", "step": "4"}, "config or step"),
                           ({"format": "ddpm-mnist-weights", "config": json.dumps({"model": {"base_channels": -1}}),
                             "step": "4"}, "model.base_channels: must be >= 1"),
                           ({"format": "other"}, "not a ddpm-mnist weights file")):
        hostile = tmp_path / "hostile.safetensors"
        save_file(state["ema"], hostile, metadata=metadata)
        code, _, err = run_cli(capsys, "sample", "--ckpt", hostile, "--n", "1", "--out", tmp_path / "g.png")
        one_line_error(code, err, says)
    assert not (tmp_path / "g.png").exists()


def test_overwrite_replaces_only_an_earlier_export(runs, tmp_path: Path, capsys) -> None:
    """A folder or file --out names may be a user's: --overwrite once replaced their README.md and model_index.json."""
    users = tmp_path / "users"
    users.mkdir()
    (users / "README.md").write_text("my notes\n")
    (users / "model_index.json").write_text("{}\n")
    mine = tmp_path / "mine.safetensors"
    save_file({"x": torch.zeros(2)}, mine)
    before = {path: path.read_bytes() for path in (users / "README.md", users / "model_index.json", mine)}
    code, _, err = run_cli(capsys, "export", "--ckpt", runs["epsilon"], "--out", users, "--overwrite")
    one_line_error(code, err, "holds files ddpm export did not write (README.md, model_index.json)")
    code, _, err = run_cli(capsys, "export", "--ckpt", runs["epsilon"], "--out", mine, "--format", "safetensors",
                           "--overwrite")
    one_line_error(code, err, "is not a weights file of ddpm export, the only file it replaces")
    assert {path: path.read_bytes() for path in before} == before
    # an earlier export of its own: replaced whole, with nothing of the old one left
    export(capsys, runs["epsilon"], tmp_path / "pipe")
    (tmp_path / "pipe" / "unet" / "extra.json").write_text("{}")  # not the tool's: refused
    code, _, err = run_cli(capsys, "export", "--ckpt", runs["v"], "--out", tmp_path / "pipe", "--overwrite")
    one_line_error(code, err, "did not write (unet/extra.json)")
    (tmp_path / "pipe" / "unet" / "extra.json").unlink()
    export(capsys, runs["v"], tmp_path / "pipe", "--overwrite")
    assert load(tmp_path / "pipe").config.model.prediction_type == "v"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    export(capsys, runs["epsilon"], tmp_path / "w.safetensors", "--format", "safetensors")
    export(capsys, runs["v"], tmp_path / "w.safetensors", "--format", "safetensors", "--overwrite")


def test_an_export_inside_a_run_folder_is_refused(runs, tmp_path: Path, capsys) -> None:
    """The run's --overwrite would delete it (and once called its files foreign)."""
    inside = runs["epsilon"].parent / "latest"
    code, _, err = run_cli(capsys, "export", "--ckpt", runs["epsilon"], "--out", inside)
    one_line_error(code, err, f"lies inside {runs['epsilon'].parent.parent}, a folder ddpm-mnist writes")
    assert not inside.exists()


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_an_event_file_that_is_not_a_file_leaves_the_card_without_the_training_time(smoke_cfg: Config, tmp_path: Path,
                                                                                    capsys, kind: str) -> None:
    """A pipe named like the event file once hung ddpm export; a folder of that name gave a bare error."""
    run = smoke_run(smoke_cfg, "train.steps=2", "train.sample_every=0")
    odd = run / "events.out.tfevents.0.odd"
    if kind == "fifo":
        os.mkfifo(odd)
    else:
        odd.mkdir()
    export(capsys, run / "checkpoints" / "latest.pt", tmp_path / "pipe")
    assert "training time" not in (tmp_path / "pipe" / "README.md").read_text()


@pytest.mark.parametrize("report", ['{"samples": "x", "floor": {}, "n": 5}', '{"samples": {}, "floor": {}, "n": 5}',
                                    '[' * 50_000 + ']' * 50_000, '{"samples": {"fid_mnist": 1, "confidence": 1}, '
                                    '"floor": {"confidence": 1}, "n": 5}', "{torn"])
def test_an_eval_report_that_does_not_read_leaves_the_model_card_without_it(smoke_cfg: Config, tmp_path: Path, capsys,
                                                                            report: str) -> None:
    run = smoke_run(smoke_cfg, "train.steps=2", "train.sample_every=0")
    (run / "eval.json").write_text(report)
    export(capsys, run / "checkpoints" / "latest.pt", tmp_path / "pipe")
    assert "Measured with ddpm eval" not in (tmp_path / "pipe" / "README.md").read_text()


@pytest.mark.parametrize("sets", [["schedule.cosine_s=0.02"], ["schedule.max_beta=0.5"]])
def test_cosine_schedules_diffusers_has_no_name_for_read_back(smoke_cfg: Config, tmp_path: Path, capsys,
                                                              sets: list[str]) -> None:
    """They export as trained_betas, which reading once refused: the tool could not read its own export."""
    run = smoke_run(smoke_cfg, "train.steps=2", "train.sample_every=0", "schedule.beta_schedule=cosine", *sets)
    ckpt = run / "checkpoints" / "latest.pt"
    export(capsys, ckpt, tmp_path / "pipe")
    trained, schedule = load(ckpt).config, load(tmp_path / "pipe").config.schedule
    assert schedule.max_beta == trained.schedule.max_beta
    assert schedule.cosine_s == pytest.approx(trained.schedule.cosine_s, rel=1e-9)
    ours = make_schedule(trained.schedule).betas.double()
    assert torch.allclose(make_schedule(schedule).betas.double(), ours, rtol=1e-6, atol=0)
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    torch.testing.assert_close(scheduler.betas.double(), ours, rtol=1e-6, atol=0)  # diffusers' float32
    code, _, err = run_cli(capsys, "sample", "--ckpt", tmp_path / "pipe", "--n", "2", "--steps", "2",
                           "--out", tmp_path / "g.png")
    assert code == 0, err


def test_an_export_onto_a_full_disk_is_one_line_and_leaves_nothing(runs, small_disk, capsys) -> None:
    disk = small_disk(64)  # KB: the weights do not fit
    code, _, err = run_cli(capsys, "export", "--ckpt", runs["epsilon"], "--out", disk / "pipe")
    one_line_error(code, err, f"cannot write {disk / 'pipe'}: No space left on device")
    assert list(disk.iterdir()) == []


def test_ckpt_dot_inside_an_exported_folder_names_its_grid_after_the_folder(runs, tmp_path: Path, capsys,
                                                                              monkeypatch) -> None:
    export(capsys, runs["epsilon"], tmp_path / "pipe")
    monkeypatch.chdir(tmp_path / "pipe")
    code, out, err = run_cli(capsys, "sample", "--ckpt", ".", "--n", "2", "--steps", "2")
    assert code == 0, err
    assert (tmp_path / "pipe_ancestral2_seed0_n2.png").is_file()


def hostile_folder(runs, tmp_path: Path, capsys) -> Path:
    folder = tmp_path / "pipe"
    if not folder.exists():
        export(capsys, runs["epsilon"], folder)
    return folder


def edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("file, key, value, says", [
    ("unet", "resnet_time_scale_shift", ["default"], "resnet_time_scale_shift must be a plain value, got a list"),
    ("unet", "attn_norm_num_groups", {"a": 1}, "attn_norm_num_groups must be a plain value, got a dict"),
    ("unet", "norm_num_groups", [8], "norm_num_groups must be a plain value"),
    ("unet", "down_block_types", 5, "down_block_types must be a list of plain values, got int"),
    ("unet", "attention_head_dim", [8, 16], "attention_head_dim must be one number"),
    ("scheduler", "beta_schedule", ["linear"], "beta_schedule must be a plain value"),
    ("scheduler", "prediction_type", {"x": 1}, "prediction_type must be a plain value"),
    ("scheduler", "trained_betas", [0.1] * 3, "trained_betas: ddpm-mnist reads trained_betas only of its own cosine"),
])
def test_hand_made_configs_of_the_wrong_type_are_one_line(runs, tmp_path: Path, capsys, file: str, key: str,
                                                          value: object, says: str) -> None:
    folder = hostile_folder(runs, tmp_path, capsys)
    edit_json(folder / file / ("config.json" if file == "unet" else "scheduler_config.json"), **{key: value})
    code, _, err = run_cli(capsys, "sample", "--ckpt", folder, "--n", "1", "--steps", "2", "--out", tmp_path / "g.png")
    one_line_error(code, err, says)
    assert not (tmp_path / "g.png").exists()


def test_deeply_nested_json_is_one_line(runs, tmp_path: Path, capsys) -> None:
    folder = hostile_folder(runs, tmp_path, capsys)
    (folder / "unet" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run_cli(capsys, "sample", "--ckpt", folder, "--n", "1", "--out", tmp_path / "g.png")
    one_line_error(code, err, "nested too deeply")
    state = load(runs["epsilon"]).contents
    hostile = tmp_path / "deep.safetensors"
    save_file(state["ema"], hostile, metadata={"format": "ddpm-mnist-weights", "config": "[" * 100_000, "step": "1"})
    code, _, err = run_cli(capsys, "sample", "--ckpt", hostile, "--n", "1", "--out", tmp_path / "g.png")
    one_line_error(code, err, "config or step is not readable")


@pytest.mark.parametrize("target, make, says", [
    ("scheduler/scheduler_config.json", "fifo", "not a regular file (a pipe, socket or device)"),
    ("scheduler/scheduler_config.json", "dev_zero", "not a regular file (a pipe, socket or device)"),
    ("unet/diffusion_pytorch_model.safetensors", "fifo", "not a regular file (a pipe, socket or device)"),
    ("unet/diffusion_pytorch_model.safetensors", "loop", "Too many levels of symbolic links"),
    ("unet/config.json", "missing", "a diffusers DDPMPipeline folder holds unet/config.json, and this one has none"),
    ("unet/config.json", "fifo", "a diffusers DDPMPipeline folder holds unet/config.json, and this one has none"),
])
def test_special_files_in_a_model_folder_are_refused_instead_of_blocking(runs, tmp_path: Path, capsys, target: str,
                                                                         make: str, says: str) -> None:
    folder = hostile_folder(runs, tmp_path, capsys)
    path = folder / target
    path.unlink()
    if make == "fifo":
        os.mkfifo(path)
    elif make == "dev_zero":
        path.symlink_to("/dev/zero")
    elif make == "loop":
        path.symlink_to(path)
    code, _, err = run_cli(capsys, "sample", "--ckpt", folder, "--n", "1", "--out", tmp_path / "g.png")
    one_line_error(code, err, says)


@pytest.mark.parametrize("name, change, says", [
    ("conv_in.weight", lambda t: t.reshape(-1), "conv_in.weight is torch.float32 (72,); ddpm-mnist's U-Net needs "
                                                "torch.float32 (8, 1, 3, 3)"),
    ("conv_in.weight", lambda t: t.reshape(1, 8, 3, 3), "needs torch.float32 (8, 1, 3, 3)"),
    ("conv_in.bias", lambda t: t.half(), "conv_in.bias is torch.float16 (8,)"),
    ("mid_block.attentions.0.to_k.weight", lambda t: t.reshape(-1), "to_k.weight is torch.float32"),
    ("mid_block.attentions.0.to_q.bias", lambda t: t[0], "to_q.bias is torch.float32 ()"),
])
def test_weights_of_the_wrong_shape_or_dtype_are_refused_by_name(runs, tmp_path: Path, capsys, name: str,
                                                                 change, says: str) -> None:
    folder = hostile_folder(runs, tmp_path, capsys)
    weights_path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file
    tensors = load_file(weights_path)
    tensors[name] = change(tensors[name]).contiguous()
    save_file(tensors, weights_path)
    code, _, err = run_cli(capsys, "sample", "--ckpt", folder, "--n", "1", "--out", tmp_path / "g.png")
    one_line_error(code, err, says)
