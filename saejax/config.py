"""Typed, frozen, validated configuration.

Experiments are written as ``ml_collections.ConfigDict`` files (``experiments/*.py``
with a ``get_config()``); absl flags override any field (``--config.corpus.seq_len=256``).
Library code never sees a ConfigDict: launch scripts call :func:`from_config` once, at
the edge, to build the frozen dataclasses below, and every dataclass validates itself in
``__post_init__`` with errors that name the field, the bad value and what is allowed.

Later modules add their own config dataclasses next to the code that uses them and reuse
the ``check_*`` helpers here, so that every error reads the same way.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and what is allowed."""


def _fail(name: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"config field {name!r} = {value!r} is invalid: {allowed}")


def check(name: str, value: Any, ok: bool, allowed: str) -> None:
    """Raises :class:`ConfigError` naming ``name`` and ``value`` unless ``ok``."""
    if not ok:
        _fail(name, value, allowed)


def check_positive(name: str, value: int | float) -> None:
    check(name, value, isinstance(value, (int, float)) and value > 0, "must be > 0")


def check_nonnegative(name: str, value: int | float) -> None:
    check(name, value, isinstance(value, (int, float)) and value >= 0, "must be >= 0")


def check_fraction(name: str, value: float, *, closed: bool = False) -> None:
    ok = isinstance(value, (int, float)) and (0 <= value <= 1 if closed else 0 <= value < 1)
    check(name, value, ok, "must be in [0, 1]" if closed else "must be in [0, 1)")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    check(name, value, value in choices, f"must be one of {list(choices)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _display(name: str) -> str:
    """A field's name as messages show it: the root's "config." prefix dropped."""
    return name[len("config."):] if name.startswith("config.") else name


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Converts a ConfigDict leaf to the annotated type, or raises ConfigError.

    ``name`` is the dotted path from the root ("config.source.kind"); messages name the
    field as the dataclasses' own checks do ("source.kind").
    """
    field = _display(name)
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(name, value, arg)
            except ConfigError:
                pass
        _fail(field, value, f"must be {' or '.join(_type_name(a) for a in args)}")
    if origin is Literal:
        check_choice(field, value, get_args(tp))
        return value
    if origin in (tuple, Sequence, list):
        check(field, value, isinstance(value, (list, tuple)), "must be a sequence")
        args = get_args(tp)
        item = args[0] if args else Any
        return tuple(_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_config(tp, value, prefix=name)
    if tp is bool:
        check(field, value, isinstance(value, bool), "must be a bool (true/false)")
        return value
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        check(field, value, ok, "must be an integer")
        return value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        check(field, value, ok, "must be a number")
        return float(value)
    if tp is str:
        check(field, value, isinstance(value, str), "must be a string")
        return value
    return value


def from_config(cls: type[T], config: Mapping[str, Any] | Any, *, prefix: str = "config") -> T:
    """Builds the frozen dataclass ``cls`` from a ConfigDict (or any mapping).

    Nested dataclass fields are built recursively; missing keys take the dataclass
    defaults; unknown keys are an error (a typo must never be silently ignored).

    Args:
      cls: a dataclass type.
      config: a ``ConfigDict``, ``FrozenConfigDict`` or plain mapping.
      prefix: the dotted name used in error messages.

    Returns:
      An instance of ``cls``, already validated by its ``__post_init__``.
    """
    if dataclasses.is_dataclass(config) and isinstance(config, cls):
        return config
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        _fail(prefix, config, f"must be a section with the fields of {cls.__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {[f'{prefix}.{k}' for k in unknown]}; "
            f"{cls.__name__} accepts {sorted(fields)}"
        )
    kwargs = {}
    for key, value in config.items():
        kwargs[key] = _coerce(f"{prefix}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix}: {e}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a (nested) config dataclass, for metadata records."""
    return dataclasses.asdict(obj)


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = ""
                ) -> list[tuple[str, Any, Any]]:
    """The fields (dotted names) whose values differ between two config dicts, as
    ``(field, old, new)``; tuples and lists compare equal (a JSON round trip makes one the
    other). A field missing on one side is ``None`` there."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        name = f"{prefix}{k}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_diff(a, b, prefix=name + ".")
        elif _plain(a) != _plain(b):
            out.append((name, _plain(a), _plain(b)))
    return out


def check_resume(diffs: list[tuple[str, Any, Any]], allowed: Sequence[str], where: str) -> None:
    """Raises ConfigError listing the changed fields that ``allowed`` does not name.

    An entry of ``allowed`` names a field ("num_steps") or a whole section ("eval").
    """
    def ok(field: str) -> bool:
        return any(field == a or field.startswith(a + ".") for a in allowed)

    bad = [d for d in diffs if not ok(d[0])]
    if bad:
        shown = "; ".join(f"{f}: {a!r} -> {b!r}" for f, a, b in bad)
        names = ",".join(f for f, _, _ in bad)
        raise ConfigError(f"{where} was trained with another config ({shown}); resuming it would "
                          f"silently change the experiment: use the saved values, a new workdir, "
                          f"or allow the change with --allow_changes={names}")


def resume_changes(saved: Mapping[str, Any], new: Mapping[str, Any], step: int,
                   allowed: Sequence[str], where: str) -> list[dict[str, Any]]:
    """The config changes of a resume at ``step`` from ``saved`` to ``new`` (config dicts
    with a top-level ``num_steps``), as ``{"step", "field", "old", "new"}`` records.

    Raises:
      ConfigError: ``num_steps`` below ``step``, or a changed field ``allowed`` does not name.
    """
    if new["num_steps"] < step:
        raise ConfigError(f"config field 'num_steps' = {new['num_steps']} is invalid: {where} "
                          f"is at step {step} already; raise num_steps to continue it "
                          f"(--allow_changes=num_steps) or use a new workdir")
    diffs = config_diff(saved, new)
    check_resume(diffs, allowed, where)
    return [{"step": step, "field": f, "old": a, "new": b} for f, a, b in diffs]


def replace(obj: T, **changes: Any) -> T:
    """``dataclasses.replace`` that re-validates."""
    return dataclasses.replace(obj, **changes)


# --------------------------------------------------------------------------------------
# Configs owned by the foundation (mesh, multi-host). The tokenizer, corpus and loader
# configs live beside their code in saejax.data.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape over axes ("data", "model"); -1 fills the remaining devices."""

    data: int = -1
    model: int = 1

    def __post_init__(self):
        for name in ("data", "model"):
            v = getattr(self, name)
            check(f"mesh.{name}", v, v == -1 or v >= 1, "must be >= 1, or -1 to fill the rest")
        check("mesh", (self.data, self.model), not (self.data == -1 and self.model == -1),
              "at most one of mesh.data and mesh.model may be -1")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host initialisation (``jax.distributed.initialize``).

    Attributes:
      enabled: call ``jax.distributed.initialize`` (off: one process).
      coordinator_address, num_processes, process_id: as jax's; None = auto-detect
        (TPU VM, SLURM, Open MPI).
      heartbeat_timeout_s: a process that has not been heard from for this long is
        declared dead and every other process stops with an error (jax's default 100 s).
    """

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = 100

    def __post_init__(self):
        check_positive("distributed.heartbeat_timeout_s", self.heartbeat_timeout_s)
        if self.num_processes is not None:
            check_positive("distributed.num_processes", self.num_processes)
        if self.process_id is not None:
            check_nonnegative("distributed.process_id", self.process_id)
            if self.num_processes is not None:
                check("distributed.process_id", self.process_id,
                      self.process_id < self.num_processes,
                      f"must be < distributed.num_processes ({self.num_processes})")
