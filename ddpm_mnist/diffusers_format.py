"""Train here, use anywhere: our U-Net and schedule as a diffusers `DDPMPipeline` folder, and back.

The U-Net of this package already has the structure of diffusers' `UNet2DModel`: the sinusoidal
embedding is cos then sin (`flip_sin_to_cos=True, freq_shift=0`), `time_mlp` is its
`TimestepEmbedding`, a `ResBlock` is a `ResnetBlock2D` (norm1, conv1, time_emb_proj, norm2,
dropout, conv2, conv_shortcut), the down, mid and up blocks keep the same skips, and the digit's
embedding is `num_class_embeds`. So export renames tensors, and splits attention's 1x1 qkv
convolution into the linear `to_q`, `to_k` and `to_v`. No diffusers import is needed: the folder
is JSON and safetensors, written here.

    DIR/model_index.json
    DIR/unet/config.json, DIR/unet/diffusion_pytorch_model.safetensors
    DIR/scheduler/scheduler_config.json
    DIR/README.md (a model card)

`read_folder` and `read_weights_file` turn such a folder, or the weights-only file of
`write_weights_file`, back into what `checkpoint.load_checkpoint` returns, so that sample and eval
use them as they use a checkpoint (and check them the same way). Reading never runs code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ddpm_mnist.config import VARIANCE_TYPES, Config, ModelConfig, ScheduleConfig, config_from_dict, to_dict
from ddpm_mnist.errors import CheckpointError, UserError
from ddpm_mnist.maths.schedule import make_betas
from ddpm_mnist.maths.unet import UNet
from ddpm_mnist.paths import atomic_file, check_input_file

DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers the folder is written for (the dev extra's lower bound)
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_FORMAT = "ddpm-mnist-weights"
MAX_JSON_BYTES = 1 << 20
SCHEDULE_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2",
                  "sigmoid": "sigmoid"}
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}
# Our names -> diffusers' names, applied in order to each tensor name (attention's qkv is split apart)
RENAMES = [
    (r"^time_mlp\.0\.", "time_embedding.linear_1."), (r"^time_mlp\.2\.", "time_embedding.linear_2."),
    (r"^input_conv\.", "conv_in."), (r"^out_norm\.", "conv_norm_out."), (r"^out_conv\.", "conv_out."),
    (r"^down\.(\d+)\.blocks\.", r"down_blocks.\1.resnets."), (r"^up\.(\d+)\.blocks\.", r"up_blocks.\1.resnets."),
    (r"^down\.(\d+)\.attentions\.", r"down_blocks.\1.attentions."),
    (r"^up\.(\d+)\.attentions\.", r"up_blocks.\1.attentions."),
    (r"^downsample\.(\d+)\.conv\.", r"down_blocks.\1.downsamplers.0.conv."),
    (r"^upsample\.(\d+)\.conv\.", r"up_blocks.\1.upsamplers.0.conv."),
    (r"^mid_block1\.", "mid_block.resnets.0."), (r"^mid_attention\.", "mid_block.attentions.0."),
    (r"^mid_block2\.", "mid_block.resnets.1."),
    (r"\.time_proj\.", ".time_emb_proj."), (r"\.skip\.", ".conv_shortcut."),
    (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."), (r"(attentions\.\d+)\.proj\.", r"\1.to_out.0."),
]


def attention_head_dim(model: ModelConfig) -> int:
    """The one head width UNet2DModel has for every attention block; refused where ours differ."""
    last = model.base_channels * model.channel_mult[-1]
    widths = {last} | {model.base_channels * mult for level, mult in enumerate(model.channel_mult)
                       if 28 // 2**level in model.attention_resolutions}
    dims = {width // model.num_heads for width in widths}
    if len(dims) > 1:
        raise UserError(
            f"diffusers' UNet2DModel cannot represent this model: its attention blocks have {len(widths)} widths "
            f"({', '.join(map(str, sorted(widths)))} channels) with a fixed {model.num_heads} head(s), so heads "
            "of different sizes, and UNet2DModel has one attention_head_dim"
        )
    return dims.pop()


def unet_config(model: ModelConfig) -> dict[str, Any]:
    """diffusers' UNet2DModel config for our U-Net."""
    if model.patch_size != 1:
        raise UserError(
            f"diffusers' UNet2DModel cannot represent this model: model.patch_size {model.patch_size} (pixels "
            "unshuffled into channels before the first level) has no UNet2DModel equivalent; export needs patch_size 1"
        )
    levels = [28 // 2**level in model.attention_resolutions for level in range(len(model.channel_mult))]
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": 28, "in_channels": 1, "out_channels": 2 if model.learn_variance else 1,
        "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
        "freq_shift": 0, "flip_sin_to_cos": True,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in levels],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)],
        "block_out_channels": [model.base_channels * mult for mult in model.channel_mult],
        "layers_per_block": model.num_res_blocks, "mid_block_scale_factor": 1, "downsample_padding": 1,
        "downsample_type": "conv", "upsample_type": "conv", "dropout": model.dropout, "act_fn": "silu",
        "attention_head_dim": attention_head_dim(model), "norm_num_groups": model.num_groups,
        # the middle attention's GroupNorm: diffusers drops it under scale_shift unless given its groups
        "attn_norm_num_groups": model.num_groups if model.time_conditioning == "scale_shift" else None,
        "norm_eps": 1e-5, "add_attention": True, "class_embed_type": None,
        "resnet_time_scale_shift": "scale_shift" if model.time_conditioning == "scale_shift" else "default",
        "num_class_embeds": model.num_classes + 1 if model.num_classes else None,
    }


