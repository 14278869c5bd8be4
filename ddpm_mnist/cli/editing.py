"""What a trained model does besides sampling: `ddpm inpaint`, `ddpm edit` and `ddpm interpolate`.

The three share most of their options, declared once here as annotated types."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddpm_mnist.config import SampleRequest

EDIT_SAMPLERS = ("ancestral (default), ddim, euler or euler_ancestral: the samplers whose steps stand alone "
                 "(the others keep state from step to step).")

Ckpt = Annotated[Path, typer.Option("--ckpt", help="Checkpoint file, exported .safetensors file, or diffusers "
                                    "DDPMPipeline folder.")]
Images = Annotated[list[Path] | None, typer.Option(
    "--image", help="A digit as an image file of any size or mode (repeatable), read as a 28x28 grey MNIST digit, "
    "white on black: a 28x28 image as it is, another size scaled and centred as MNIST's digits were.")]
TestDigits = Annotated[str | None, typer.Option("--test-digits", help="MNIST test digits by number, e.g. 0,1,2 "
                                                "(from --data).")]
Invert = Annotated[bool, typer.Option("--invert", help="The PNGs are a dark pen on light paper: invert them "
                                      "(default: off).")]
Data = Annotated[str | None, typer.Option("--data", help="Folder holding MNIST/raw/ (default: data.root of the run).")]
Steps = Annotated[int | None, typer.Option("--steps", help="Reverse steps (default: sample.steps; 0 = the full loop "
                                           "of T).")]
Sampler = Annotated[str | None, typer.Option("--sampler", help=EDIT_SAMPLERS)]
Eta = Annotated[float | None, typer.Option("--eta", help="DDIM eta (default: 0).")]
Seed = Annotated[int | None, typer.Option("--seed", help="Seed of the noise (default: the run's seed).")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", help="Images per forward pass; does not change the "
                                               "images (default: sample.batch_size).")]
Ema = Annotated[bool | None, typer.Option("--ema/--no-ema", help="Use the EMA weights (default) or the raw ones.")]
Device = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (default: "
                                            "runtime.device).")]
Digit = Annotated[int | None, typer.Option("--digit", help="Conditional models: draw this digit (0-9), with "
                                           "--guidance (default: the unconditional half).")]
Guidance = Annotated[float | None, typer.Option("--guidance", help="Conditional models: guidance weight W with "
                                                "--digit (default: sample.guidance).")]
Tensor = Annotated[Path | None, typer.Option("--tensor", help="Also write the results to a .pt or .npz file "
                                             "(uint8), with the test digits' labels (or --digit) for ddpm eval "
                                             "--samples.")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Override a sample.* or runtime.* key of the stored "
                                                "config.")]


def inpaint(
    ckpt: Ckpt,
    mask: Annotated[str, typer.Option("--mask", help="The hole the model fills: top, bottom, left, right (a half), "
                                      "center (the middle 14x14), or a 28x28 PNG, white where the model draws.")],
    image: Images = None, test_digits: TestDigits = None, invert: Invert = False, data: Data = None,
    n: Annotated[int, typer.Option("--n", help="Completions of each input.")] = 4,
    resample: Annotated[int, typer.Option("--resample", help="RePaint's resampling R: each block of --jump steps is "
                                          "run R times, going back up between; Lugmayr et al. use 10; 1 is no "
                                          "resampling.")] = 1,
    jump: Annotated[int, typer.Option("--jump", help="RePaint's jump length J, in steps.")] = 10,
    steps: Steps = None, sampler: Sampler = None, eta: Eta = None, seed: Seed = None, batch_size: BatchSize = None,
    ema: Ema = None, device: Device = None, digit: Digit = None, guidance: Guidance = None,
    out: Annotated[Path | None, typer.Option("--out", help="Grid PNG: a row per input, the input with its hole in "
                                             "grey, then its completions (default: <run>/samples/inpaint_...png).")
                   ] = None,
    tensor: Tensor = None, set_: Sets = None,
) -> None:
    """Complete the hidden part of digits with RePaint (Lugmayr et al. 2022): the known pixels stay the input's."""
    from ddpm_mnist.editing_files import Inputs, Outputs, inpaint_files

    inpaint_files(ckpt, Inputs(image or [], test_digits, invert, data), Outputs(out, tensor), mask=mask, n=n,
                  resample=resample, jump=jump, request=_request(steps, sampler, eta, seed, batch_size, ema, guidance),
                  overrides=set_, device_name=device, digit=digit)


