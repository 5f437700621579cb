"""Reward functions by name: a built-in, a module path ``pkg.mod:fn`` or a file path ``path/to/file.py:fn``.

A spec with a ':' is ``WHERE:ATTR``. WHERE is a file when it ends in ``.py`` or holds a path separator
(relative to the working directory, or absolute); it is loaded once as a module of its own. Otherwise
WHERE is a module, imported with the working directory importable (appended to ``sys.path``, so an
installed module of the same name comes first): ``my_rewards:fn`` finds ``./my_rewards.py`` without
``PYTHONPATH=.``. ATTR may be dotted (``mod:Class.method``). Whatever cannot be loaded, or is not
callable, is a one-line ConfigError; :func:`check_reward_specs` runs these checks before a model loads.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from posttrain.config_checks import ConfigError, suggest
from posttrain.rewards.calls import describe
from posttrain.rewards.library import REWARDS

TRAINER_SOURCES = ("task", "reward_model")  # names the RL trainer builds itself (rollout.Scorer)
FILE_MODULES = "posttrain_user_rewards_"  # prefix of the module name a reward file is loaded as


API_PREFIX = "api:"  # how config.rewards names a reward function the Python API was given as an object


def load_reward(spec: str | Callable) -> Callable[..., list[float | None]]:
    """A reward function: a built-in name (REWARDS), ``pkg.mod:fn``, ``path/to/file.py:fn`` (see the module
    doc), or a callable (returned as is). ConfigError (a ValueError) naming the spec if it cannot be had."""
    if callable(spec):
        return spec
    if spec in REWARDS:
        return REWARDS[spec]
    if spec.startswith(API_PREFIX):
        raise ConfigError(f"reward '{spec}' was a function object given to the Python API (posttrain.GRPOTrainer): "
                          "run it from Python again with the same reward_funcs")
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ConfigError(f"unknown reward '{spec}'{suggest(spec, list(REWARDS))}; a function of your own is "
                          "'package.module:function' or 'path/to/file.py:function'")
    fn = load_object(spec, "reward")
    if not callable(fn):
        raise ConfigError(f"reward '{spec}' is not a function (it is a {type(fn).__name__})")
    return fn


def load_object(spec: str, what: str) -> object:
    """What ``pkg.mod:name`` or ``path/to/file.py:name`` (``name`` may be dotted: ``Class.method``) names, the
    working directory importable; ConfigError "cannot load <what> '<spec>': ..." when it cannot be had."""
    where, _, attr = spec.rpartition(":")
    module = _file_module(spec, where, what) if _is_file(where) else _module(spec, where, what)
    found: object = module
    for part in attr.split("."):
        if not hasattr(found, part):
            raise ConfigError(f"cannot load {what} '{spec}': {where} has no '{attr}'")
        found = getattr(found, part)
    return found


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def _module(spec: str, name: str, what: str):
    """Module ``name``, the working directory importable."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name or name.startswith(f"{exc.name}."):  # the module itself (or its package) is missing
            raise ConfigError(f"cannot load {what} '{spec}': no module named '{exc.name}' (looked in the working "
                              f"directory {cwd} and sys.path)") from None
        raise ConfigError(f"cannot load {what} '{spec}': importing {name} failed: {describe(exc)}") from None
    except Exception as exc:  # the module's own code failed
        raise ConfigError(f"cannot load {what} '{spec}': importing {name} failed: {describe(exc)}") from None


def _file_module(spec: str, where: str, what: str):
    """The Python file ``where`` as a module, loaded once per resolved path."""
    path = Path(where).expanduser()
    full = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if not full.is_file():
        raise ConfigError(f"cannot load {what} '{spec}': no file {full}" + (
            f" ({where} is relative to the working directory {Path.cwd()})" if not path.is_absolute() else ""))
    name = f"{FILE_MODULES}{full.stem}_{hashlib.sha1(str(full).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before running it, as import does (dataclasses, pickling look it up)
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:  # SystemExit in a user file is a config error too
        del sys.modules[name]
        raise ConfigError(f"cannot load {what} '{spec}': running {full} failed: {describe(exc)}") from None
    return module


def spec_of(reward: str | Callable) -> str | None:
    """A spec that loads ``reward`` in another process (a reward worker), or None when there is none: a spec
    as it is; a callable by the built-in name it is registered under, or as ``module:qualname``
    (``file.py:qualname`` for a reward file) when it is what that spec loads here: a module-level function
    or class of an importable module. Lambdas, closures, instances and ``__main__``'s functions have none. A
    relative file path is made absolute (a worker may start after the working directory changed)."""
    if isinstance(reward, str):
        where, sep, attr = reward.rpartition(":")
        return f"{Path(where).expanduser().resolve()}:{attr}" if sep and _is_file(where) else reward
    for name, fn in REWARDS.items():
        if fn is reward:
            return name
    module, qualname = getattr(reward, "__module__", None), getattr(reward, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__" or module not in sys.modules:
        return None
    where = getattr(sys.modules[module], "__file__", None) if module.startswith(FILE_MODULES) else module
    try:
        return f"{where}:{qualname}" if where and load_reward(f"{where}:{qualname}") is reward else None
    except ConfigError:
        return None


def reward_name(spec: str | Callable) -> str:
    """The name in metrics: a built-in's name, the function part of "where:function", or __name__."""
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__)
    return spec.rpartition(":")[2]


def check_reward_specs(specs: Iterable[str]) -> None:
    """Load every reward spec of a config (``rewards``' keys) but the trainer's own sources (``task``,
    ``reward_model``): ConfigError on the first that cannot be loaded. Run before any model loads."""
    for spec in specs:
        if spec not in TRAINER_SOURCES:
            try:
                load_reward(spec)
            except ConfigError as err:
                raise ConfigError(f"config key 'rewards': {err}") from None
