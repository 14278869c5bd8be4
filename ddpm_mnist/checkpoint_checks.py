"""A checkpoint from a stranger is a trust boundary: every byte and every value is checked before use.

`torch.load(weights_only=True)` stops a file from running code, but not from holding bad tensors:
a sparse or meta tensor, a view of a 4 TB tensor over four bytes, int32 weights, an optimiser
moment of the wrong shape (the fused AdamW then writes past its buffer), betas of 2.0. So a
checkpoint is read in three stages, each failure one line naming the field:

1. `read_verified`: a regular file of bounded size, a zip archive whose every record matches its
   CRC (a flipped byte anywhere is caught here), records stored uncompressed, as torch writes them;
2. `torch.load` of those same bytes (never the file again, so what was checked is what is loaded);
3. `check_weights`, `check_optimizer`, `check_lr_scheduler`, `check_rng`: every tensor dense,
   strided, on the CPU, of the dtype and exact shape of what it fills, and every scalar of its type
   and range.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ddpm_mnist.errors import CheckpointError
from ddpm_mnist.paths import check_input_file

MAX_CHECKPOINT_BYTES = 4 * 2**30  # far above any model a config can describe at a sensible size
MAX_RECORDS = 100_000
MAX_PARAMETERS = 2**30  # elements of the model a stored config may describe
RNG_STATE_MAX_BYTES = 1 << 16  # a CPU generator's state is 5,056 bytes, a CUDA one's 16
ADAMW_MOMENTS = ("exp_avg", "exp_avg_sq")


def read_verified(path: Path) -> bytes:
    """The file's bytes, once they are known to be a whole torch zip archive (every record's CRC)."""
    check_input_file(path, "checkpoint")
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{path}: {size / 2**30:.1f} GiB, more than a ddpm-mnist checkpoint can be "
                              f"({MAX_CHECKPOINT_BYTES // 2**30} GiB)")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CHECKPOINT_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint: {exc.strerror or exc}") from None
    check_archive(data, path)
    return data


def check_archive(data: bytes, path: Path) -> None:
    """A zip archive as torch.save writes it: bounded records, stored (not compressed), CRCs intact."""
    buffer = io.BytesIO(data)
    if not zipfile.is_zipfile(buffer):
        raise CheckpointError(f"{path}: not a readable checkpoint: not a torch zip archive (truncated, or another "
                              "kind of file)")
    try:
        with zipfile.ZipFile(buffer) as archive:
            records = archive.infolist()
            if len(records) > MAX_RECORDS:
                raise CheckpointError(f"{path}: not a ddpm-mnist checkpoint: {len(records):,} records in its archive")
            packed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
            if packed:
                raise CheckpointError(f"{path}: not a torch checkpoint: record {packed[0]} is compressed "
                                      "(torch stores records as they are)")
            if sum(r.file_size for r in records) > len(data):
                raise CheckpointError(f"{path}: damaged: its records claim more bytes than the file holds")
            damaged = archive.testzip()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint: a damaged zip archive ({str(exc)[:120]})") from None
    if damaged is not None:
        raise CheckpointError(f"{path}: damaged: record {damaged} does not match its CRC (the file changed after "
                              "it was written); use another checkpoint")


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def check_tensor(value: Any, field: str, dtype: torch.dtype, shape: Sequence[int] | None = None) -> torch.Tensor:
    """A dense, strided CPU tensor of `dtype` (and `shape`) whose elements lie in its own storage."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{field}: must be a tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise ValueError(f"{field}: a {str(value.layout).removeprefix('torch.')} tensor; checkpoints hold dense ones")
    if value.device.type != "cpu":
        raise ValueError(f"{field}: a tensor on {value.device.type}; checkpoints hold tensors with their data")
    if value.dtype != dtype:
        raise ValueError(f"{field}: dtype {str(value.dtype).removeprefix('torch.')}, where "
                         f"{str(dtype).removeprefix('torch.')} is expected")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{field}: shape {_shape(value.shape)}, where the model's is {_shape(shape)}")
    dense = value.is_contiguous() or (value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last))
    needed = (value.storage_offset() + value.numel()) * value.element_size()
    if not dense or value.untyped_storage().nbytes() < needed:
        raise ValueError(f"{field}: a strided view (strides {_shape(value.stride())}), not a tensor of its own")
    return value


