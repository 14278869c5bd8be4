"""YAML in and out: the strict loader configs are read with, the dumper they are written with, and
bounded descriptions of values for error messages."""

from __future__ import annotations

import dataclasses
import re
import reprlib
from typing import Any

import yaml

from ddpm_mnist.config.schema import SECTIONS, Config, to_dict
from ddpm_mnist.errors import ConfigError

MAX_DEPTH = 8  # a config is sections of keys holding at most a list: anything deeper is not a config


class _Loader(yaml.SafeLoader):
    """SafeLoader for configs: `1e-4` is a float, dates stay strings, and aliases, duplicate keys
    and deep nesting are refused (a config needs none of them; an alias bomb needs all three)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor}) are not allowed in a config", event.start_mark
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {describe_value(key)} (lines {seen[key]} and {line})",
                    key_node.start_mark,
                )
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads 2001-12-01 as a date: configs have no dates, and a run named like one is a string
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text with the config loader; any failure becomes one ConfigError line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    except (ValueError, OverflowError) as exc:  # `!!float abc`, an integer of 5000 digits
        raise ConfigError(f"{source}: not a value a config can hold: {first_line(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deep to be a config") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return describe_text(text.splitlines()[0] if text else type(exc).__name__)


_SHORT = reprlib.Repr()  # keyword arguments need Python 3.12
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 2, 4, 4, 50, 40, 50


def describe_value(value: Any) -> str:
    """A short repr for error messages: bounded in length and depth, whatever the value."""
    return _SHORT.repr(value)


def describe_text(text: str) -> str:
    """Text for an error message: unprintable characters escaped, at most 120 characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:200])
    return text if len(text) <= 120 else text[:117] + "..."


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for short lists such as channel_mult: [1, 2, 2]."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_Dumper.add_representer(list, _represent_list)


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML that `load_config` reads back to an equal Config."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def reference_rows() -> list[tuple[str, str, str]]:
    """(key, default, meaning) for every field, for the README and `ddpm config --help`."""
    rows = []
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            for g in dataclasses.fields(SECTIONS[f.name]):
                default = g.default_factory() if callable(g.default_factory) else g.default  # type: ignore[misc]
                rows.append((f"{f.name}.{g.name}", _yaml_scalar(default), g.metadata["help"]))
        else:
            rows.append((f.name, _yaml_scalar(f.default), f.metadata["help"]))
    return rows


def _yaml_scalar(value: Any) -> str:
    """A default as it is written in YAML: true, 0.0001, [1, 2, 2], linear."""
    return yaml.dump(value, Dumper=_Dumper, default_flow_style=True).removesuffix("\n...\n").strip()