def scheduler_config(cfg: Config, betas: torch.Tensor) -> dict[str, Any]:
    """diffusers' DDPMScheduler config: our schedule (its betas verbatim where diffusers has no name
    for it), prediction type and sampling options."""
    schedule, sample = cfg.schedule, cfg.sample
    named = schedule.beta_schedule != "cosine" or (schedule.cosine_s, schedule.max_beta) == (0.008, 0.999)
    return {
        "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": schedule.num_timesteps, "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end, "beta_schedule": SCHEDULE_NAMES[schedule.beta_schedule],
        "trained_betas": None if named else betas.double().tolist(),
        # fixed_large_log is fixed_large's variance; diffusers' own takes the square root of its log (NaN)
        "variance_type": sample.variance_type.replace("fixed_large_log", "fixed_large"),
        "clip_sample": sample.clip_sample, "clip_sample_range": sample.clip_sample_range,
        "prediction_type": PREDICTIONS[cfg.model.prediction_type], "thresholding": sample.thresholding,
        "dynamic_thresholding_ratio": sample.dynamic_thresholding_ratio, "sample_max_value": sample.sample_max_value,
        "timestep_spacing": sample.timestep_spacing, "steps_offset": 0,
        "rescale_betas_zero_snr": schedule.rescale_zero_terminal_snr,
    }


