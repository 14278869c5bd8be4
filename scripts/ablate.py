"""Training recipes compared at equal wall-clock time: train each variant for the same budget, then
measure every one with the same sampler, n and seeds, and print the table.

    python scripts/ablate.py --config configs/cpu.yaml --budget 5m --seeds 0,1 \
        --variant "baseline" \
        --variant "min_snr train.min_snr_gamma=5" \
        --variant "batch128 train.batch_size=128 train.lr=0.002" \
        [--base "train.lr=0.002"] [--sampler ancestral --steps 50 --n 1000] [--runs runs/ablation] \
        [--out docs/ablation.json] [--table docs/ablation.md]

A variant is a name and the `--set` overrides that make it; `--base` overrides come before every
variant's (e.g. to compare against a config as it was before a change). Each (variant, seed) trains with
`train.time_budget` (so every run gets the same minutes, whatever its step rate) and the training
seed, then `ddpm eval` samples with the same seed. Both run as separate processes, one after the
other: never run anything else that uses torch beside an ablation, or its step rates are wrong.
A finished run is reused, so an interrupted ablation continues where it stopped, but only when every
setting that shapes its result is the same (the config file's contents, the overrides, the budget, the
seed; and for its measurement the sampler, steps and n): `ablate.json` in each run folder records them,
and the script says which runs it reuses. Every argument is checked before the first run.
Each row has the minutes the training loop really ran (from its closing line), its steps, images
and FLOPs per step, so that a win can be read per minute, per image and per FLOP.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ddpm_mnist.config import duration_seconds
from ddpm_mnist.config.sampler_names import SAMPLER_NAMES
from ddpm_mnist.errors import UserError
from ddpm_mnist.paths import check_input_file, check_paths, check_suffix, ensure_writable, write_text

METRICS = ("fid_mnist", "confidence", "class_kl")
OWNED = ("name", "out_dir", "seed", "train.steps", "train.epochs", "train.time_budget")  # what ablate.py sets itself


def fail(message: str) -> None:
    """One line on stderr and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name key=value key=value' -> (name, overrides)."""
    if not text.split():
        fail("--variant '': give a name, then key=value overrides")
    name, *overrides = text.split()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        fail(f"--variant {text!r}: its first word names it (ASCII letters, digits, - and _, not first)")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        fail(f"--variant {text!r}: {bad[0]!r} is not key=value")
    owned = [o for o in overrides if o.partition("=")[0].strip() in OWNED]
    if owned:
        fail(f"--variant {text!r}: {owned[0]!r}: ablate.py sets {', '.join(OWNED)} itself (--budget, --seeds, --runs)")
    return name, overrides


def parse_seeds(text: str) -> list[int]:
    """'0,1' -> [0, 1]: distinct whole numbers >= 0."""
    items = [item.strip() for item in text.split(",")]
    if not all(re.fullmatch(r"[0-9]{1,18}", item) for item in items) or len(set(items)) != len(items):
        fail(f"--seeds {text!r}: give distinct whole numbers >= 0, separated by commas (e.g. 0,1)")
    return [int(item) for item in items]


def settings_of(args: argparse.Namespace, overrides: list[str], seed: int) -> dict:
    """Everything that shapes a run's result: its training, then its measurement."""
    config = hashlib.sha256(args.config.read_bytes()).hexdigest()
    return {"train": {"config": str(args.config), "config_sha256": config, "budget": args.budget,
                      "overrides": overrides, "seed": seed},
            "eval": {"sampler": args.sampler, "steps": args.steps, "n": args.n, "seed": seed}}


