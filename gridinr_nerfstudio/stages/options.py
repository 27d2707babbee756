"""The options of a method's config as (path, value) pairs, and the rules a value must follow.

A method's config is a tree of dataclasses and dicts (tyro turns every leaf into an `ns-train` option: path
`pipeline.model.field.num_levels` is `--pipeline.model.field.num-levels`). `iter_options` walks that tree;
`stages/option_table.py` gives every leaf a rule (one table, so a new option cannot skip validation: a test walks
the configs and fails on an option without one), and `first_bad_option` applies the table before anything is
written. Rules say what is wrong in words that follow the option's flag: "--x must be at least 1, got 0".
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class Option:
    """One leaf of a config: its dotted path, value, the default of the class that declares it, and its type."""

    path: str
    value: Any
    default: Any
    annotation: Any

    @property
    def flag(self) -> str:
        """The option as ns-train spells it (tyro turns underscores into dashes)."""
        return "--" + self.path.replace("_", "-")


def _field_default(item: dataclasses.Field) -> Any:
    if item.default is not MISSING:
        return item.default
    if item.default_factory is not MISSING:  # type: ignore[misc]
        return item.default_factory()  # type: ignore[misc]
    return MISSING


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _walk(value: Any, path: str, default: Any, annotation: Any) -> Iterator[Option]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        hints = typing.get_type_hints(type(value))
        for item in dataclasses.fields(value):
            if not item.name.startswith("_"):
                yield from _walk(getattr(value, item.name), _join(path, item.name), _field_default(item),
                                 hints.get(item.name, Any))
    elif isinstance(value, Mapping) and any(_is_branch(item) for item in value.values()):  # e.g. optimizer groups
        args = typing.get_args(annotation)
        value_type = args[1] if len(args) == 2 else Any
        defaults = default if isinstance(default, Mapping) else {}
        for key, item in value.items():
            yield from _walk(item, _join(path, str(key)), defaults.get(key, MISSING), value_type)
    else:
        yield Option(path, value, default, annotation)


def _is_branch(value: Any) -> bool:
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)) or isinstance(value, Mapping)


def iter_options(config: Any) -> Iterator[Option]:
    """Every leaf option of a config: dataclasses and dicts of them (optimizer groups) are descended into, a dict of
    plain values (loss weights) is one option; fields named `_...` are not options."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"expected a dataclass config, got {type(config).__name__}")
    return _walk(config, "", MISSING, type(config))


def get_option(config: Any, path: str) -> Any:
    """The value at a dotted path (attributes of dataclasses, keys of dicts)."""
    value = config
    for part in path.split("."):
        value = value[part] if isinstance(value, Mapping) else getattr(value, part)
    return value


def set_option(config: Any, path: str, new_value: Any) -> None:
    """Set the value at a dotted path."""
    *parents, last = path.split(".")
    owner = get_option(config, ".".join(parents)) if parents else config
    if isinstance(owner, dict):
        owner[last] = new_value
    else:
        setattr(owner, last, new_value)


def matches(pattern: str, path: str) -> bool:
    """Dotted paths compared part by part; `*` in a pattern stands for any one part (a dict key)."""
    pattern_parts, path_parts = pattern.split("."), path.split(".")
    return len(pattern_parts) == len(path_parts) and all(p in ("*", q) for p, q in zip(pattern_parts, path_parts))


# --- rules -------------------------------------------------------------------------------------------------------

Problem = Optional[str]
"""What is wrong with a value, in words that follow the option's flag (None: nothing)."""


class Rule:
    """What values an option takes. `problem` returns None for a good value; `config` is the whole config."""

    def problem(self, option: Option, config: Any) -> Problem:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


class AtLeast(Rule):
    def __init__(self, minimum: float, note: str = ""):
        self.minimum, self.note = minimum, note

    def problem(self, option: Option, config: Any) -> Problem:
        if _is_number(option.value) and option.value >= self.minimum:
            return None
        return f"must be at least {self.minimum:g}{self.note}"

    def describe(self) -> str:
        return f">= {self.minimum:g}{self.note}"


class Between(Rule):
    """lower <= value <= upper; `open_low` / `open_high` exclude an end."""

    def __init__(self, lower: float, upper: float, open_low: bool = False, open_high: bool = False, note: str = ""):
        self.lower, self.upper, self.open_low, self.open_high, self.note = lower, upper, open_low, open_high, note

    def problem(self, option: Option, config: Any) -> Problem:
        value = option.value
        if _is_number(value):
            above = value > self.lower if self.open_low else value >= self.lower
            below = value < self.upper if self.open_high else value <= self.upper
            if above and below:
                return None
        return f"must be in {self.describe()}"

    def describe(self) -> str:
        return f"{'(' if self.open_low else '['}{self.lower:g}, {self.upper:g}{')' if self.open_high else ']'}{self.note}"


