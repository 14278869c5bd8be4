"""Train the MNIST classifier that `ddpm eval` measures samples with, and write its weights.

    python scripts/train_classifier.py [--data data] [--out ddpm_mnist/assets/mnist_classifier.pt]

Seeded (same weights on the same machine and torch build); about six minutes on a 2-core CPU.
Writes the weights in float16 (0.4 MB) with the accuracy it measured on the 10,000 test digits.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F

from ddpm_mnist.classifier import MNISTClassifier, classify
from ddpm_mnist.data import load_mnist, to_model_range
from ddpm_mnist.errors import UserError
from ddpm_mnist.paths import atomic_file, check_suffix, ensure_writable


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels, so that the classifier does not key on exact positions."""
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
    return padded[:, :, dy : dy + 28, dx : dx + 28]


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="folder holding MNIST/raw/")
    parser.add_argument("--out", type=Path, default=Path("ddpm_mnist/assets/mnist_classifier.pt"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.epochs < 1:
        fail(f"--epochs {args.epochs}: train for at least 1 epoch")
    try:
        check_suffix(args.out, "--out", (".pt",))
        ensure_writable(args.out)
        train_images, train_labels = load_mnist(args.data, train=True, download=False)  # scripts/fetch_mnist.sh
        test_images, test_labels = load_mnist(args.data, train=False, download=False)
    except UserError as exc:  # MNIST missing, an --out that cannot be written
        fail(str(exc))

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x, y = to_model_range(train_images), train_labels
    model = MNISTClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps_per_epoch = len(x) // 128
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.epochs * steps_per_epoch)
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * 128 : (i + 1) * 128]
            loss = F.cross_entropy(model(augment(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        _, probs = classify(model, to_model_range(test_images))
        accuracy = (probs.argmax(1) == test_labels).double().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {accuracy:.4f}, "
              f"{time.perf_counter() - started:.0f} s")
    weights = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    with atomic_file(args.out) as tmp:
        torch.save({"weights": weights, "test_accuracy": accuracy, "epochs": args.epochs, "seed": args.seed}, tmp)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB), test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