def run_one(args: argparse.Namespace, name: str, overrides: list[str], seed: int) -> dict:
    """Train (name, seed) for the budget, evaluate it; return its row. Reuses what matches its settings."""
    run_name = f"{name}_s{seed}"
    run_dir = args.runs / run_name
    result, record = run_dir / "eval.json", run_dir / "ablate.json"
    wanted = settings_of(args, overrides, seed)
    done = read_json(record)
    ddpm = [sys.executable, "-m", "ddpm_mnist"]  # this interpreter's package, whatever PATH holds
    if done.get("train") != wanted["train"]:
        sets = [f"name={run_name}", f"out_dir={args.runs}", f"seed={seed}", "train.steps=0", "train.epochs=0",
                f"train.time_budget={args.budget}", *overrides]
        started = time.perf_counter()
        train = [*ddpm, "train", "--config", str(args.config), "--overwrite"]
        said = child([*train, *(x for s in sets for x in ("--set", s))], f"training {run_name}")
        timing = {"wall_seconds": round(time.perf_counter() - started, 1),
                  "train_seconds": realised_seconds(said, args.budget)}
        write_text(run_dir / "timing.json", json.dumps(timing) + "\n")  # recorded in the run's manifest
        done = {"train": wanted["train"]}
        write_text(record, json.dumps(done, indent=2) + "\n")
    if done.get("eval") != wanted["eval"] or not result.is_file():
        child([*ddpm, "eval", "--ckpt", str(run_dir / "checkpoints" / "latest.pt"), "--n", str(args.n),
               "--sampler", args.sampler, "--steps", str(args.steps), "--seed", str(seed), "--json", str(result)],
              f"measuring {run_name}")
        write_text(record, json.dumps({**done, "eval": wanted["eval"]}, indent=2) + "\n")
    else:
        print(f"reusing {run_dir}: trained and measured with these same settings")
    report = json.loads(result.read_text())
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    trained = stored["train"]
    return {"variant": name, "overrides": overrides, "seed": seed, "steps": trained["steps"],
            "batch_size": trained["batch_size"], **timing_of(run_dir),
            "flops_per_step": step_flops(stored, trained["batch_size"]),
            **{m: report["samples"][m] for m in METRICS}, "floor_fid_mnist": report["floor"]["fid_mnist"]}


