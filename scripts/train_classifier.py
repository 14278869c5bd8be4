"""Train the MNIST classifier that `ddpm eval` measures samples with, and write its weights.

    python scripts/train_classifier.py [--data data] [--out ddpm_mnist/assets/mnist_classifier.pt]

Seeded (same weights on the same machine and torch build); about six minutes on a 2-core CPU.
Writes the weights in float16 (0.4 MB) with the accuracy it measured on the 10,000 test digits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm_mnist.classifier import MNISTClassifier, classify
from ddpm_mnist.data import load_mnist, to_model_range


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels, so that the classifier does not key on exact positions."""
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
    return padded[:, :, dy : dy + 28, dx : dx + 28]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="folder holding MNIST/raw/")
    parser.add_argument("--out", type=Path, default=Path("ddpm_mnist/assets/mnist_classifier.pt"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train_images, train_labels = load_mnist(args.data, train=True)
    test_images, test_labels = load_mnist(args.data, train=False)
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weights": weights, "test_accuracy": accuracy, "epochs": args.epochs, "seed": args.seed}, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB), test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
