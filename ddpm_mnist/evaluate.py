"""Sample-quality metrics from the project's MNIST classifier, each beside its floor of real digits.

- fid_mnist: Frechet distance between the classifier's 128-d penultimate features of the samples
  and of the 10,000 MNIST test digits (Heusel et al. 2017's formula, in float64).
- inception_score: exp(E_x KL(p(y|x) || p(y))) with the classifier's posteriors (one split).
- confidence: mean max_y p(y|x); confident_share: the share with max_y p(y|x) > 0.9.
- class_histogram and class_kl: predicted digits and the KL divergence of their distribution
  from uniform (a missing digit shows up here).
- memorised_share: the share of samples whose nearest training image (L2 distance of pixels in
  [0, 1]) is closer than `memorisation_threshold`; nn_distance_median beside it.

The floor: the same metrics for n real digits at the same n, so every number has a reference:
n training digits against the test set for the classifier metrics, and n test digits against the
training set for memorisation (a training digit is trivially its own nearest neighbour).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ddpm_mnist.classifier import MNISTClassifier, classify, load_classifier
from ddpm_mnist.data import load_mnist, to_model_range, to_uint8
from ddpm_mnist.errors import UserError
from ddpm_mnist.images import load_samples_and_labels
from ddpm_mnist.paths import check_paths, check_suffix, ensure_writable, write_text

if TYPE_CHECKING:
    from ddpm_mnist.config import SampleRequest

# L2 distance in [0, 1] pixel space (784 pixels) under which a sample counts as a copy of a
# training digit: 3.6% RMS per pixel. 5 of the 10,000 MNIST test digits are this close to a
# training digit (the median test digit is 4.3 away), so the floor is about 0.05%.
MEMORISATION_THRESHOLD = 1.0
CONFIDENT = 0.9


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, D), in float64.

    Tr((S_a S_b)^(1/2)) is computed as the trace of (S_a^(1/2) S_b S_a^(1/2))^(1/2), a symmetric
    PSD matrix with the same eigenvalues, whose eigenvalues `eigvalsh` finds stably.
    """
    a, b = features_a.double(), features_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(cov_a)
    sqrt_a = (v * w.clamp(min=0).sqrt()) @ v.T  # S_a^(1/2)
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu_a - mu_b
    return float(diff @ diff + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)


def inception_score(probs: torch.Tensor) -> float:
    """exp(mean_x KL(p(y|x) || p(y))) for class probabilities (N, 10); 1 (worst) to 10 (best)."""
    p = probs.double().clamp(min=1e-12)
    marginal = p.mean(0, keepdim=True)
    return math.exp(float((p * (p.log() - marginal.log())).sum(1).mean()))


def class_kl_from_uniform(counts: torch.Tensor) -> float:
    """KL(predicted class distribution || uniform over 10), 0 when every digit is equally common."""
    p = counts.double() / counts.sum()
    nonzero = p > 0
    return float((p[nonzero] * (p[nonzero] * len(counts)).log()).sum())


