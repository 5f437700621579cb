"""Config files and overrides: YAML into the typed config dataclasses (posttrain/config.py), dotted keys,
``key=value`` overrides, and back to plain data.

``load_config(SFTConfig, "configs/demo_sft.yaml", ["optim.lr=1e-3", "steps=50"])`` reads the YAML (its keys
may be dotted too: ``optim.lr: 1e-3``), applies ``key=value`` overrides (values parsed as YAML scalars), and
builds the nested dataclasses, each checked by its ``__post_init__``. A key that does not exist is an error
that names the key and the closest valid one. A section given a single value sets its first field:
``model=runs/sft/checkpoints/final`` is ``model.path=...`` and ``task=gsm8k`` is ``task.name=gsm8k``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from posttrain.config_checks import ConfigError, suggest

T = TypeVar("T")


# Keys that were renamed: (section class, old key) → what to write now.
RENAMED = {("RLConfig", "micro_batch"): "max_tokens_per_micro_batch, a budget of tokens, not rows"}

# A section given a scalar (``model=runs/x``, ``task: gsm8k``) sets the section's first field; while
# overrides are merged the scalar waits under this key.
_SHORTHAND = "<first field>"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        if key in node and not isinstance(node[key], dict):
            node[key] = {_SHORTHAND: node[key]}
        node = node.setdefault(key, {})
    if isinstance(node.get(leaf), dict) and not isinstance(value, dict):
        node[leaf][_SHORTHAND] = value  # `model=x` after a YAML `model: {...}` keeps the other fields
    else:
        node[leaf] = value


def expand_dotted(data: Any) -> Any:
    """A YAML mapping whose keys may be dotted (``optim.lr: 1e-3``, as ``posttrain config`` lists them), with
    those keys nested; a section written ``task: null`` with dotted keys under it is what those keys set."""
    if not isinstance(data, dict):
        return data
    dotted = [k for k in data if isinstance(k, str) and "." in k]
    sections = {k.split(".")[0] for k in dotted}  # a null one among them is what its dotted keys set
    out = {k: v for k, v in data.items() if k not in dotted and (v is not None or k not in sections)}
    for key in dotted:
        _set_dotted(out, key, data[key])
    return out


def _build(cls: type[T], data: Any, where: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    first = next(iter(fields))
    if not isinstance(data, dict):
        if isinstance(data, list):
            raise ConfigError(f"'{where or 'config'}' must be a mapping, got {type(data).__name__}")
        data = {first: data}
    if _SHORTHAND in data:
        data = {**data, first: data[_SHORTHAND]}
        del data[_SHORTHAND]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            renamed = RENAMED.get((cls.__name__, key))
            hint = f" (it is now '{renamed}')" if renamed else suggest(key, list(fields))
            raise ConfigError(f"unknown config key '{path}'{hint}")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # a section checked by its own module (sampling, gpt, monitor)
        message = str(err)
        if not message.startswith("config key"):
            message = f"config section '{where or cls.__name__}': {message}"
        raise ConfigError(message) from None


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # before the check below: an optional section takes `task=x`
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, path)
    if isinstance(value, dict) and _SHORTHAND in value:
        raise ConfigError(f"override '{path}.{next(k for k in value if k != _SHORTHAND)}': '{path}' is not a section")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a mapping (e.g. {{name: 1.0}}), got {value!r}")
        return {_coerce(args[0], k, path): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if origin is tuple:
        items = value if isinstance(value, list | tuple) else [value]
        if len(args) == 2 and args[1] is Ellipsis or not args:
            return tuple(_coerce(args[0] if args else Any, v, path) for v in items)
        if len(items) != len(args):
            raise ConfigError(f"config key '{path}' needs {len(args)} values, got {list(items)!r}")
        return tuple(_coerce(a, v, path) for a, v in zip(args, items, strict=True))
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-3 as a string
        except ValueError:
            pass
    if hint is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # e.g. run_dir=2024
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
            raise ConfigError(f"config key '{path}' must be {hint.__name__}, got {value!r}")
    return value


def build_config(cls: type[T], data: dict) -> T:
    """``cls`` from a nested dict of its fields (what a YAML file holds), checked as ``load_config`` checks."""
    return _build(cls, data, "")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build ``cls`` from a YAML file (optional) and ``key=value`` overrides (dotted keys)."""
    data: dict = {}
    if path is not None:
        try:
            data = expand_dotted(yaml.safe_load(Path(path).read_text()) or {})
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value (e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), _override_value(cls, key.strip(), raw))
    return _build(cls, data, "")


def _override_value(cls: type, dotted: str, raw: str) -> Any:
    """An override's value: YAML's reading of ``raw``, except that a str field keeps the text as written when
    YAML reads something else (a prompt template ``Q: {question}`` is not a mapping), or cannot read it."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        if _text_key(cls, dotted):
            return raw
        raise ConfigError(f"override '{dotted}': not a valid YAML value: {raw!r}") from None
    return raw if value is not None and not isinstance(value, str) and _text_key(cls, dotted) else value


def _text_key(cls: type, dotted: str) -> bool:
    """Whether ``dotted`` names a str (or optional str) field of ``cls``."""
    hint: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(hint):
            return False
        hint = typing.get_type_hints(hint).get(part)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = args[0] if len(args) == 1 else None
    return hint is str


def to_dict(config: Any) -> dict:
    """The config as plain data (tuples as lists), ready for YAML."""
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
