"""Seeds derived from the run seed, so every random stream can be recomputed from a few integers."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence): (seed, 1) and (seed + 1, 0) differ.

    Used for streams that must be recomputable from their coordinates, such as the data order of
    epoch e, `derive_seed(seed, DATA_ORDER, e)`, or the noise of sample k.
    """
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1


# Stream tags, so that streams drawn from the same run seed never coincide.
DATA_ORDER = 1
TRAIN_NOISE = 2
PREVIEW_NOISE = 3
SAMPLE_NOISE = 4
MODEL_INIT = 5
DROPOUT = 6
EVAL_NOISE = 7
NLL_NOISE = 8