def edit(
    ckpt: Ckpt, image: Images = None, test_digits: TestDigits = None, invert: Invert = False, data: Data = None,
    strength: Annotated[float, typer.Option("--strength", help="How far the input is noised, 0 to 1: the loop "
                                            "starts at step steps - floor(steps * S); 0: the input itself, 1: an "
                                            "ordinary sample.")] = 0.5,
    n: Annotated[int, typer.Option("--n", help="Variations of each input.")] = 4,
    steps: Steps = None, sampler: Sampler = None, eta: Eta = None, seed: Seed = None, batch_size: BatchSize = None,
    ema: Ema = None, device: Device = None, digit: Digit = None, guidance: Guidance = None,
    out: Annotated[Path | None, typer.Option("--out", help="Grid PNG: a row per input, the input then its "
                                             "variations (default: <run>/samples/edit_s<S>_...png).")] = None,
    tensor: Tensor = None, set_: Sets = None,
) -> None:
    """Redraw rough digits with SDEdit (Meng et al. 2022): noise the input part of the way, then denoise it."""
    from ddpm_mnist.editing_files import Inputs, Outputs, edit_files

    edit_files(ckpt, Inputs(image or [], test_digits, invert, data), Outputs(out, tensor), strength=strength, n=n,
               request=_request(steps, sampler, eta, seed, batch_size, ema, guidance), overrides=set_,
               device_name=device, digit=digit)


def interpolate(
    ckpt: Ckpt,
    mode: Annotated[str, typer.Option("--mode", help="noise: between two seeds' x_T (slerp), then a deterministic "
                                      "sampler; images: two inputs noised to --t, mixed, then denoised.")] = "noise",
    seeds: Annotated[str | None, typer.Option("--seeds", help="--mode noise: the two seeds, A,B; the end frames are "
                                              "the first image ddpm sample draws with each.")] = None,
    image: Images = None, test_digits: TestDigits = None, invert: Invert = False, data: Data = None,
    frames: Annotated[int, typer.Option("--frames", help="Frames, ends included.")] = 8,
    t: Annotated[int | None, typer.Option("--t", help="--mode images: the timestep both inputs are noised to "
                                          "(default: T/2).")] = None,
    steps: Steps = None,
    sampler: Annotated[str | None, typer.Option("--sampler", help="--mode noise: ddim (default, eta 0), dpmpp_2m, "
                                                "euler, heun or lms; --mode images: " + EDIT_SAMPLERS)] = None,
    eta: Eta = None, seed: Seed = None, batch_size: BatchSize = None, ema: Ema = None, device: Device = None,
    digit: Digit = None, guidance: Guidance = None,
    out: Annotated[Path | None, typer.Option("--out", help="Strip PNG, with a GIF of the frames beside it "
                                             "(<stem>.gif) (default: <run>/samples/interpolate_...png).")] = None,
    tensor: Tensor = None, set_: Sets = None,
) -> None:
    """Morph one digit into another: between two seeds' noise, or between two digits noised part of the way."""
    from ddpm_mnist.editing_files import Inputs, Outputs, interpolate_files

    interpolate_files(ckpt, Inputs(image or [], test_digits, invert, data), Outputs(out, tensor), mode=mode,
                      seeds=seeds, frames=frames, t=t, overrides=set_, device_name=device, digit=digit,
                      request=_request(steps, sampler, eta, seed, batch_size, ema, guidance))


def _request(steps: int | None, sampler: str | None, eta: float | None, seed: int | None, batch_size: int | None,
             ema: bool | None, guidance: float | None) -> SampleRequest:
    """The sample-time settings the command line asks for (None keeps the checkpoint's)."""
    return SampleRequest(steps=steps, sampler=sampler, eta=eta, seed=seed, batch_size=batch_size, use_ema=ema,
                         guidance=guidance)
