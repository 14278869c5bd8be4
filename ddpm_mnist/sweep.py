"""`ddpm eval --sweep` and `--guidance W1,W2,...`: sample quality per sampler and step count, or
per guidance weight of a conditional model, from the same seeds, beside the floor.

    ddpm eval --ckpt FILE --sweep ancestral:1000,ddim:50,dpmpp_2m:10,dpmpp_2m:20 --n 1000 --json s.json --plot s.png
    ddpm eval --ckpt COND --guidance 1,2,3,5 --n 1000 --plot g.png

A setting is `sampler:steps`, or `sampler:steps:spacing`, or a guidance weight W. Every setting
samples the same images k = 0 .. n-1 from the same per-image noise (x_T, and z for the samplers
that add noise), and every setting is checked before any sampling starts. One row per setting:
model evaluations, fid_mnist, (class_accuracy,) confidence, class KL and seconds; the floor of n
real digits beside them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from ddpm_mnist.config import TIMESTEP_SPACINGS, Config, SampleRequest
from ddpm_mnist.errors import UserError
from ddpm_mnist.evaluate import Reference, evaluate, real_digits
from ddpm_mnist.paths import check_paths, check_suffix, ensure_writable, write_text
from ddpm_mnist.sample import SamplingJob, prepare_sampling, sampling_configs

COLUMNS = ("fid_mnist", "confidence", "class_kl")
MAX_SETTINGS = 64


def parse_sweep(text: str) -> list[SampleRequest]:
    """`ancestral:1000,dpmpp_2m:20:trailing` -> one request each (sampler, steps[, timestep_spacing])."""
    settings = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (2, 3) or not parts[0] or not re.fullmatch(r"[0-9]+", parts[1].strip()) \
                or int(parts[1]) < 1:
            raise UserError(f"--sweep {text}: each setting is sampler:steps or sampler:steps:spacing "
                            f"with steps >= 1 (e.g. dpmpp_2m:20:trailing), got {item.strip()!r}")
        spacing = None
        if len(parts) == 3:
            if parts[2] not in TIMESTEP_SPACINGS:
                raise UserError(f"--sweep {item.strip()}: the spacing must be one of {', '.join(TIMESTEP_SPACINGS)}")
            spacing = parts[2]
        settings.append(SampleRequest(sampler=parts[0], steps=int(parts[1]), timestep_spacing=spacing))
    if len(set(settings)) != len(settings):
        raise UserError(f"--sweep {text}: a setting is given twice")
    return settings


def parse_guidance(text: str) -> list[float]:
    """`1,2,3.5` -> [1.0, 2.0, 3.5]: guidance weights, each finite and >= 0."""
    weights = []
    for item in text.split(","):
        try:
            weight = float(item)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            raise UserError(f"--guidance {text}: each weight must be a finite number >= 0, got {item.strip()!r}")
        weights.append(weight)
    if len(set(weights)) != len(weights):
        raise UserError(f"--guidance {text}: a weight is given twice")
    return weights


def label(setting: SampleRequest) -> str:
    """The setting as written on the command line: `dpmpp_2m:20:trailing`, `W=3`, or both."""
    sampler = ":".join(str(v) for v in (setting.sampler, setting.steps, setting.timestep_spacing) if v)
    weight = f"W={setting.guidance:g}" if setting.guidance is not None else ""
    return " ".join(part for part in (sampler, weight) if part)


def evaluate_or_sweep(ckpt_path: Path | None, samples_path: Path | None, *, sweep_text: str | None,
                      guidance_text: str | None, plot_path: Path | None, request: SampleRequest,
                      device_name: str | None, data_root: str | None, json_path: Path | None,
                      overrides: list[str] | None) -> dict[str, Any]:
    """`ddpm eval`: one evaluation, or a sweep when --sweep, --plot or several --guidance weights ask for one."""
    weights = parse_guidance(guidance_text) if guidance_text is not None else []
    request = dataclasses.replace(request, guidance=weights[0] if len(weights) == 1 else None)
    if sweep_text is None and plot_path is None and len(weights) < 2:
        return evaluate(ckpt_path, samples_path, request=request, device_name=device_name, data_root=data_root,
                        json_path=json_path, overrides=overrides)
    own_sampler = sweep_text is not None and (request.steps is not None or request.sampler is not None)
    if ckpt_path is None or samples_path is not None or own_sampler:
        raise UserError("--sweep, --plot and several --guidance weights sample from --ckpt; with --sweep each "
                        "setting has its own sampler and steps: give --ckpt, not --samples, --steps or --sampler")
    if sweep_text is None and len(weights) < 2:
        raise UserError("--plot draws a sweep: give --ckpt and --sweep sampler:steps,... (or several --guidance "
                        "weights)")
    settings = parse_sweep(sweep_text) if sweep_text is not None else [SampleRequest()]
    if len(weights) > 1:
        settings = [dataclasses.replace(setting, guidance=w) for setting in settings for w in weights]
    return sweep(ckpt_path, settings, request=request, device_name=device_name, data_root=data_root,
                 json_path=json_path, plot_path=plot_path, overrides=overrides)


def sweep(ckpt_path: Path, settings: list[SampleRequest], *, request: SampleRequest | None = None,
          device_name: str | None = None, data_root: str | None = None, json_path: Path | None = None,
          plot_path: Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Sample and measure every setting from the same seeds; print the table; write JSON and a plot."""
    for path, option, suffixes in ((json_path, "--json", (".json",)), (plot_path, "--plot", (".png",))):
        if path is not None:
            ensure_writable(check_suffix(path, option, suffixes))
    check_paths({"--json": json_path, "--plot": plot_path}, inputs={"--ckpt": ckpt_path})
    request = request or SampleRequest()
    if len(settings) > MAX_SETTINGS:
        raise UserError(f"--sweep: {len(settings)} settings; a sweep compares at most {MAX_SETTINGS}")
    checkpoint, configs = sampling_configs(ckpt_path, [request.merged(setting) for setting in settings], overrides)
    check_distinct_settings(settings, configs)
    first = configs[0]
    train_images, test_images = real_digits(data_root or first.data.root, first.data.download, first.sample.n)
    reference = Reference(test_images, train_images)
    floor = reference.floor(first.sample.n, request.seed or 0, threshold=None)  # the same floor as ddpm eval's
    rows = []
    for setting in settings:  # one model at a time: a long sweep holds one setting's memory, not all of theirs
        run = prepare_sampling(ckpt_path, request.merged(setting), overrides, device_name, checkpoint=checkpoint)
        run.check_memory(first.sample.n, run.cfg.sample.batch_size, images_kept=first.sample.n)
        rows.append(measure(run, setting, reference))
        print(format_row(rows[-1]))
    report = {"n": first.sample.n, "seed": first.seed, "checkpoint": str(ckpt_path), "rows": rows,
              "floor": {key: floor[key] for key in COLUMNS}}
    guidance_sweep = all(set(setting.given()) == {"guidance"} for setting in settings)
    print(format_table(report))
    if json_path is not None:
        write_text(json_path, json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_path}")
    if plot_path is not None:
        from ddpm_mnist.plots import guidance_figure, save_figure, sweep_figure

        figure = guidance_figure if guidance_sweep else sweep_figure
        save_figure(figure(rows, report["floor"]["fid_mnist"], report["n"]), plot_path)
        print(f"wrote {plot_path}")
    return report


