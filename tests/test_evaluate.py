"""Metrics: the Frechet distance, Inception Score, class KL, memorisation, the classifier, ddpm eval."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURE_ROOT, run_cli
from helpers import one_line_error

from ddpm_mnist.classifier import classify, load_classifier
from ddpm_mnist.data import load_mnist, to_model_range, to_uint8
from ddpm_mnist.evaluate import (
    Reference,
    class_kl_from_uniform,
    evaluate_images,
    frechet_distance,
    inception_score,
    nearest_distances,
)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def test_digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist(FIXTURE_ROOT, train=False, download=False)


def test_shipped_classifier_reaches_its_accuracy_on_unseen_digits(classifier, test_digits) -> None:
    images, labels = test_digits  # the first 1000 MNIST test digits: never trained on
    _, probs = classify(classifier, to_model_range(images))
    accuracy = (probs.argmax(1) == labels).double().mean().item()
    assert accuracy >= 0.99


def test_frechet_distance_matches_the_gaussian_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200_000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(200_000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + 1.0
    # diagonal covariances: ||mu_a - mu_b||^2 + sum (sigma_a - sigma_b)^2 = 3 + (0 + 1 + 0.25)
    assert frechet_distance(a, b) == pytest.approx(4.25, abs=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = 3
    k = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.transpose(2, 3))


def test_fid_mnist_is_zero_for_a_set_with_itself_and_grows_with_damage(classifier, test_digits) -> None:
    images = to_model_range(test_digits[0])
    reference, _ = classify(classifier, images)
    assert frechet_distance(reference, reference) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=g)
    noised = [frechet_distance(classify(classifier, (images + s * noise).clamp(-1, 1))[0], reference)
              for s in (0.1, 0.3, 0.6)]
    blurred = [frechet_distance(classify(classifier, blur(images, s))[0], reference) for s in (0.5, 1.0, 2.0)]
    assert 0 < noised[0] < noised[1] < noised[2]
    assert 0 < blurred[0] < blurred[1] < blurred[2]


def test_inception_score_bounds() -> None:
    assert inception_score(torch.full((50, 10), 0.1)) == pytest.approx(1.0)  # no information
    one_hot = torch.eye(10).repeat(5, 1)
    assert inception_score(one_hot) == pytest.approx(10.0, rel=1e-6)  # confident and balanced
    assert inception_score(torch.eye(10)[[3] * 50]) == pytest.approx(1.0)  # confident, one class


def test_class_kl_is_zero_for_uniform_and_log10_for_one_class() -> None:
    assert class_kl_from_uniform(torch.full((10,), 7)) == pytest.approx(0.0, abs=1e-12)
    assert class_kl_from_uniform(torch.tensor([5, 0, 0, 0, 0, 0, 0, 0, 0, 0])) == pytest.approx(math.log(10))
    assert class_kl_from_uniform(torch.tensor([2, 1, 1, 1, 1, 1, 1, 1, 1, 0])) > 0


def test_nearest_distances_match_brute_force(test_digits) -> None:
    images = test_digits[0]
    queries, reference = images[:20], images[10:300]
    got = nearest_distances(queries, reference, chunk=7)
    brute = torch.cdist(queries.flatten(1).double() / 255, reference.flatten(1).double() / 255).min(1).values
    torch.testing.assert_close(got.double(), brute, atol=1e-3, rtol=1e-4)
    assert torch.all(got[10:] < 1e-3)  # queries 10..19 are in the reference


def test_report_has_the_floor_at_the_same_n(classifier, test_digits) -> None:
    images = test_digits[0][:40]
    noisy = to_uint8((to_model_range(images) + 0.8 * torch.randn(images.shape)).clamp(-1, 1))
    train, test = (load_mnist(FIXTURE_ROOT, train=split, download=False)[0] for split in (True, False))
    reference = Reference(test, train, classifier=classifier)
    report = evaluate_images(noisy, reference)
    assert report["n"] == 40
    assert sum(report["samples"]["class_histogram"]) == sum(report["floor"]["class_histogram"]) == 40
    for key in ("fid_mnist", "inception_score", "confidence", "confident_share", "class_kl", "memorised_share"):
        assert key in report["samples"] and key in report["floor"]
    assert report["samples"]["fid_mnist"] > report["floor"]["fid_mnist"]  # noise is worse than real digits
    copies = load_mnist(FIXTURE_ROOT, train=True, download=False)[0][:40]
    assert evaluate_images(copies, reference)["samples"]["memorised_share"] == 1.0


@pytest.mark.slow
def test_eval_command_on_a_samples_file_writes_json(trained_run: Path, tmp_path: Path, capsys) -> None:
    tensor = tmp_path / "s.pt"
    code, _, err = run_cli(capsys, "sample", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "24",
                           "--steps", "5", "--tensor", tensor, "--out", tmp_path / "g.png")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", "--samples", tensor, "--data", FIXTURE_ROOT, "--json", tmp_path / "m.json")
    assert code == 0, err
    assert "fid_mnist" in out and "real floor" in out
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["n"] == 24 and report["source"] == {"samples": str(tensor)}
    assert report["samples"]["fid_mnist"] > report["floor"]["fid_mnist"]  # 20 training steps are not digits yet
    for n in ("1", "25"):  # a Frechet distance needs two images; the file holds 24
        code, _, err = run_cli(capsys, "eval", "--samples", tensor, "--n", n, "--data", FIXTURE_ROOT)
        assert code == 2 and "give 2..24" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_eval_command_samples_from_a_checkpoint(trained_run: Path, tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "eval", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "12",
                             "--steps", "4", "--json", tmp_path / "m.json")
    assert code == 0, err
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["source"]["steps"] == 4 and report["n"] == 12


def test_eval_needs_exactly_one_source(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "eval")
    assert code == 2 and "give one of --ckpt" in err
    code, _, err = run_cli(capsys, "eval", "--samples", tmp_path / "none.pt")
    assert code == 2 and "no such samples file" in err


@pytest.mark.slow
def test_sweep_compares_settings_from_the_same_seeds(trained_run: Path, tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "eval", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--sweep",
                             "ancestral:20,ddim:5,dpmpp_2m:5:trailing,dpmpp_2m:3", "--n", "24", "--json",
                             tmp_path / "s.json", "--plot", tmp_path / "s.png")
    assert code == 0, err
    report = json.loads((tmp_path / "s.json").read_text())
    rows = report["rows"]
    assert [r["setting"] for r in rows] == ["ancestral:20", "ddim:5", "dpmpp_2m:5:trailing", "dpmpp_2m:3"]
    assert [r["model_evaluations"] for r in rows] == [20, 5, 5, 3]
    assert rows[2]["timestep_spacing"] == "trailing" and rows[0]["full_loop"] is False  # T is 1000
    assert all(r["fid_mnist"] > report["floor"]["fid_mnist"] > 0 for r in rows)
    assert "real digits (floor)" in out and (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    # the same seeds: a setting sampled alone gives the same number
    code, _, err = run_cli(capsys, "eval", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--sweep", "ddim:5",
                           "--n", "24", "--json", tmp_path / "t.json")
    assert code == 0 and json.loads((tmp_path / "t.json").read_text())["rows"][0]["fid_mnist"] == rows[1]["fid_mnist"]


@pytest.mark.slow
@pytest.mark.parametrize("args, says", [
    (["--sweep", "bogus:20"], "sample.sampler: must be one of ancestral, ddim, dpmpp_2m, euler, euler_ancestral, "
                              "heun, lms"),
    (["--sweep", "heun:1"], "heun takes at least 2 steps"),
    (["--sweep", "ddim:0"], "with steps >= 1"),
    (["--sweep", "ddim:1001"], "sample.steps: must be <= schedule.num_timesteps (1000), got 1001"),
    (["--sweep", "dpmpp_2m:1000"], "dpmpp_2m takes fewer than schedule.num_timesteps (1000) steps"),
    (["--sweep", "ddim:5:sideways"], "the spacing must be one of leading, trailing, linspace"),
    (["--sweep", "ddim-5"], "each setting is sampler:steps"),
    (["--sweep", "ddim:5,ddim:5"], "a setting is given twice"),
    (["--sweep", "ddim:2,ddim:2:leading"], "ddim:2:leading samples exactly what ddim:2 does"),
    (["--sweep", "ddim:\u00b2"], "each setting is sampler:steps"),
    (["--sweep", ",".join(f"ddim:{k}" for k in range(1, 66))], "65 settings; a sweep compares at most 64"),
    (["--sweep", "ddim:5", "--steps", "3"], "not --samples, --steps or --sampler"),
    (["--plot", "p.png"], "give --ckpt and --sweep"),
    (["--sweep", "ddim:5", "--plot", "p.jpg"], "--plot p.jpg: the file name must end in .png"),
])
def test_a_bad_sweep_is_one_line_before_any_sampling(trained_run: Path, tmp_path: Path, capsys, monkeypatch,
                                                     args: list[str], says: str) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "eval", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "8", *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == [] and "fid_mnist" not in out


@pytest.mark.slow
def test_a_sweep_holds_one_settings_model_at_a_time(trained_run: Path, monkeypatch, capsys) -> None:
    """Every setting is checked first; then each is prepared, measured and dropped before the next."""
    import ddpm_mnist.sweep as sweep_module

    events: list[str] = []
    prepare, measure = sweep_module.prepare_sampling, sweep_module.measure

    def prepared(*args, **kwargs):
        events.append("prepare")
        return prepare(*args, **kwargs)

    def measured(*args, **kwargs):
        events.append("measure")
        return measure(*args, **kwargs)
    monkeypatch.setattr(sweep_module, "prepare_sampling", prepared)
    monkeypatch.setattr(sweep_module, "measure", measured)
    code, _, err = run_cli(capsys, "eval", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "4",
                           "--sweep", "ddim:2,ddim:3,ancestral:2", "--data", FIXTURE_ROOT)
    assert code == 0, err
    assert events == ["prepare", "measure"] * 3


@pytest.mark.slow
def test_eval_checks_memory_before_sampling_too(trained_run: Path, monkeypatch, capsys) -> None:
    import ddpm_mnist.sample as sample

    monkeypatch.setattr(sample, "available_memory_bytes", lambda device: 50 * 2**20)  # a nearly full machine
    code, out, err = run_cli(capsys, "eval", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "500",
                             "--steps", "2", "--batch-size", "500")
    one_line_error(code, err, "sampling 500 images in batches of 500 needs about 0.5 GiB, and 0.0 GiB is free")
    assert "sampling 500 images to evaluate" in out and "eval:" not in err  # refused before the first step


@pytest.mark.slow
def test_eval_checks_n_against_the_floor_before_sampling(trained_run: Path, tmp_path: Path, capsys) -> None:
    started = time.perf_counter()
    code, out, err = run_cli(capsys, "eval", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "1001",
                             "--steps", "1000", "--set", "sample.batch_size=1001")
    one_line_error(code, err, "n = 1001 is more than the 1000 real digits of the floor")
    assert "sampling" not in out
    assert time.perf_counter() - started < 120  # 1001 images x 1000 steps would take many minutes here


@pytest.mark.slow
def test_eval_refuses_a_negative_n(trained_run: Path, tmp_path: Path, capsys) -> None:
    tensor = tmp_path / "s.pt"
    assert run_cli(capsys, "sample", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "15", "--steps", "2",
                   "--tensor", tensor, "--out", tmp_path / "g.png")[0] == 0
    for n in ("-1", "0", "16"):
        code, _, err = run_cli(capsys, "eval", "--samples", tensor, "--n", n, "--data", FIXTURE_ROOT)
        one_line_error(code, err, f"--n {n}: {tensor} holds 15 images")


def test_samples_whose_labels_are_not_a_tensor_are_one_line(tmp_path: Path, capsys) -> None:
    path = tmp_path / "x.pt"
    torch.save({"images": torch.zeros(4, 1, 28, 28, dtype=torch.uint8), "labels": [1, 2, 3, 4]}, path)
    code, _, err = run_cli(capsys, "eval", "--samples", path, "--data", FIXTURE_ROOT)
    one_line_error(code, err, "its labels must be a tensor of 4 digits 0 to 9 (int64), not a list")
