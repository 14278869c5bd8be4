"""One row of digits 0-9 per guidance weight, all from the same noise: what guidance does.

    python scripts/guidance_strip.py --ckpt runs/cpu_cond/checkpoints/latest.pt --out docs/guidance.png \
        [--guidance 0,1,3,7] [--seed 0] [--sampler dpmpp_2m --steps 20]

Image k of every row draws the same x_T and z (its noise depends on (seed, k) alone), so the rows
differ only in W: 0 is the unconditional model, 1 plain conditional sampling, more is guided.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ddpm_mnist.checkpoint import load
from ddpm_mnist.config import SampleRequest
from ddpm_mnist.data import to_model_range
from ddpm_mnist.errors import UserError
from ddpm_mnist.images import save_grid
from ddpm_mnist.paths import check_paths, check_suffix, ensure_writable
from ddpm_mnist.sample import prepare_sampling, sampling_config
from ddpm_mnist.sweep import parse_guidance


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the strip, a .png")
    parser.add_argument("--guidance", default="0,1,3,7", help="the weights, one row each")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    try:
        ensure_writable(check_suffix(args.out, "--out", (".png",)))
        check_paths({"--out": args.out}, inputs={"--ckpt": args.ckpt})
        checkpoint = load(args.ckpt)
        options = [SampleRequest(guidance=weight, n=10, seed=args.seed, sampler=args.sampler, steps=args.steps)
                   for weight in parse_guidance(args.guidance)]
        for option in options:  # every weight is checked before the first row is sampled
            sampling_config(checkpoint, option, None)
        rows = []
        for option in options:
            run = prepare_sampling(args.ckpt, option, checkpoint=checkpoint)
            rows.append(run.images(10, run.cfg.seed, 10, desc=f"W={option.guidance:g}"))
            print(f"W = {option.guidance:g}: {run.note}")
        save_grid(to_model_range(torch.cat(rows)), args.out, nrow=10)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stopped by Ctrl-C: {args.out} was not written", file=sys.stderr)
        return 130
    print(f"wrote {args.out}: one row per W ({args.guidance}), digits 0 to 9 across")
    return 0


if __name__ == "__main__":
    sys.exit(main())