def check_distinct_settings(settings: list[SampleRequest], configs: list[Config]) -> None:
    """Refuse two settings that sample the same images (ddim:2 and ddim:2:leading, when leading is the default)."""
    seen: dict[tuple, str] = {}
    for setting, cfg in zip(settings, configs, strict=True):
        s = cfg.sample
        skips = cfg.reverse_steps < cfg.schedule.num_timesteps
        key = (s.sampler, cfg.reverse_steps, s.timestep_spacing if skips else None,
               s.guidance if cfg.model.num_classes else None)
        if key in seen:
            raise UserError(f"--sweep: {label(setting)} samples exactly what {seen[key]} does: give each once")
        seen[key] = label(setting)


def measure(run: SamplingJob, setting: SampleRequest, reference: Reference) -> dict[str, Any]:
    """One row: sample n images with this setting, time it, measure them."""
    s = run.cfg.sample
    started = time.perf_counter()
    images = run.images(s.n, run.cfg.seed, s.batch_size, desc=label(setting))
    seconds = time.perf_counter() - started
    asked = run.labels(s.n)
    metrics = reference.metrics(images, asked)
    guided = {} if asked is None else {"guidance": s.guidance, "class_accuracy": metrics["class_accuracy"]}
    return {"setting": label(setting), "sampler": s.sampler, "steps": run.cfg.reverse_steps,
            "full_loop": run.cfg.reverse_steps == run.cfg.schedule.num_timesteps,
            "timestep_spacing": s.timestep_spacing, "model_evaluations": run.sampler.num_steps,
            **guided, **{key: metrics[key] for key in COLUMNS}, "seconds": round(seconds, 1)}


def format_row(row: dict[str, Any]) -> str:
    accuracy = f" {row['class_accuracy']:>9.3f}" if "class_accuracy" in row else ""
    return (f"{row['setting']:<28} {row['model_evaluations']:>6} {row['fid_mnist']:>10.3f}{accuracy} "
            f"{row['confidence']:>11.3f} {row['class_kl']:>9.4f} {row['seconds']:>9.1f}")


def format_table(report: dict[str, Any]) -> str:
    """The rows and the floor, as a table."""
    conditional = any("class_accuracy" in row for row in report["rows"])
    accuracy = f" {'accuracy':>9}" if conditional else ""
    lines = [f"{'setting':<28} {'evals':>6} {'fid_mnist':>10}{accuracy} {'confidence':>11} {'class_kl':>9} "
             f"{'seconds':>9}"]
    lines += [format_row(row) for row in report["rows"]]
    floor = report["floor"]
    lines.append(f"{'real digits (floor)':<28} {'':>6} {floor['fid_mnist']:>10.3f}{' ' * len(accuracy)} "
                 f"{floor['confidence']:>11.3f} {floor['class_kl']:>9.4f}")
    lines.append(f"n = {report['n']}, seed {report['seed']}, every setting from the same per-image noise")
    return "\n".join(lines)