def check_weights(weights: Any, expected: dict[str, torch.Tensor], field: str, what: str) -> None:
    """Exactly the model's tensors (`expected`), each of its dtype and shape, and finite; `what`
    names the weights in messages (EMA, raw)."""
    if not isinstance(weights, dict):
        raise ValueError(f"its {what} weights are not a mapping of names to tensors")
    missing = [name for name in expected if name not in weights]
    unexpected = [str(name)[:60] for name in weights if name not in expected]
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ValueError(f"{what} weights do not fit the model its config describes "
                         f"({len(missing)} missing, {len(unexpected)} unexpected; {detail})")
    bad = []
    for name, like in expected.items():
        value = weights[name]
        if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(like.shape):
            raise ValueError(f"{what} weights do not fit the model its config describes: {field}.{name}: shape "
                             f"{_shape(value.shape)}, where the model's is {_shape(like.shape)}")
        tensor = check_tensor(value, f"{field}.{name}", like.dtype, like.shape)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    if bad:
        raise ValueError(f"its {what} weights hold NaN or infinite values ({len(bad)} tensor(s), e.g. {bad[0]}): "
                         "the run diverged before this checkpoint; sample from an earlier one")


def _number(value: Any, field: str, *, low: float = 0.0, low_open: bool = False, high: float = math.inf,
            high_open: bool = False) -> None:
    """A finite int or float within [low, high] (an end open where asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field}: must be a finite number, got {brief(value)}")
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{field}: must lie in {left}{low:g}, {high:g}{right}, got {value!r}")


def brief(value: Any) -> str:
    """A value in at most 40 characters, for a message: its repr, or its type's name."""
    text = repr(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def check_param_group(group: Any, field: str, size: int) -> list[int]:
    """One AdamW parameter group's hyperparameters; returns the indices of its parameters."""
    if not isinstance(group, dict):
        raise ValueError(f"{field}: must be a mapping, got {brief(group)}")
    params = group.get("params")
    if not isinstance(params, list) or len(params) != size or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in params):
        raise ValueError(f"{field}.params: must list the group's {size} parameter indices")
    _number(group.get("lr"), f"{field}.lr")
    if "initial_lr" in group:  # set by the lr scheduler
        _number(group["initial_lr"], f"{field}.initial_lr")
    _number(group.get("eps"), f"{field}.eps", low_open=True)
    _number(group.get("weight_decay"), f"{field}.weight_decay")
    betas = group.get("betas")
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ValueError(f"{field}.betas: must be two numbers in [0, 1), got {brief(betas)}")
    for i in range(2):
        _number(betas[i], f"{field}.betas[{i}]", high=1.0, high_open=True)
    for key in ("amsgrad", "maximize", "differentiable"):  # what this tool's AdamW is built with
        if group.get(key, False) is not False:
            raise ValueError(f"{field}.{key}: must be false, as ddpm-mnist's AdamW has it, got {brief(group[key])}")
    for key in ("foreach", "fused", "capturable", "decoupled_weight_decay"):
        if group.get(key) is not None and not isinstance(group.get(key), bool):
            raise ValueError(f"{field}.{key}: must be true, false or null, got {brief(group[key])}")
    extra = [k for k in group if not isinstance(k, str) or not isinstance(group[k], (bool, int, float, str,
                                                                                     type(None), list, tuple))]
    if extra:
        raise ValueError(f"{field}: holds {brief(extra[0])}, which an AdamW group does not")
    return params


