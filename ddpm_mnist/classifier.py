"""The MNIST classifier that `ddpm eval` measures samples with (its features and its class posteriors).

Inception-based FID needs weights from the internet and is known to say little on MNIST, so, as
the FID authors suggest for MNIST, the features come from an MNIST classifier of this project's
own. Its weights ship in the package (`assets/mnist_classifier.pt`, 0.4 MB); they were made by
`python scripts/train_classifier.py` (seeded) and reach >= 99% on the
MNIST test set.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_mnist.errors import UserError

FEATURE_DIM = 128
WEIGHTS = "mnist_classifier.pt"


class MNISTClassifier(nn.Module):
    """Three conv stages (28 -> 14 -> 7 -> 3) and two linear layers.

    `features(x)` is the 128-d penultimate layer (after its ReLU): the space of `fid_mnist`.
    Input: (B, 1, 28, 28) float in [-1, 1], the model range of `data.py`.
    """

    def __init__(self) -> None:
        super().__init__()

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(stage(1, 32), stage(32, 48), stage(48, 64))  # (B, 64, 3, 3)
        self.fc = nn.Linear(64 * 3 * 3, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) in [-1, 1] -> (B, 128)."""
        return F.relu(self.fc(self.body(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) in [-1, 1] -> class logits (B, 10)."""
        return self.head(self.dropout(self.features(x)))


def load_classifier(path: Path | None = None, device: torch.device | str = "cpu") -> MNISTClassifier:
    """The shipped classifier (or one at `path`), in eval mode on `device`."""
    model = MNISTClassifier()
    try:
        if path is None:
            with resources.as_file(resources.files("ddpm_mnist") / "assets" / WEIGHTS) as shipped:
                state = torch.load(shipped, map_location="cpu", weights_only=True)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v.float() for k, v in state["weights"].items()})
    except (OSError, RuntimeError, KeyError) as exc:
        where = path or f"the package's assets/{WEIGHTS}"
        raise UserError(f"cannot load the MNIST classifier from {where}: {exc}") from None
    return model.to(device).eval()


@torch.no_grad()
def classify(
    model: MNISTClassifier, images: torch.Tensor, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, 128) float64 and class probabilities (N, 10) float64 of images in [-1, 1]."""
    device = next(model.parameters()).device
    features, probs = [], []
    for chunk in images.split(batch_size):
        f = model.features(chunk.to(device).float())
        features.append(f.double().cpu())
        probs.append(F.softmax(model.head(f), dim=1).double().cpu())
    return torch.cat(features), torch.cat(probs)
