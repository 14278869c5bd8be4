"""What inpainting, SDEdit and interpolation do, as numbers from the shipped classifier.

    python scripts/editing_bench.py --ckpt runs/cpu/checkpoints/latest.pt [--cond-ckpt runs/cpu_cond/...] \
        [--n 1000] [--steps 100] [--data data] [--json docs/editing.json] \
        [--strip docs/interpolation.png --strip-seeds 0 8]

On the first --n MNIST test digits, with the ancestral sampler at --steps:
- inpainting with the top half, then the left half, hidden: how often the classifier reads a
  completion as the digit's true label (accuracy), its confidence, and the completions' fid_mnist
  against the test set; beside the trivial baseline that fills the hole with the mean training
  digit, and the whole digits themselves (the ceiling). RePaint without resampling (R = 1), with
  R = 5 (jump 10), and without resampling at as many steps as R = 5 makes model calls (equal work);
- SDEdit at strengths 0.3, 0.5 and 0.7: the share of edits that keep the input's label;
- a conditional model (--cond-ckpt): inpainting R = 1 with both masks by its unconditional half, and
  with the top half hidden asked (--digit) for the true label, then for the next digit up;
- one interpolation strip between two seeds (--strip-seeds, DDIM, 50 steps) and the classifier's
  reading of each frame.
Every row says its seconds. Run nothing else that uses torch beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ddpm_mnist import editing
from ddpm_mnist.classifier import classify
from ddpm_mnist.config import SampleRequest
from ddpm_mnist.data import load_mnist, to_model_range
from ddpm_mnist.errors import UserError
from ddpm_mnist.evaluate import Reference
from ddpm_mnist.images import save_gif, save_grid
from ddpm_mnist.inputs import named_mask
from ddpm_mnist.maths.editing import repaint_calls, repaint_positions


def job(ckpt: Path, steps: int, sampler: str = "ancestral") -> editing.SamplingJob:
    request = SampleRequest(steps=steps, sampler=sampler, seed=0, n=1000, batch_size=128)
    checkpoint, _ = editing.configured(ckpt, request, None, "bench")
    return editing.prepared(checkpoint, request, None, None)


def scores(reference: Reference, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    m = reference.metrics(images, labels)
    return {"accuracy": m["class_accuracy"], "confidence": m["confidence"], "fid_mnist": m["fid_mnist"]}


def row(name: str, started: float, **values: Any) -> dict[str, Any]:
    out = {"row": name, **values, "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(out), flush=True)
    return out


def model_calls(steps: int, resample: int, jump: int) -> int:
    return repaint_calls(repaint_positions(steps, resample, jump))


def inpainting_rows(ckpt: Path, model: str, digits: torch.Tensor, labels: torch.Tensor, reference: Reference,
                    steps: int, masks: list[str], settings: list[tuple[int, int]]) -> list[dict[str, Any]]:
    rows = []
    for mask in masks:
        hole = named_mask(mask)
        for resample, run_steps in settings:
            started = time.perf_counter()
            images = editing.inpaint(job(ckpt, run_steps), digits, ~hole, 1, resample=resample, jump=10)
            assert torch.equal(images.masked_select(~hole), digits.masked_select(~hole))  # the kept pixels
            rows.append(row(f"inpaint {mask}", started, model=model, resample=resample, steps=run_steps,
                            model_calls=model_calls(run_steps, resample, 10), **scores(reference, images, labels)))
    return rows


def asked_rows(ckpt: Path, digits: torch.Tensor, labels: torch.Tensor, reference: Reference, steps: int
               ) -> list[dict[str, Any]]:
    """A conditional model asked (--digit, guidance) for each digit's true label, then for the next
    digit up: the top half hidden, R = 1. Accuracy is the share read as the digit asked for."""
    rows = []
    hole = named_mask("top")
    for name, asked in (("true label", labels), ("label + 1", (labels + 1) % 10)):
        started = time.perf_counter()
        images = torch.zeros_like(digits)
        for d in range(10):
            chosen = (asked == d).nonzero().flatten()
            if len(chosen):
                images[chosen] = editing.inpaint(job(ckpt, steps), digits[chosen], ~hole, 1, digit=d)
        rows.append(row("inpaint top", started, model=f"cpu_cond asked for the {name}", resample=1, steps=steps,
                        model_calls=steps, **scores(reference, images, asked)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--cond-ckpt", type=Path)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--data", default="data")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--strip", type=Path, help="the interpolation strip, a .png (and a .gif beside it)")
    parser.add_argument("--strip-seeds", type=int, nargs=2, default=[0, 8], help="its two seeds (two digits apart)")
    args = parser.parse_args()
    try:
        test_images, test_labels = load_mnist(args.data, train=False, download=False)
        train_images, _ = load_mnist(args.data, train=True, download=False)
        reference = Reference(test_images, train_images)
        digits, labels = test_images[: args.n], test_labels[: args.n]
        rows = [row("whole digits", time.perf_counter(), **scores(reference, digits, labels))]
        mean_digit = train_images.float().mean(0).round().to(torch.uint8)  # (1, 28, 28)
        for mask in ("top", "left"):
            started = time.perf_counter()
            filled = torch.where(named_mask(mask), mean_digit, digits)
            rows.append(row(f"inpaint {mask}", started, model="mean digit", **scores(reference, filled, labels)))
        equal = model_calls(args.steps, 5, 10)
        rows += inpainting_rows(args.ckpt, "cpu", digits, labels, reference, args.steps, ["top"],
                                [(1, args.steps), (5, args.steps), (1, equal)])
        rows += inpainting_rows(args.ckpt, "cpu", digits, labels, reference, args.steps, ["left"], [(1, args.steps)])
        for strength in (0.3, 0.5, 0.7):
            started = time.perf_counter()
            images = editing.edit(job(args.ckpt, args.steps), digits, strength, 1)
            rows.append(row("edit", started, model="cpu", strength=strength, steps=args.steps,
                            **scores(reference, images, labels)))
        if args.cond_ckpt is not None:
            rows += inpainting_rows(args.cond_ckpt, "cpu_cond (unconditional half)", digits, labels, reference,
                                    args.steps, ["top", "left"], [(1, args.steps)])
            rows += asked_rows(args.cond_ckpt, digits, labels, reference, args.steps)
        if args.strip is not None:
            rows.append(strip(args.ckpt, args.strip, reference, tuple(args.strip_seeds)))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json is not None:
        args.json.write_text(json.dumps({"n": args.n, "steps": args.steps, "rows": rows}, indent=2) + "\n")
    return 0


def strip(ckpt: Path, path: Path, reference: Reference, seeds: tuple[int, int]) -> dict[str, Any]:
    """Eight frames between the first samples of two seeds (DDIM, 50 steps), and their readings."""
    started = time.perf_counter()
    frames = editing.interpolate_noise(job(ckpt, 50, "ddim"), seeds, 8)
    save_grid(frames, path, len(frames))
    save_gif(frames, path.with_suffix(".gif"))
    _, probs = classify(reference.classifier, to_model_range(frames))
    readings = [f"{int(p.argmax())} ({float(p.max()):.2f})" for p in probs]
    return row("interpolate", started, seeds=list(seeds), sampler="ddim", steps=50, readings=readings)


if __name__ == "__main__":
    sys.exit(main())