def check_optimizer(saved: Any, groups: list[list[torch.Tensor]], field: str = "optimizer") -> None:
    """AdamW's state against the live parameter groups, tensor for tensor (`groups`: parameters, or
    meta tensors of their shapes, in the optimiser's order)."""
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        raise ValueError(f"{field}: must hold exactly state and param_groups")
    saved_groups = saved["param_groups"]
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        raise ValueError(f"{field}.param_groups: must be {len(groups)} groups, as ddpm-mnist builds them")
    like: dict[int, torch.Tensor] = {}
    for g, (group, params) in enumerate(zip(saved_groups, groups, strict=True)):
        indices = check_param_group(group, f"{field}.param_groups[{g}]", len(params))
        like.update(zip(indices, params, strict=True))
    if len(like) != sum(len(params) for params in groups):
        raise ValueError(f"{field}.param_groups: a parameter index is given twice")
    state = saved["state"]
    if not isinstance(state, dict):
        raise ValueError(f"{field}.state: must be a mapping of parameter indices")
    for index, entry in state.items():
        where = f"{field}.state[{brief(index)}]"
        if index not in like or isinstance(index, bool):
            raise ValueError(f"{where}: no parameter has this index")
        if not isinstance(entry, dict) or set(entry) != {"step", *ADAMW_MOMENTS}:
            raise ValueError(f"{where}: must hold exactly step, exp_avg and exp_avg_sq")
        step = check_tensor(entry["step"], f"{where}.step", torch.float32, ())  # AdamW's step count
        if not math.isfinite(float(step)) or float(step) < 0:
            raise ValueError(f"{where}.step: must be finite and >= 0, got {float(step)!r}")
        for moment in ADAMW_MOMENTS:
            tensor = check_tensor(entry[moment], f"{where}.{moment}", like[index].dtype, like[index].shape)
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{where}.{moment}: holds NaN or infinite values")
        if bool((entry["exp_avg_sq"] < 0).any()):
            raise ValueError(f"{where}.exp_avg_sq: holds negative values (a second moment is >= 0)")


def check_lr_scheduler(saved: Any, groups: int, allowed_keys: set[str], field: str = "lr_scheduler") -> None:
    """LambdaLR's state: only its own keys (load_state_dict sets each as an attribute), numbers in range."""
    if not isinstance(saved, dict) or not all(isinstance(k, str) for k in saved):
        raise ValueError(f"{field}: must be a mapping of names")
    unknown = sorted(set(saved) - allowed_keys)
    if unknown:
        raise ValueError(f"{field}: holds {brief(unknown[0])}, which the lr schedule does not have")
    for key in ("base_lrs", "_last_lr"):
        values = saved.get(key)
        if not isinstance(values, list) or len(values) != groups:
            raise ValueError(f"{field}.{key}: must list {groups} learning rates")
        for i, value in enumerate(values):
            _number(value, f"{field}.{key}[{i}]")
    for key, low in (("last_epoch", -1), ("_step_count", 0)):
        value = saved.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 10**12:
            raise ValueError(f"{field}.{key}: must be a whole number >= {low}, got {brief(value)}")
    lambdas = saved.get("lr_lambdas")
    if not isinstance(lambdas, list) or len(lambdas) != groups or any(fn not in (None, {}) for fn in lambdas):
        raise ValueError(f"{field}.lr_lambdas: must be {groups} empty entries (the schedule comes from the config)")
    for key in ("_is_initial", "_get_lr_called_within_step", "verbose"):
        if key in saved and not isinstance(saved[key], bool):
            raise ValueError(f"{field}.{key}: must be true or false, got {brief(saved[key])}")


def check_rng(rngs: Any, field: str = "rng") -> None:
    """One state per process, each a byte tensor of bounded size (torch checks the exact layout)."""
    if not isinstance(rngs, list) or not 1 <= len(rngs) <= 65536:
        raise ValueError(f"{field}: must be a list of one state per process")
    for rank, states in enumerate(rngs):
        if not isinstance(states, dict) or set(states) != {"torch", "cuda", "train"}:
            raise ValueError(f"{field}[{rank}]: must hold exactly torch, cuda and train")
        for key, value in states.items():
            if value is None and key == "cuda":
                continue
            tensor = check_tensor(value, f"{field}[{rank}].{key}", torch.uint8)
            if tensor.dim() != 1 or not 0 < tensor.numel() <= RNG_STATE_MAX_BYTES:
                raise ValueError(f"{field}[{rank}].{key}: not a generator state ({_shape(tensor.shape)} bytes)")

