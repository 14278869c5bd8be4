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
A run whose eval JSON exists is not run again, so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

METRICS = ("fid_mnist", "confidence", "class_kl")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'name key=value key=value' -> (name, overrides)."""
    if not text.split():
        raise SystemExit("error: --variant '': give a name, then key=value overrides")
    name, *overrides = text.split()
    if not name.replace("_", "").replace("-", "").isalnum():
        raise SystemExit(f"error: --variant {text!r}: its first word names it (letters, digits, - and _)")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"error: --variant {text!r}: {bad[0]!r} is not key=value")
    return name, overrides


def run_one(args: argparse.Namespace, name: str, overrides: list[str], seed: int) -> dict:
    """Train (name, seed) for the budget, evaluate it; return its row. Reuses a finished run."""
    run_name = f"{name}_s{seed}"
    run_dir = args.runs / run_name
    result = run_dir / "eval.json"
    if not result.exists():
        sets = [f"name={run_name}", f"out_dir={args.runs}", f"seed={seed}", "train.steps=0", "train.epochs=0",
                f"train.time_budget={args.budget}", *overrides]
        started = time.perf_counter()
        ddpm = [sys.executable, "-m", "ddpm_mnist"]  # this interpreter's package, whatever PATH holds
        train = [*ddpm, "train", "--config", str(args.config), "--overwrite"]
        subprocess.run([*train, *(x for s in sets for x in ("--set", s))], check=True)
        (run_dir / "wall_seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
        subprocess.run([*ddpm, "eval", "--ckpt", str(run_dir / "checkpoints" / "latest.pt"), "--n", str(args.n),
                        "--sampler", args.sampler, "--steps", str(args.steps), "--seed", str(seed),
                        "--json", str(result)], check=True)
    report = json.loads(result.read_text())
    trained = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    return {"variant": name, "overrides": overrides, "seed": seed, "steps": trained["steps"],
            "batch_size": trained["batch_size"],
            "train_seconds": float((run_dir / "wall_seconds.txt").read_text()),
            **{m: report["samples"][m] for m in METRICS}, "floor_fid_mnist": report["floor"]["fid_mnist"]}


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
    out = ["| variant | seed | steps | images seen | fid_mnist | confidence |", "|---|---|---|---|---|---|"]
    out += [f"| {r['variant']} | {r['seed']} | {r['steps']} | {r['steps'] * r['batch_size']:,} | "
            f"{r['fid_mnist']:.1f} | {r['confidence']:.3f} |" for r in rows]
    out += ["", "| variant | seeds | mean fid_mnist | spread | mean confidence |", "|---|---|---|---|---|"]
    out += [f"| {s['variant']} | {s['seeds']} | {s['fid_mnist']:.1f} | {s['spread']:.1f} | {s['confidence']:.3f} |"
            for s in summary(rows)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = [run_one(args, name, overrides, seed) for name, overrides in variants for seed in seeds]
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


if __name__ == "__main__":
    sys.exit(main())