def Above(lower: float, note: str = "") -> Between:
    """value > lower."""
    return Between(lower, math.inf, open_low=True, open_high=True, note=note)


class Finite(Rule):
    def problem(self, option: Option, config: Any) -> Problem:
        return None if _is_number(option.value) and math.isfinite(option.value) else "must be a finite number"

    def describe(self) -> str:
        return "a finite number"


class OneOf(Rule):
    """One of a fixed list of values; `choices` may be a function (a list known only where it is kept)."""

    def __init__(self, choices: Sequence[Any] | Callable[[], Sequence[Any]]):
        self.choices = choices

    def allowed(self) -> Sequence[Any]:
        return self.choices() if callable(self.choices) else self.choices

    def problem(self, option: Option, config: Any) -> Problem:
        allowed = self.allowed()
        return None if option.value in allowed else f"must be one of {', '.join(map(str, allowed))}"

    def describe(self) -> str:
        return "one of " + ", ".join(map(str, self.allowed()))


class Choice(Rule):
    """One of the values of the option's `Literal[...]` type (tyro checks them on the command line)."""

    def problem(self, option: Option, config: Any) -> Problem:
        allowed = literal_values(option.annotation)
        return None if option.value in allowed else f"must be one of {', '.join(map(str, allowed))}"

    def describe(self) -> str:
        return "one of its Literal values"


def literal_values(annotation: Any) -> Tuple[Any, ...]:
    """The values of a Literal (also inside Optional); () for other types."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return tuple(value for arg in typing.get_args(annotation) for value in literal_values(arg))


class Optional_(Rule):
    """None, or a value that follows `rule`."""

    def __init__(self, rule: Rule):
        self.rule = rule

    def problem(self, option: Option, config: Any) -> Problem:
        return None if option.value is None else self.rule.problem(option, config)

    def describe(self) -> str:
        return f"none or {self.rule.describe()}"


class Each(Rule):
    """Every item of a tuple follows `rule`."""

    def __init__(self, rule: Rule):
        self.rule = rule

    def problem(self, option: Option, config: Any) -> Problem:
        for item in option.value if isinstance(option.value, (tuple, list)) else [option.value]:
            problem = self.rule.problem(dataclasses.replace(option, value=item), config)
            if problem is not None:
                return f"items {problem}"
        return None

    def describe(self) -> str:
        return f"each {self.rule.describe()}"


class Check(Rule):
    """A rule written as a function (value, config) -> problem or None."""

    def __init__(self, check: Callable[[Any, Any], Problem], description: str):
        self.check, self.description = check, description

    def problem(self, option: Option, config: Any) -> Problem:
        return self.check(option.value, config)

    def describe(self) -> str:
        return self.description


class Free(Rule):
    """Any value works (the reason says why); nothing to check."""

    def __init__(self, reason: str):
        self.reason = reason

    def problem(self, option: Option, config: Any) -> Problem:
        return None

    def describe(self) -> str:
        return f"free: {self.reason}"


class CheckedBy(Free):
    """Checked where it is used, before anything is written (the volume, the stage-1 run, a checkpoint)."""

    def describe(self) -> str:
        return f"checked by {self.reason}"


class Unsupported(Rule):
    """An option nerfstudio's base classes declare and our stages do not use: only its default is accepted."""

    def __init__(self, reason: str):
        self.reason = reason

    def problem(self, option: Option, config: Any) -> Problem:
        if option.default is MISSING or _same(option.value, option.default):
            return None
        return f"is not supported by {getattr(config, 'method_name', 'this method')} ({self.reason})"

    def describe(self) -> str:
        return f"unsupported: {self.reason}"


def _same(left: Any, right: Any) -> bool:
    try:
        return bool(left == right)
    except Exception:  # values that do not compare (tensors): count as different
        return False


@dataclass(frozen=True)
class Entry:
    """A table row: the option's rule and what a resumed run does with it (`stages/resume.py`).

    resume: "keep" (the run's value; another one is refused), "change" (may change when a run is resumed: how it
    runs, is watched or saved, not what it learns), "derived" (filled in when the run starts: taken from the run).
    """

    rule: Rule
    resume: str = "keep"


def table_entry(table: Dict[str, Entry], path: str) -> Optional[Entry]:
    """The entry of `path`: its own row, else the first pattern row (`*` parts) that matches it."""
    if path in table:
        return table[path]
    for pattern, entry in table.items():
        if "*" in pattern and matches(pattern, path):
            return entry
    return None


def first_bad_option(config: Any, table: Dict[str, Entry]) -> Optional[str]:
    """The first option whose value breaks its rule, as one line "--flag problem, got value"; None when all pass."""
    for option in iter_options(config):
        entry = table_entry(table, option.path)
        if entry is None:
            continue
        problem = entry.rule.problem(option, config)
        if problem is not None:
            return f"{option.flag} {problem}, got {option.value!r}"
    return None
