"""The samplers' names and how many steps each takes: the one place that knows them.

Config validation reads it without importing torch; `maths.samplers.SAMPLERS` holds one class per name.
"""

from __future__ import annotations

SAMPLER_NAMES = ("ancestral", "ddim", "dpmpp_2m")


def max_steps(sampler: str, num_timesteps: int) -> int:
    """The most steps `sampler` takes on a schedule of T timesteps: T, but T - 1 for DPM-Solver++,
    whose steps skip timesteps by construction (its last step lands on the clean image)."""
    return num_timesteps - 1 if sampler == "dpmpp_2m" else num_timesteps
