"""Loading a config: coercion of each value to its field, files, `--set` overrides, sample-time requests."""

from __future__ import annotations

import dataclasses
import difflib
import math
import stat
import typing
from pathlib import Path
from typing import Any

from ddpm_mnist.config.rules import validate
from ddpm_mnist.config.schema import MOVED_KEYS, SECTIONS, Config, SampleConfig, SampleRequest, to_dict
from ddpm_mnist.config.yaml_io import describe_text, describe_value, first_line, parse_yaml
from ddpm_mnist.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # a whole config is about 2 KB


def _check_range(value: float, key: str, meta: dict, source: str, shown: Any = None) -> None:
    """Check value against the field's bounds; the message shows `shown` (the value as written) if given."""
    bounds = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
    for name, sign in bounds:
        bound = meta[name]
        if bound is None:
            continue
        ok = {"ge": value >= bound, "gt": value > bound, "le": value <= bound, "lt": value < bound}
        if not ok[name]:
            written = value if shown is None else shown
            raise ConfigError(f"{source}: {key}: must be {sign} {bound:g}, got {describe_value(written)}")


def _coerce_number(value: Any, kind: type, key: str, meta: dict, source: str) -> Any:
    """An int field, or a float field (which also takes an int), range-checked."""
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: must be an integer, got {describe_value(value)}")
        _check_range(value, key, meta, source)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{source}: {key}: must be a number, got {describe_value(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{source}: {key}: must be a finite number, got {describe_value(value)}")
    _check_range(number, key, meta, source, shown=value)
    return number


def _coerce_string(value: Any, key: str, meta: dict, source: str) -> str:
    if isinstance(value, bool):
        raise ConfigError(
            f"{source}: {key}: must be a string, got {describe_value(value)} "
            "(YAML reads unquoted yes/no/on/off as booleans; quote the value)"
        )
    if not isinstance(value, str) or not (value or meta.get("empty_ok")):
        raise ConfigError(f"{source}: {key}: must be {meta.get('expected') or 'a non-empty string'}, "
                          f"got {describe_value(value)}")
    if "\x00" in value:
        raise ConfigError(f"{source}: {key}: must not contain a NUL character, got {describe_value(value)}")
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{source}: {key}: must be one of {', '.join(meta['choices'])}; got {describe_value(value)}")
    return value


def _coerce(value: Any, kind: Any, key: str, meta: dict, source: str) -> Any:
    """Check one value against its field type and range; return it (never silently changed)."""
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: must be true or false, got {describe_value(value)}")
        return value
    if kind == bool | str:  # a switch that also takes a word, such as "auto"
        if isinstance(value, bool) or value in meta["choices"]:
            return value
        raise ConfigError(f"{source}: {key}: must be true, false or {' or '.join(meta['choices'])}, "
                          f"got {describe_value(value)}")
    if kind in (int, float):
        return _coerce_number(value, kind, key, meta, source)
    if kind is str:
        return _coerce_string(value, key, meta, source)
    if typing.get_origin(kind) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: must be a list of integers, got {describe_value(value)}")
        return [_coerce(item, int, f"{key}[{i}]", meta, source) for i, item in enumerate(value)]
    raise TypeError(f"unsupported config field type {kind!r}")  # a bug in this module, not input


def _unknown_key(key: str, allowed: list[str], prefix: str, source: str) -> ConfigError:
    moved = MOVED_KEYS.get(f"{prefix}{key}")
    if moved:
        return ConfigError(
            f"{source}: {prefix}{key}: moved to {moved} (it applies to every command, not only training); "
            f"rename it"
        )
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"did you mean {prefix}{close[0]}? " if close else ""
    return ConfigError(f"{source}: {prefix}{describe_text(key)}: unknown key; {hint}allowed: {', '.join(allowed)}")


def _build_section(cls: type, values: Any, section: str, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {section}: must be a mapping of keys, got {describe_value(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in fields:
            shown = describe_value(key) if not isinstance(key, str) else key
            raise _unknown_key(shown, list(fields), f"{section}.", source)
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", fields[key].metadata, source)
    return cls(**kwargs)


def config_from_dict(raw: Any, source: str, *, check: bool = True) -> Config:
    """Build a Config from a parsed YAML mapping; `source` names it in errors.

    Every key's type and range is always checked; `check=False` skips only the checks that
    involve several keys (for `load_config`, which runs them after the overrides).
    """
    if raw is None:
        raise ConfigError(f"{source}: file is empty; a config is a YAML mapping of sections")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a YAML mapping of sections, got {describe_value(raw)}")
    hints = typing.get_type_hints(Config)
    top = {f.name: f for f in dataclasses.fields(Config)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in top:
            raise _unknown_key(describe_value(key) if not isinstance(key, str) else key, list(top), "", source)
        if key in SECTIONS:
            kwargs[key] = _build_section(SECTIONS[key], value, key, source)
        else:
            kwargs[key] = _coerce(value, hints[key], key, top[key].metadata, source)
    cfg = Config(**kwargs)
    if check:
        validate(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None, notes: list[str] | None = None) -> Config:
    """Read a YAML config file, apply `section.key=value` overrides, validate everything (`notes`:
    see `apply_overrides`)."""
    path = Path(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{path}: is a folder, not a config file")
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block, /dev/zero would never end
            raise ConfigError(f"{path}: not a regular file (a pipe, socket or device); give a config file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {info.st_size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {first_line(exc)}") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"{path}: file is empty; a config is a YAML mapping of sections")
    cfg = config_from_dict(raw, str(path), check=False)
    if overrides:
        return apply_overrides(cfg, overrides, str(path), notes=notes)
    validate(cfg, str(path))
    return cfg


def _override_target(key: str, where: str) -> tuple[Any, dict, str, str | None]:
    """The type, the field's metadata, and (section, name) of a `--set` key."""
    parts = key.split(".")
    if not all(parts) or len(parts) > 2:
        raise ConfigError(f"{where}: expected key=value or section.key=value, e.g. train.lr=1e-4")
    if len(parts) == 1:
        top = {f.name: f for f in dataclasses.fields(Config) if f.name not in SECTIONS}
        if parts[0] not in top:
            raise _unknown_key(parts[0], list(top), "", where)
        return typing.get_type_hints(Config)[parts[0]], top[parts[0]].metadata, parts[0], None
    section, name = parts
    if section not in SECTIONS:
        raise _unknown_key(section, list(SECTIONS), "", where)
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    if name not in fields:
        raise _unknown_key(name, list(fields), f"{section}.", where)
    return typing.get_type_hints(SECTIONS[section])[name], fields[name].metadata, name, section


def apply_overrides(
    cfg: Config, overrides: list[str], source: str = "config", *, allowed: tuple[str, ...] | None = None,
    notes: list[str] | None = None, check: bool = True,
) -> Config:
    """Apply `--set key=value` strings (value parsed as YAML, checked like the file) and re-validate.

    Each override is checked on its own (so the error names it); checks that involve several
    keys run once all overrides are in, so `beta_start` and `beta_end` can be moved together.
    `allowed` limits the keys (prefixes such as "sample."): at sample time the trained model's
    keys are not the user's to change. A run length given here (train.steps, train.epochs or
    train.time_budget) replaces the one the file gives, and `notes` hears of it. `check=False`
    leaves the checks between keys to the caller (sampling runs them once the flags are in too).
    """
    raw = to_dict(cfg)
    given = set()
    for item in overrides:
        where = f"--set {describe_text(item)}"
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"{where}: expected key=value or section.key=value, e.g. train.lr=1e-4")
        hint, meta, name, section = _override_target(key, where)
        if allowed is not None and not any(key == p or (p.endswith(".") and key.startswith(p)) for p in allowed):
            raise ConfigError(
                f"{where}: {key} belongs to the trained model and cannot change at sample time; "
                f"only {', '.join(p + '*' if p.endswith('.') else p for p in allowed)} can"
            )
        target = raw if section is None else raw[section]
        target[name] = _coerce(parse_yaml(text, where), hint, key, meta, where)
        given.add(key)
    replaced = _replace_length(raw["train"], given)
    if replaced and notes is not None:
        notes.append(replaced)
    return config_from_dict(raw, f"{source} with --set", check=check)


LENGTH_KEYS = {"steps": 0, "epochs": 0, "time_budget": ""}  # a run's length, and each one's "off"


def _replace_length(train: dict[str, Any], given: set[str]) -> str:
    """Where `--set` gave a run length, turn off the lengths of the file it did not give; say which."""
    chosen = [key for key in LENGTH_KEYS if f"train.{key}" in given and train[key] != LENGTH_KEYS[key]]
    if not chosen:
        return ""
    dropped = [f"train.{key}: {train[key]}" for key in LENGTH_KEYS
               if f"train.{key}" not in given and train[key] != LENGTH_KEYS[key]]
    if not dropped:
        return ""
    for key in LENGTH_KEYS:
        if f"train.{key}" not in given:
            train[key] = LENGTH_KEYS[key]
    return f"--set train.{chosen[0]}={train[chosen[0]]} replaces the config's {', '.join(dropped)}"


def with_sample_options(cfg: Config, request: SampleRequest) -> Config:
    """The config with a request's sample-time settings (None: keep the config's value), validated."""
    raw = to_dict(cfg)
    fields = {f.name: f for f in dataclasses.fields(SampleConfig)}
    for key, value in request.given().items():
        if key == "seed":
            raw["seed"] = _coerce(value, int, "seed", {f.name: f for f in dataclasses.fields(Config)}["seed"].metadata,
                                  "--seed")
            continue
        value = list(value) if isinstance(value, tuple) else value
        raw["sample"][key] = _coerce(value, typing.get_type_hints(SampleConfig)[key], f"sample.{key}",
                                     fields[key].metadata, f"--{key.replace('_', '-')}")
    return config_from_dict(raw, "the sample options")
