"""ddpm export: a diffusers DDPMPipeline folder and a safetensors weights file, and reading both back.

diffusers (a dev extra) loads the folder with no code of ours; `ddpm sample` reads it back to the
same bytes as the checkpoint it came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_ROOT, SMOKE, run_cli
from helpers import digest, one_line_error, smoke_run
from safetensors.torch import save_file

from ddpm_mnist.checkpoint import checkpoint_config, load_checkpoint, load_model
from ddpm_mnist.config import Config, ModelConfig, load_config
from ddpm_mnist.diffusers_format import to_diffusers, unet_config
from ddpm_mnist.maths.schedule import make_schedule
from ddpm_mnist.maths.unet import UNet

diffusers = pytest.importorskip("diffusers", reason="diffusers (the dev extra) checks the exported folder")
pytestmark = pytest.mark.slow

CONDITIONAL = ["model.num_classes=10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Smoke checkpoints: unconditional for each prediction type, and conditional, 4 steps each."""
    out = tmp_path_factory.mktemp("export_runs")
    found = {}
    for name, sets in {"epsilon": [], "v": ["model.prediction_type=v"], "x0": ["model.prediction_type=x0",
                       "schedule.beta_schedule=cosine", "sample.clip_sample=false"],
                       "conditional": CONDITIONAL, "scale_shift": ["model.time_conditioning=scale_shift"]}.items():
        cfg = load_config(SMOKE, [f"data.root={FIXTURE_ROOT}", f"out_dir={out}", f"name={name}", "train.steps=4",
                                  "train.sample_every=0", *sets])
        found[name] = smoke_run(cfg) / "checkpoints" / "latest.pt"
    return found


def export(capsys, ckpt: Path, out: Path, *more: str) -> None:
    code, _, err = run_cli(capsys, "export", "--ckpt", ckpt, "--out", out, *more)
    assert code == 0, err


@pytest.mark.parametrize("kind", ["epsilon", "v", "x0", "conditional", "scale_shift"])
def test_diffusers_loads_the_folder_and_computes_our_unets_output(runs, tmp_path: Path, capsys, kind: str) -> None:
    ckpt = runs[kind]
    export(capsys, ckpt, tmp_path / "pipe")
    state = load_checkpoint(ckpt)
    cfg = checkpoint_config(state, ckpt)
    ours = load_model(state, cfg, ckpt, use_ema=True)
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


@pytest.mark.parametrize("fmt, kind", [("diffusers", "conditional"), ("safetensors", "conditional"),
                                       ("diffusers", "scale_shift")])
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
    state = load_checkpoint(runs["v"])
    read = load_checkpoint(out)
    assert read["config"] == state["config"] and read["step"] == state["step"]
    assert read["ema"].keys() == state["ema"].keys()
    assert all(torch.equal(read["ema"][k], state["ema"][k]) for k in state["ema"])
    raw = tmp_path / "raw.safetensors"
    export(capsys, runs["v"], raw, "--format", "safetensors", "--no-ema")
    assert all(torch.equal(load_checkpoint(raw)["ema"][k], state["model"][k]) for k in state["model"])


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
    state = load_checkpoint(runs["epsilon"])
    for metadata, says in (({"format": "ddpm-mnist-weights", "config": "{", "step": "4"}, "config or step"),
                           ({"format": "ddpm-mnist-weights", "config": json.dumps({"model": {"base_channels": -1}}),
                             "step": "4"}, "model.base_channels: must be >= 1"),
                           ({"format": "other"}, "not a ddpm-mnist weights file")):
        hostile = tmp_path / "hostile.safetensors"
        save_file(state["ema"], hostile, metadata=metadata)
        code, _, err = run_cli(capsys, "sample", "--ckpt", hostile, "--n", "1", "--out", tmp_path / "g.png")
        one_line_error(code, err, says)
    assert not (tmp_path / "g.png").exists()
