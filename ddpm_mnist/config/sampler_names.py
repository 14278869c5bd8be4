"""The samplers' names and how many steps each takes: the one place that knows them.

Config validation reads it without importing torch; `maths.samplers.SAMPLERS` holds one class per name.
"""

from __future__ import annotations

VP_SAMPLERS = ("ancestral", "ddim", "dpmpp_2m")  # on x_t itself, which keeps unit variance
SIGMA_SAMPLERS = ("euler", "euler_ancestral", "heun", "lms")  # on x_t / sqrt(abar_t) = x0 + sigma_t eps
SAMPLER_NAMES = VP_SAMPLERS + SIGMA_SAMPLERS
KARRAS_SAMPLERS = ("dpmpp_2m", *SIGMA_SAMPLERS)  # those that can step in Karras et al.'s sigmas


def max_steps(sampler: str, num_timesteps: int) -> int:
    """The most steps `sampler` takes on a schedule of T timesteps: T, but T - 1 for DPM-Solver++,
    whose steps skip timesteps by construction (its last step lands on the clean image)."""
    return num_timesteps - 1 if sampler == "dpmpp_2m" else num_timesteps


def min_steps(sampler: str) -> int:
    """The fewest steps `sampler` takes: 2 for Heun (at 1 step it is Euler), 1 for the others."""
    return 2 if sampler == "heun" else 1


def model_calls(sampler: str, steps: int) -> int:
    """Model evaluations of a run of `steps` steps: Heun's second-order correction costs one more per
    step but the last (its step to sigma = 0 is Euler's), as in diffusers' HeunDiscreteScheduler."""
    return 2 * steps - 1 if sampler == "heun" else steps