def read_json(path: Path) -> dict:
    """A record this script wrote, or {} where there is none or it does not read (a killed write): the
    run is then trained or measured again."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def timing_of(run_dir: Path) -> dict:
    """What timing.json says of a run's training: its process's wall time and the loop's own time
    (a run trained before timing.json: its wall time only)."""
    timing = read_json(run_dir / "timing.json")
    if timing:
        return timing
    wall = run_dir / "wall_seconds.txt"
    return {"wall_seconds": float(wall.read_text()) if wall.is_file() else None, "train_seconds": None}


DONE = re.compile(r"^done: [0-9,]+ steps in \S+ of a \S+ budget \(([+-][0-9.]+)%\)")


def realised_seconds(said: list[str], budget: str) -> float | None:
    """The training time a run's closing line reports: the budget's own clock (the loop, without
    start-up), from its share over or under the budget."""
    for line in said:
        if match := DONE.match(line):
            return round(duration_seconds(budget) * (1 + float(match[1]) / 100), 1)
    return None


def step_flops(stored: dict, batch_size: int) -> int:
    """FLOPs of one training step (forward and backward, counted by torch) for a run's model (from its
    config.yaml, read whole: its model and sample sections are checked together) and batch."""
    import torch  # here, not at the top: the rest of the script runs without it
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm_mnist.config import config_from_dict
    from ddpm_mnist.maths.unet import UNet

    config = config_from_dict({"model": stored["model"], "sample": stored["sample"]}, "the run's config.yaml").model
    unet = UNet(config)
    labels = torch.zeros(1, dtype=torch.long) if config.num_classes else None
    with FlopCounterMode(display=False) as counter:
        unet(torch.randn(1, 1, 28, 28), torch.tensor([500]), labels).square().mean().backward()
    return counter.get_total_flops() * batch_size


def child(command: list[str], what: str) -> list[str]:
    """Run one ddpm command, passing its output on; its failure is one line here (it has said why
    above), Ctrl-C passes on. Returns the lines it printed on stdout."""
    said = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1) as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            said.append(line)
    if process.returncode in (130, 143, -2, -15):
        raise KeyboardInterrupt
    if process.returncode != 0:
        fail(f"{what} failed (exit code {process.returncode}; its message is above); finished runs are kept")
    return said


def summary(rows: list[dict]) -> list[dict]:
    """One line per variant: mean fid_mnist and confidence over seeds, and the spread (max - min)."""
    lines = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        fids = [r["fid_mnist"] for r in mine]
        lines.append({"variant": name, "seeds": len(mine), "fid_mnist": statistics.fmean(fids),
                      "spread": max(fids) - min(fids), "confidence": statistics.fmean(r["confidence"] for r in mine),
                      "steps": statistics.fmean(r["steps"] for r in mine)})
    return sorted(lines, key=lambda line: line["fid_mnist"])


def table(rows: list[dict]) -> str:
    """Each run (its realised training time, steps, images and FLOPs, so that a win reads per minute,
    per image and per FLOP), then each variant's mean over seeds."""
    out = ["| variant | seed | trained | steps | images seen | GFLOP per step | fid_mnist | confidence |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        trained = "?" if r.get("train_seconds") is None else f"{r['train_seconds'] / 60:.2f} min"
        flops = "?" if r.get("flops_per_step") is None else f"{r['flops_per_step'] / 1e9:.1f}"
        out.append(f"| {r['variant']} | {r['seed']} | {trained} | {r['steps']:,} | {r['steps'] * r['batch_size']:,} | "
                   f"{flops} | {r['fid_mnist']:.1f} | {r['confidence']:.3f} |")
    out += ["", "| variant | seeds | mean fid_mnist | spread | mean confidence |", "|---|---|---|---|---|"]
    out += [f"| {s['variant']} | {s['seeds']} | {s['fid_mnist']:.1f} | {s['spread']:.1f} | {s['confidence']:.3f} |"
            for s in summary(rows)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail  # type: ignore[method-assign]  # one line, as every other bad input
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--budget", required=True, help="train.time_budget of every run, e.g. 5m")
    parser.add_argument("--variant", action="append", required=True, help="'name key=value ...'")
    parser.add_argument("--base", default="", help="'key=value ...' applied to every variant first")
    parser.add_argument("--seeds", default="0", help="comma-separated training and sampling seeds")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--sampler", default="ancestral")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--out", type=Path, default=None, help="also write the rows and summary as JSON")
    parser.add_argument("--table", type=Path, default=None, help="also write the table as Markdown")
    args = parser.parse_args()
    base = parse_variant(f"base {args.base}")[1]
    variants = [(name, [*base, *overrides]) for name, overrides in map(parse_variant, args.variant)]
    seeds = parse_seeds(args.seeds)
    check_arguments(args)
    try:
        rows = [run_one(args, name, overrides, seed) for name, overrides in variants for seed in seeds]
    except KeyboardInterrupt:
        print("stopped by Ctrl-C: finished runs are kept, and the next ablation reuses them", file=sys.stderr)
        return 130
    print(table(rows))
    if args.table is not None:
        args.table.write_text(table(rows) + "\n")
        print(f"wrote {args.table}")
    if args.out is not None:
        args.out.write_text(json.dumps({"config": str(args.config), "budget": args.budget, "n": args.n,
                                        "sampler": f"{args.sampler}:{args.steps}", "rows": rows,
                                        "summary": summary(rows)}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """Before any training: the config is a file, the outputs can be written and are not the config."""
    try:
        check_input_file(args.config, "config")
        for path, option, suffix in ((args.out, "--out", ".json"), (args.table, "--table", ".md")):
            if path is not None:
                ensure_writable(check_suffix(path, option, (suffix,)))
        check_paths({"--out": args.out, "--table": args.table}, inputs={"--config": args.config})
    except UserError as exc:
        fail(str(exc))
    try:
        duration_seconds(args.budget)
    except ValueError:
        fail(f"--budget {args.budget!r}: give a duration from 1s to 1000h such as 90s, 5m or 1.5h")
    if args.sampler not in SAMPLER_NAMES:
        fail(f"--sampler {args.sampler!r}: give one of {', '.join(SAMPLER_NAMES)}")
    if args.n < 2 or args.steps < 1:
        fail(f"--n {args.n} --steps {args.steps}: a measurement needs n >= 2 and steps >= 1")


if __name__ == "__main__":
    sys.exit(main())