def to_diffusers(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict under UNet2DModel's names, attention's qkv split into to_q, to_k and to_v."""
    out = {}
    for name, tensor in weights.items():
        new = name
        for pattern, replacement in RENAMES:
            new = re.sub(pattern, replacement, new)
        if ".qkv." in new:
            for part, chunk in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0), strict=True):
                out[new.replace("qkv", part)] = chunk.flatten(1) if chunk.dim() == 4 else chunk
        elif ".to_out.0.weight" in new:
            out[new] = tensor.flatten(1)
        else:
            out[new] = tensor
    return {name: tensor.contiguous() for name, tensor in out.items()}


def from_diffusers(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UNet2DModel's tensors under our names (the inverse of `to_diffusers`, guided by our model's
    names and shapes); a missing tensor is one line naming it."""
    out, used = {}, set()
    for name, like in expected.items():
        new = to_diffusers({name: like})
        for key, want in new.items():
            if key not in weights:
                raise CheckpointError(f"the UNet's weights lack {key}")
            got = weights[key]
            if got.dtype != want.dtype or got.shape != want.shape:
                raise CheckpointError(f"the UNet's {key} is {got.dtype} {tuple(got.shape)}; ddpm-mnist's U-Net "
                                      f"needs {want.dtype} {tuple(want.shape)}")
        used.update(new)
        parts = [weights[key] for key in new]
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        out[name] = tensor.reshape(like.shape)
    extra = sorted(set(weights) - used)
    if extra:
        raise CheckpointError(f"the UNet's weights hold {extra[0]}, which ddpm-mnist's U-Net has no place for")
    return out


def model_card(cfg: Config, step: int, run_facts: dict[str, Any]) -> str:
    """README.md of an exported folder: what it is, how to use it, how it was trained and measured."""
    lines = [f"# ddpm-mnist: {cfg.name}", "",
             f"A DDPM (Ho et al. 2020) trained on MNIST with ddpm-mnist, {step:,} steps, exported as a diffusers "
             "`DDPMPipeline` (a `UNet2DModel` and a `DDPMScheduler`; weights in safetensors).", "",
             "```python", "import torch", "from diffusers import DDPMPipeline", "",
             'pipe = DDPMPipeline.from_pretrained("THIS_FOLDER")']
    if cfg.model.num_classes:
        lines += ["```", "", "This model is class-conditional: the UNet takes `class_labels`, digits 0-9, and "
                  f"{cfg.model.num_classes} for \"no class\". `DDPMPipeline` passes no labels, so run the loop "
                  "yourself; "
                  "classifier-free guidance mixes the two predictions, out = uncond + W * (cond - uncond), W = "
                  f"{cfg.sample.guidance:g} by default here (1: plain conditional, 0: unconditional):", "",
                  "```python", "unet, scheduler = pipe.unet, pipe.scheduler",
                  "digits = torch.arange(10)", "x = torch.randn(10, 1, 28, 28)", "scheduler.set_timesteps(1000)",
                  "for t in scheduler.timesteps:",
                  "    both = unet(torch.cat([x, x]), t, class_labels=torch.cat([digits, torch.full_like(digits, "
                  f"{cfg.model.num_classes})])).sample",
                  "    cond, uncond = both.chunk(2)",
                  f"    x = scheduler.step(uncond + {cfg.sample.guidance:g} * (cond - uncond), t, x).prev_sample",
                  "```"]
    else:
        lines += ["images = pipe(batch_size=16, num_inference_steps=1000).images  # PIL images, 28 x 28", "```"]
    lines += ["", "## Training", "", f"- steps: {step:,}"]
    if "train_seconds" in run_facts:
        lines.append(f"- training time: {run_facts['train_seconds'] / 60:.1f} minutes (from the run's TensorBoard "
                     "events)")
    if "eval" in run_facts:
        report = run_facts["eval"]
        samples, floor = report["samples"], report["floor"]
        lines += ["", "## Measured with ddpm eval", "", f"n = {report['n']}, {json.dumps(report.get('source', {}))}",
                  "", "| metric | samples | real digits |", "|---|---|---|"]
        lines += [f"| {key} | {samples[key]:.4g} | {floor[key]:.4g} |" for key in ("fid_mnist", "confidence",
                                                                                 "inception_score")
                  if all(isinstance(part.get(key), (int, float)) for part in (samples, floor))]
    config = json.dumps(to_dict(cfg), indent=2)
    lines += ["", "## Config", "", "The resolved ddpm-mnist config:", "", "```json", config, "```", ""]
    return "\n".join(lines)


def write_folder(folder: Path, cfg: Config, weights: dict[str, torch.Tensor], betas: torch.Tensor, step: int,
                 run_facts: dict[str, Any]) -> list[Path]:
    """Write the DDPMPipeline folder (every file atomically); return the files written."""
    files = {
        folder / "model_index.json": _json({"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
                                            "scheduler": ["diffusers", "DDPMScheduler"],
                                            "unet": ["diffusers", "UNet2DModel"]}),
        folder / "unet" / "config.json": _json(unet_config(cfg.model)),
        folder / "unet" / WEIGHTS: safetensors_bytes(to_diffusers(weights), metadata={"format": "pt"}),
        folder / "scheduler" / "scheduler_config.json": _json(scheduler_config(cfg, betas)),
        folder / "README.md": model_card(cfg, step, run_facts).encode(),
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_bytes(data)
    return list(files)


def write_weights_file(path: Path, cfg: Config, weights: dict[str, torch.Tensor], step: int) -> Path:
    """One safetensors file: the weights under our names, the resolved config and step in its metadata."""
    metadata = {"format": WEIGHTS_FORMAT, "config": json.dumps(to_dict(cfg)), "step": str(step)}
    data = safetensors_bytes({name: tensor.contiguous() for name, tensor in weights.items()}, metadata=metadata)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return path


def _json(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata; a truncated or foreign file is one line."""
    check_input_file(path, "weights")  # a pipe would block, a device never end
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:150]})") from None


def is_weights_file(path: Path) -> bool:
    """True for a safetensors file that `write_weights_file` wrote (its metadata says so)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == WEIGHTS_FORMAT
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False


def read_weights_file(path: Path) -> tuple[Config, dict[str, torch.Tensor], int]:
    """`write_weights_file`'s file: its config, weights and step (it cannot resume: no training state)."""
    tensors, metadata = read_tensors(path)
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{path}: not a ddpm-mnist weights file (its metadata has no '{WEIGHTS_FORMAT}' "
                              "format); a diffusers folder is read from the folder itself")
    try:
        raw, step = json.loads(metadata.get("config", "")), int(metadata.get("step", ""))
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: its metadata's config or step is not readable") from None
    if step < 0:
        raise CheckpointError(f"{path}: its metadata's step must be >= 0, got {step}")
    return config_from_dict(raw, f"{path} (its metadata's config)"), tensors, step


def read_json(path: Path) -> dict[str, Any]:
    """A small JSON file holding a mapping, or one line."""
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: missing; a diffusers DDPMPipeline folder holds it")
    check_input_file(path, "config")  # a pipe would block; /dev/zero behind a symlink would never end
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: larger than a config can be")
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({str(exc)[:120]})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a config ddpm-mnist reads (nested too deeply)") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: must hold a JSON mapping")
    return value


def read_folder(folder: Path) -> tuple[Config, dict[str, torch.Tensor], int]:
    """A diffusers DDPMPipeline folder whose UNet2DModel fits our U-Net family: config, weights, step (0:
    the folder does not say)."""
    unet = read_json(folder / "unet" / "config.json")
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    where = folder / "unet" / "config.json"
    try:  # the checks below name most keys; a value of a type no check foresaw is still one line
        model = model_from_unet_config(unet, where)
        schedule, prediction, sample = schedule_from_scheduler(scheduler, folder / "scheduler" /
                                                               "scheduler_config.json")
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise CheckpointError(f"{folder}: its configs hold a value ddpm-mnist cannot read ({exc})") from None
    raw = to_dict(Config(name=folder.name if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", folder.name) else "diffusers"))
    raw["model"] = {**to_dict(Config())["model"], **model, "prediction_type": prediction}
    raw["schedule"] = schedule
    raw["sample"] = {**raw["sample"], **sample}
    if sample.get("variance_type") == "learned_range":  # how such a model is trained, should it train on
        raw["train"] = {**raw["train"], "loss": "hybrid"}
    cfg = config_from_dict(raw, f"{folder} (its diffusers configs)")
    tensors, _ = read_tensors(folder / "unet" / WEIGHTS)
    with torch.device("meta"):
        expected = UNet(cfg.model).state_dict()
    try:
        weights = from_diffusers(tensors, expected)
    except CheckpointError as exc:
        raise CheckpointError(f"{folder / 'unet' / WEIGHTS}: {exc}") from None
    return cfg, weights, 0


# UNet2DModel keys and the only values our U-Net family has for them
FIXED_UNET = {"sample_size": 28, "in_channels": 1, "center_input_sample": False,
              "time_embedding_type": "positional", "freq_shift": 0, "flip_sin_to_cos": True,
              "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_padding": 1,
              "downsample_type": "conv", "upsample_type": "conv", "act_fn": "silu", "norm_eps": 1e-5,
              "add_attention": True, "class_embed_type": None}
TIME_CONDITIONING = {"default": "add", "scale_shift": "scale_shift"}  # resnet_time_scale_shift -> ours


def check_value_types(config: dict[str, Any], where: Path, lists: tuple[str, ...]) -> None:
    """Every value a plain JSON scalar, but the keys in `lists`, which hold lists of scalars (or null)."""
    for key, value in config.items():
        if key in lists:
            if value is not None and (not isinstance(value, list) or any(isinstance(v, (list, dict)) for v in value)):
                raise CheckpointError(f"{where}: {key} must be a list of plain values, got {type(value).__name__}")
        elif isinstance(value, (list, dict)):
            raise CheckpointError(f"{where}: {key} must be a plain value, got a {type(value).__name__}")


def check_unet_value_types(unet: dict[str, Any], where: Path) -> None:
    """A UNet2DModel config's values: scalars, and lists of them where diffusers has lists."""
    if isinstance(unet.get("attention_head_dim"), list):
        raise CheckpointError(f"{where}: attention_head_dim must be one number; ddpm-mnist's heads share one width")
    check_value_types(unet, where, ("block_out_channels", "down_block_types", "up_block_types"))


def attention_levels(unet: dict[str, Any], levels: int, where: Path) -> list[bool]:
    """Whether each level has attention, from the mirrored down and up block types."""
    attention = []
    for level, (down, up) in enumerate(zip(unet.get("down_block_types") or [], reversed(unet.get("up_block_types") or
                                                                                         []), strict=False)):
        if (down, up) not in (("DownBlock2D", "UpBlock2D"), ("AttnDownBlock2D", "AttnUpBlock2D")):
            raise CheckpointError(f"{where}: down_block_types/up_block_types: level {level} is {down}/{up}; "
                                  "ddpm-mnist has DownBlock2D/UpBlock2D or AttnDownBlock2D/AttnUpBlock2D")
        attention.append(down == "AttnDownBlock2D")
    if len(attention) != levels or len(unet.get("up_block_types") or []) != levels:
        raise CheckpointError(f"{where}: down_block_types and up_block_types must name one block per level")
    return attention


def model_from_unet_config(unet: dict[str, Any], where: Path) -> dict[str, Any]:
    """Our model section from a UNet2DModel config, or one line naming the key that does not fit."""
    check_unet_value_types(unet, where)
    for key, value in FIXED_UNET.items():
        if unet.get(key, value) != value:
            raise CheckpointError(f"{where}: {key} is {unet[key]!r}; ddpm-mnist's U-Net has {value!r}")
    channels = unet.get("block_out_channels")
    if not isinstance(channels, list) or not 1 <= len(channels) <= 3 or not all(
            isinstance(c, int) and c > 0 and c % channels[0] == 0 for c in channels):
        raise CheckpointError(f"{where}: block_out_channels must be 1 to 3 multiples of the first, got {channels!r}")
    base = channels[0]
    if unet.get("time_embedding_dim") not in (None, 4 * base):
        raise CheckpointError(f"{where}: time_embedding_dim must be 4 x block_out_channels[0] ({4 * base})")
    attention = attention_levels(unet, len(channels), where)
    head_dim = unet.get("attention_head_dim")
    if not isinstance(head_dim, int) or head_dim <= 0 or channels[-1] % head_dim:
        raise CheckpointError(f"{where}: attention_head_dim must divide block_out_channels[-1], got {head_dim!r}")
    shift = unet.get("resnet_time_scale_shift", "default")
    if shift not in TIME_CONDITIONING:
        raise CheckpointError(f"{where}: resnet_time_scale_shift is {shift!r}; ddpm-mnist has 'default' or "
                              "'scale_shift'")
    if unet.get("attn_norm_num_groups") not in ({None} if shift == "default" else {unet.get("norm_num_groups", 32)}):
        raise CheckpointError(f"{where}: attn_norm_num_groups is {unet.get('attn_norm_num_groups')!r}; ddpm-mnist's "
                              "attention blocks normalise with norm_num_groups")
    if unet.get("out_channels", 1) not in (1, 2):
        raise CheckpointError(f"{where}: out_channels is {unet['out_channels']!r}; ddpm-mnist's U-Net has 1 (or 2: "
                              "the noise and a learned variance)")
    classes = unet.get("num_class_embeds")
    if classes not in (None, 11):
        raise CheckpointError(f"{where}: num_class_embeds must be null or 11 (digits and 'no class'), got {classes!r}")
    return {"base_channels": base, "channel_mult": [c // base for c in channels],
            "num_res_blocks": unet.get("layers_per_block", 2),
            "attention_resolutions": [28 // 2**level for level, a in enumerate(attention) if a],
            "num_heads": channels[-1] // head_dim, "dropout": unet.get("dropout", 0.0),
            "num_groups": unet.get("norm_num_groups", 32), "num_classes": 10 if classes else 0,
            "time_conditioning": TIME_CONDITIONING[shift], "learn_variance": unet.get("out_channels", 1) == 2}


def schedule_from_scheduler(scheduler: dict[str, Any], where: Path) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Our schedule section, prediction type and sample options from a DDPMScheduler config."""
    names = {value: key for key, value in SCHEDULE_NAMES.items()}
    predictions = {value: key for key, value in PREDICTIONS.items()}
    check_value_types(scheduler, where, ("trained_betas",))
    for key, allowed, default in (("beta_schedule", names, "linear"), ("prediction_type", predictions, "epsilon"),
                                  ("variance_type", VARIANCE_TYPES, "fixed_small")):
        if scheduler.get(key, default) not in allowed:
            raise CheckpointError(f"{where}: {key} is {scheduler[key]!r}; ddpm-mnist has {', '.join(allowed)}")
    if scheduler.get("steps_offset", 0):
        raise CheckpointError(f"{where}: steps_offset is not part of ddpm-mnist's sampler")
    defaults = ScheduleConfig()
    schedule = {"beta_schedule": names[scheduler.get("beta_schedule", "linear")],
                "num_timesteps": scheduler.get("num_train_timesteps", 1000),
                "beta_start": scheduler.get("beta_start", defaults.beta_start),
                "beta_end": scheduler.get("beta_end", defaults.beta_end),
                "cosine_s": defaults.cosine_s, "max_beta": defaults.max_beta,
                "rescale_zero_terminal_snr": scheduler.get("rescale_betas_zero_snr", False)}
    if scheduler.get("trained_betas") is not None:
        schedule |= cosine_from_betas(scheduler["trained_betas"], schedule, where)
    sample = {key: scheduler[key] for key in ("variance_type", "clip_sample", "clip_sample_range", "timestep_spacing",
                                              "thresholding", "dynamic_thresholding_ratio", "sample_max_value")
              if key in scheduler}
    if sample.get("thresholding"):
        sample["clip_sample"] = False  # diffusers ignores it when it thresholds; ddpm-mnist asks for one of the two
    return schedule, predictions[scheduler.get("prediction_type", "epsilon")], sample


def cosine_from_betas(betas: list[Any], schedule: dict[str, Any], where: Path) -> dict[str, float]:
    """cosine_s and max_beta of the cosine schedule whose betas `trained_betas` lists (what export writes
    for a cosine schedule diffusers' squaredcos_cap_v2, with s = 0.008 and a cap of 0.999, does not
    name); refused unless they rebuild those betas (to float32 rounding, of older exports).

    beta_0 = 1 - abar(1) / abar(0) grows with s, so s is found by bisection; the cap is the largest
    beta where it binds (several betas equal it), else the default."""
    named = f"ddpm-mnist reads trained_betas only of its own cosine schedules ({where})"
    if schedule["beta_schedule"] != "cosine" or not isinstance(betas, list) or len(betas) != schedule["num_timesteps"] \
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in betas):
        raise CheckpointError(f"{where}: trained_betas: {named}, listed as num_train_timesteps betas in (0, 1)")
    given = torch.tensor(betas, dtype=torch.float64)
    top = float(given.max())
    max_beta = top if int((given == top).sum()) > 1 else ScheduleConfig().max_beta
    low, high = 0.0, 1.0
    for _ in range(200):
        middle = (low + high) / 2
        first = make_betas("cosine", len(betas), cosine_s=middle, max_beta=max_beta)[0]
        low, high = (middle, high) if first < given[0] else (low, middle)
    found = {"cosine_s": (low + high) / 2, "max_beta": max_beta}
    rebuilt = make_betas("cosine", len(betas), **found)
    if not torch.allclose(rebuilt, given, rtol=1e-6, atol=0):  # float64, or float32 rounding (6e-8)
        raise CheckpointError(f"{where}: trained_betas: {named}; these are not one")
    return found
