"""Build a :class:`CTConfig` from a YAML recipe plus command-line overrides.

Overrides take three spellings, applied left to right after the YAML:
  ``train.train_iters=10``           dotted path
  ``train_iters=10``                 a field name that exists in exactly one section
  ``--train-iters 10``               Megatron-LM style flag (dashes become underscores);
  ``--data-path 0.3 a 0.7 b``        several words after a flag make a list
Values are parsed as YAML scalars (``true``, ``1e-4``, ``null``, ``[1, 2]``). Unknown keys
are errors that name the key and list the section's fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from megatron_ct.config.schema import ConfigError, CTConfig


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(CTConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(CTConfig)}


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _resolve_key(key: str) -> tuple[str, str]:
    """'train.train_iters' or 'train_iters' -> ('train', 'train_iters')."""
    sections = _sections()
    if "." in key:
        section, name = key.split(".", 1)
        if section not in sections:
            raise ConfigError(f"{key}: unknown section {section!r}; expected one of {', '.join(sections)}")
        fields = _field_names(sections[section])
        if name not in fields:
            raise ConfigError(f"{key}: unknown key in section {section!r}; expected one of {', '.join(fields)}")
        return section, name
    owners = [s for s, cls in sections.items() if key in _field_names(cls)]
    if not owners:
        raise ConfigError(f"{key}: unknown configuration key (not a field of any section: {', '.join(sections)})")
    if len(owners) > 1:
        raise ConfigError(f"{key}: ambiguous key, give it as one of {', '.join(o + '.' + key for o in owners)}")
    return owners[0], key


def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads '1e-3' (no dot) as a string
        except ValueError:
            pass
    return value


def parse_overrides(argv: Sequence[str]) -> list[tuple[str, Any]]:
    """Turn CLI words into (key, value) pairs, keeping order."""
    out: list[tuple[str, Any]] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        word = argv[i]
        if word.startswith("--"):
            name = word[2:]
            words = []
            if "=" in name:
                name, value = name.split("=", 1)
                words = [value]
            else:
                # Megatron-LM's multi-value flags: --data-path 0.3 a_document 0.7 b_document
                while i + 1 < len(argv) and not argv[i + 1].startswith("--") and "=" not in argv[i + 1]:
                    i += 1
                    words.append(argv[i])
            if not words:
                parsed = True  # a bare flag: --sequence-parallel
            elif len(words) == 1:
                parsed = _parse_value(words[0])
            else:
                parsed = [_parse_value(w) for w in words]
            out.append((name.replace("-", "_"), parsed))
        elif "=" in word:
            key, value = word.split("=", 1)
            out.append((key, _parse_value(value)))
        else:
            raise ConfigError(f"{word}: expected key=value or --flag value on the command line")
        i += 1
    return out


def _coerce(section: str, name: str, value: Any, annotation: Any) -> Any:
    """Check a value against its field's type; int -> float is allowed."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X] / X | None
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads '3e-4' as a string
        except ValueError:
            pass
    expected = origin or annotation
    if expected is list and isinstance(value, str):
        return [value]  # train.trainable_params=embeddings on the command line
    if expected in (int, float, str, bool, dict, list):
        # bool is an int subclass in Python; reject True for an int field and 1 for a bool one.
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{section}.{name}: expected {expected.__name__}, got {value!r}")
    return value


def build_config(raw: dict[str, dict[str, Any]], source: str = "config") -> CTConfig:
    """Dict of sections -> validated CTConfig. Every key must be known."""
    sections = _sections()
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(sections)}), got {type(raw).__name__}")
    built = {}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section {section!r}; expected one of {', '.join(sections)}")
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {values!r}")
    for section, cls in sections.items():
        values = raw.get(section) or {}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            if name not in hints:
                raise ConfigError(
                    f"{section}.{name}: unknown key in {source}; expected one of {', '.join(_field_names(cls))}"
                )
            kwargs[name] = _coerce(section, name, value, hints[name])
        built[section] = cls(**kwargs)
    return CTConfig(**built)


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> CTConfig:
    """Read a YAML recipe (or start from defaults) and apply CLI overrides."""
    raw: dict[str, dict[str, Any]] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected a YAML recipe") from None
        except OSError as e:
            raise ConfigError(f"{path}: unreadable ({e.strerror}); expected a YAML recipe") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
        source = str(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for key, value in parse_overrides(overrides):
        section, name = _resolve_key(key)
        raw.setdefault(section, {})
        raw[section][name] = value
    return build_config(raw, source)


def config_to_dict(cfg: CTConfig) -> dict[str, Any]:
    """Plain dict (for checkpoints and logs)."""
    return dataclasses.asdict(cfg)
