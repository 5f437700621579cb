"""``posttrain config STAGE``: every key of a stage's config with its default and its one-line doc.

A field's doc is the ``# ...`` comment on its line in the dataclass source, plus the comment lines right
under it (continuations); a section field without one gets its class docstring's first line. Each key is
one line ``dotted.key: value  # doc``, the value written as YAML writes it, so the listing (or any part of
it) is a config file that ``load_config`` reads: a YAML config may write a section's keys dotted.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any

import yaml

from posttrain.algorithms.presets import RL_PRESETS
from posttrain.config import ConfigError, RLConfig, SFTConfig, suggest


def stage_configs() -> dict[str, type]:
    """Stage name → its config class (the preference configs are imported here: they import posttrain.config)."""
    from posttrain.preference_config import DPOConfig, RMConfig

    return {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "rl": RLConfig}


@dataclass
class Key:
    """One line of the listing."""

    name: str  # dotted, e.g. optim.lr
    value: Any  # plain data (tuples as lists)
    doc: str  # the field's comment ('' when it has none)
    kind: str = "key"  # key | section (a header: its keys follow) | unset (a section whose value is None)
    commented: bool = False  # a key of an unset section: listed as a comment


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name → its comment in ``cls``'s own source (inherited fields: see :func:`field_doc`)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line (1-based, in source) → comment text
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    body = ast.parse(source).body[0].body
    docs = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = node.end_lineno
            parts = [comments[line]] if line in comments else []
            while line + 1 in comments and line + 1 not in code_lines:  # continuation lines under the field
                line += 1
                parts.append(comments[line])
            docs[node.target.id] = " ".join(parts)
    return docs


def field_doc(cls: type, name: str) -> str:
    """The doc of field ``name`` of ``cls``, from the class in its MRO that declares it."""
    for base in cls.__mro__:
        if name in base.__dict__.get("__annotations__", {}):
            return field_docs(base).get(name, "")
    return ""


def _section_type(hint: Any) -> type | None:
    """The dataclass a field holds (``TaskConfig | None`` included), or None for a plain value."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return found[0] if found else None
    return None


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def config_keys(cls: type, values: Any = None, prefix: str = "") -> list[Key]:
    """Every key of config class ``cls``, dotted, with its value in ``values`` (an instance) or, when that is
    None, the field's default: the class's own fields in their order, then the inherited ones (RunOptions').
    A section is a header Key followed by its keys; a section whose value is None is an ``unset`` Key
    followed by its keys at their defaults, commented."""
    hints = typing.get_type_hints(cls)
    own = cls.__dict__.get("__annotations__", {})
    out = []
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):  # own fields first, then inherited
        name, value = prefix + f.name, _default(f) if values is None else getattr(values, f.name)
        doc, section = field_doc(cls, f.name), _section_type(hints[f.name])
        if section is None:
            out.append(Key(name, _plain(value), doc))
            continue
        doc = doc or (inspect.getdoc(section) or "").split("\n")[0]
        if value is None:
            out.append(Key(name, None, doc, "unset"))
            out += [dataclasses.replace(k, commented=True) for k in config_keys(section, None, name + ".")]
        else:
            out += [Key(name, None, doc, "section"), *config_keys(section, value, name + ".")]
    return out


def _plain(value: Any) -> Any:
    """A field value as plain data (tuples as lists), as ``to_dict`` writes it."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, list | tuple) else value


def yaml_value(value: Any) -> str:
    """``value`` as YAML writes it on one line (lists and mappings in flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**9)
    return text.removesuffix("\n...\n").strip()  # a lone scalar is written as a document: drop its end marker


def render(keys: list[Key]) -> str:
    """The listing: one ``key: value  # doc`` line per key, each section after a blank line and a
    ``# section: doc`` header; the keys of an unset section (``task: null``) as comments."""
    lines, depth = [], 0
    for key in keys:
        doc = f"  # {key.doc}" if key.doc else ""
        if key.name.count(".") < depth and not key.commented:
            lines.append("")  # back out of a section
        depth = key.name.count(".") + (key.kind == "section")
        if key.kind == "section":
            lines += [""] * (not key.commented) + [f"# {key.name}: {key.doc}" if key.doc else f"# {key.name}"]
        elif key.kind == "unset":
            lines += ["", f"{key.name}: null{doc}"]
        else:
            lines.append(f"{'# ' * key.commented}{key.name}: {yaml_value(key.value)}{doc}")
    text = "\n".join(line for i, line in enumerate(lines) if line or i and lines[i - 1])  # no blank pairs
    return text.strip("\n") + "\n"


def listing(stage: str, preset: str | None = None) -> str:
    """``posttrain config STAGE [--preset NAME]``: a header comment, then every key (:func:`render`). RL
    without a preset shows null on the fields the ``algorithm`` preset fills; with one, the values it
    resolves to. ConfigError on an unknown stage or preset (naming the closest valid one)."""
    configs = stage_configs()
    if stage not in configs:
        raise ConfigError(f"unknown stage '{stage}'{suggest(stage, list(configs))}")
    values = None
    if preset is not None:
        if stage != "rl":
            raise ConfigError(f"--preset is for rl (its algorithm presets: {', '.join(RL_PRESETS)}); {stage} has none")
        if preset not in RL_PRESETS:
            raise ConfigError(f"unknown preset '{preset}'{suggest(preset, list(RL_PRESETS))}")
        values = RLConfig(algorithm=preset)
    head = [f"# posttrain {stage}: every config key, its default and its doc. Valid YAML: save it (or a part) as a",
            f"# config file and edit; on the command line a key is an override: posttrain {stage} - key=value"]
    if stage == "rl":
        head.append(f"# the values of algorithm preset {preset}" if preset else
                    "# null: the algorithm preset's value (posttrain config rl --preset NAME shows them)")
    return "\n".join(head) + "\n" + render(config_keys(configs[stage], values))