@torch.no_grad()
def nearest_distances(images: torch.Tensor, reference: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """L2 distance from each image to its nearest reference image, pixels in [0, 1]: (N,) float32.

    images, reference: uint8 (N, 1, 28, 28) and (M, 1, 28, 28).
    """
    ref = reference.flatten(1).float() / 255
    ref_sq = (ref * ref).sum(1)  # (M,)
    out = []
    for block in images.flatten(1).float().split(chunk):
        x = block / 255
        d2 = (x * x).sum(1, keepdim=True) - 2 * x @ ref.T + ref_sq  # (chunk, M), one matmul
        nearest = d2.argmin(1)
        out.append((x - ref[nearest]).norm(dim=1))  # exact, without the expansion's cancellation
    return torch.cat(out)


def classifier_metrics(
    model: MNISTClassifier, images: torch.Tensor, reference_features: torch.Tensor,
    asked: torch.Tensor | None = None,
) -> dict[str, Any]:
    """fid_mnist, inception_score, confidence, confident_share, class_histogram, class_kl of uint8
    images; with `asked` (the digit each image was asked to be, (N,)), also class_accuracy (the
    share the classifier assigns to that digit) and class_accuracy_per_digit (None: not asked)."""
    features, probs = classify(model, to_model_range(images))
    confidence = probs.max(1).values
    predicted = probs.argmax(1)
    counts = torch.bincount(predicted, minlength=10)
    accuracy: dict[str, Any] = {}
    if asked is not None:
        asked = asked.cpu()
        hits = predicted.cpu() == asked
        accuracy = {"class_accuracy": float(hits.double().mean()),
                    "class_accuracy_per_digit": [float(hits[asked == d].double().mean()) if bool((asked == d).any())
                                                 else None for d in range(10)]}
    return {**accuracy,
        "fid_mnist": frechet_distance(features, reference_features),
        "inception_score": inception_score(probs),
        "confidence": float(confidence.mean()),
        "confident_share": float((confidence > CONFIDENT).double().mean()),
        "class_histogram": counts.tolist(),
        "class_kl": class_kl_from_uniform(counts),
    }


class Reference:
    """What every measurement is made against, built once and shared by `ddpm eval`, `--sweep` and
    the training metrics: the classifier, the features of MNIST's test digits, and the digits the
    floor of real digits is drawn from (the training digits: None where no floor is needed)."""

    def __init__(self, test_images: torch.Tensor, train_images: torch.Tensor | None = None,
                 device: torch.device | None = None, classifier: MNISTClassifier | None = None) -> None:
        self.classifier = classifier or load_classifier(device=device)
        self.test_images, self.train_images = test_images, train_images
        self.features, _ = classify(self.classifier, to_model_range(test_images))

    @classmethod
    def test_set(cls, data_root: str | Path, download: bool, device: torch.device) -> Reference:
        """The reference of the training metrics: the test set alone, on the training device."""
        test_images, _ = load_mnist(data_root, train=False, download=download)
        return cls(test_images, device=device)

    def metrics(self, images: torch.Tensor, asked: torch.Tensor | None = None) -> dict[str, Any]:
        """`classifier_metrics` of uint8 images against the test digits."""
        return classifier_metrics(self.classifier, images, self.features, asked)

    def floor(self, n: int, seed: int, threshold: float | None = MEMORISATION_THRESHOLD) -> dict[str, Any]:
        """The same metrics for n real digits: n training digits against the test set, and (unless
        `threshold` is None) n test digits' memorisation against the training set (a training digit
        is its own nearest neighbour)."""
        real_train, real_test = floor_digits(self.train_images, self.test_images, n, seed)
        if threshold is None:
            return self.metrics(real_train)
        return {**self.metrics(real_train), **memorisation_metrics(real_test, self.train_images, threshold)}


def training_metrics(reference: Reference, images: torch.Tensor) -> dict[str, Any]:
    """Metrics of images (B, 1, 28, 28) in [-1, 1], as training logs them."""
    return reference.metrics(to_uint8(images.cpu()))


def memorisation_metrics(images: torch.Tensor, train_images: torch.Tensor, threshold: float) -> dict[str, float]:
    """memorised_share and nn_distance_median of uint8 images against the training digits."""
    distances = nearest_distances(images, train_images)
    return {
        "memorised_share": float((distances < threshold).double().mean()),
        "nn_distance_median": float(distances.median()),
    }


def evaluate_images(images: torch.Tensor, reference: Reference, *, seed: int = 0,
                    threshold: float = MEMORISATION_THRESHOLD, asked: torch.Tensor | None = None) -> dict[str, Any]:
    """Every metric for uint8 images (N, 1, 28, 28), and the floor of N real digits."""
    n = len(images)
    return {
        "n": n,
        "samples": {**reference.metrics(images, asked), **memorisation_metrics(images, reference.train_images,
                                                                              threshold)},
        "floor": reference.floor(n, seed, threshold),
        "reference": f"{len(reference.test_images)} MNIST test digits",
        "memorisation_threshold": threshold,
    }


def floor_digits(train_images: torch.Tensor, test_images: torch.Tensor, n: int, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The floor's n real training digits and n real test digits, drawn with `seed`."""
    g = torch.Generator().manual_seed(seed)
    real_train = train_images[torch.randperm(len(train_images), generator=g)[:n]]
    real_test = test_images[torch.randperm(len(test_images), generator=g)[:n]]
    return real_train, real_test


def real_digits(data_root: str | Path, download: bool, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's training and test digits, once n is known to fit the floor (n real digits of each)."""
    if n < 2:
        raise UserError(f"evaluation needs at least 2 images (a Frechet distance needs a covariance), got n = {n}")
    train_images, _ = load_mnist(data_root, train=True, download=download)
    test_images, _ = load_mnist(data_root, train=False, download=download)
    most = min(len(train_images), len(test_images))
    if n > most:
        raise UserError(f"n = {n} is more than the {most} real digits of the floor in {data_root}")
    return train_images, test_images


METRIC_ROWS = [
    ("fid_mnist", "Frechet distance, classifier features (lower is better)", "{:.3f}"),
    ("inception_score", "classifier Inception Score (max 10)", "{:.3f}"),
    ("confidence", "mean classifier confidence", "{:.3f}"),
    ("confident_share", "share with confidence > 0.9", "{:.3f}"),
    ("class_kl", "KL(predicted classes || uniform)", "{:.4f}"),
    ("memorised_share", "share closer than the threshold to a training digit", "{:.4f}"),
    ("nn_distance_median", "median L2 distance to the nearest training digit", "{:.3f}"),
]


def format_report(report: dict[str, Any]) -> str:
    """The metrics as a table: samples beside the floor of real digits."""
    lines = [f"{'metric':<20} {'samples':>10} {'real floor':>11}   meaning"]
    samples, floor = report["samples"], report["floor"]
    for key, meaning, fmt in METRIC_ROWS:
        lines.append(f"{key:<20} {fmt.format(samples[key]):>10} {fmt.format(floor[key]):>11}   {meaning}")
    lines.append(f"{'class_histogram':<20} {samples['class_histogram']} (real: {floor['class_histogram']})")
    if "class_accuracy" in samples:  # a conditional model: did it draw the digits asked for?
        per_digit = " ".join("-" if a is None else f"{a:.2f}" for a in samples["class_accuracy_per_digit"])
        lines.append(f"{'class_accuracy':<20} {samples['class_accuracy']:>10.3f} {'':>11}   "
                     "share the classifier reads as the digit asked for")
        lines.append(f"{'  per digit 0-9':<20} {per_digit}")
    lines.append(f"n = {report['n']}; reference: {report['reference']}; "
                 f"memorisation threshold {report['memorisation_threshold']}")
    return "\n".join(lines)


def evaluate(
    ckpt_path: Path | None = None,
    samples_path: Path | None = None,
    *,
    request: SampleRequest,
    device_name: str | None = None,
    data_root: str | None = None,
    json_path: Path | None = None,
    threshold: float = MEMORISATION_THRESHOLD,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """`ddpm eval`: sample from a checkpoint (or read a samples file), measure, print, write JSON.

    `request` holds the sample-time settings asked for (n, steps, sampler, seed, batch_size). Every
    argument, the size of the floor included, is checked before any sampling starts.
    """
    if (ckpt_path is None) == (samples_path is None):
        raise UserError("give one of --ckpt (sample, then measure) or --samples (measure a file from ddpm sample)")
    if json_path is not None:
        ensure_writable(check_suffix(json_path, "--json", (".json",)))
        check_paths({"--json": json_path}, inputs={"--ckpt": ckpt_path, "--samples": samples_path})
    started = time.perf_counter()
    if ckpt_path is not None:
        images, asked, digits, source = sampled_images(ckpt_path, request, overrides, device_name, data_root)
    else:
        images, asked, digits, source = file_images(samples_path, request, data_root)
    sampled = time.perf_counter() - started
    reference = Reference(digits[1], digits[0])
    report = evaluate_images(images, reference, threshold=threshold, seed=request.seed or 0, asked=asked)
    report["source"] = source
    report["seconds"] = {"sampling": round(sampled, 1), "metrics": round(time.perf_counter() - started - sampled, 1)}
    print(format_report(report))
    if json_path is not None:
        write_text(json_path, json.dumps(report, indent=2) + "\n")
        print(f"wrote {json_path}")
    return report


def sampled_images(ckpt_path: Path, request: SampleRequest, overrides: list[str] | None, device_name: str | None,
                   data_root: str | None) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict[str, Any]]:
    """Sample the images to measure from a checkpoint: (images, asked digits, MNIST, source)."""
    from ddpm_mnist.sample import prepare_sampling  # sampling only when there is a checkpoint to sample

    run = prepare_sampling(ckpt_path, request, overrides, device_name)
    s, root, download = run.cfg.sample, data_root or run.cfg.data.root, run.cfg.data.download
    digits = real_digits(root, download, s.n)  # the floor fits, before minutes of sampling
    print(f"sampling {s.n} images to evaluate: {run.note}")
    images, asked = run.images(s.n, run.cfg.seed, s.batch_size, desc="eval"), run.labels(s.n)
    source = {"checkpoint": str(ckpt_path), "step": run.step, "sampler": s.sampler, "steps": run.cfg.reverse_steps,
              "timestep_spacing": s.timestep_spacing, "seed": run.cfg.seed, "use_ema": s.use_ema}
    if asked is not None:
        source |= {"digits": list(s.digits) or "0-9 in turn", "guidance": s.guidance}
    return images, asked, digits, source


def file_images(samples_path: Path, request: SampleRequest, data_root: str | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict[str, Any]]:
    """The images to measure from a samples file (its first --n): (images, asked digits, MNIST, source)."""
    images, asked = load_samples_and_labels(samples_path)
    n = request.n
    if n is not None:
        if n < 2 or n > len(images):  # a Frechet distance needs two images at least
            raise UserError(f"--n {n}: {samples_path} holds {len(images)} images; give 2..{len(images)}")
        images, asked = images[:n], None if asked is None else asked[:n]
    digits = real_digits(data_root or "data", True, len(images))
    return images, asked, digits, {"samples": str(samples_path)}

