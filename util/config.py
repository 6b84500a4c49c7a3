"""YAML configuration: `_base_` inheritance, dotted `key=value` overrides, strict keys.

Every key and its default lives in ``config/base.yaml``; it is always the root of the
inheritance chain. A config file may name one or more ``_base_`` files (paths relative to
the file); later files override earlier ones. Command-line overrides are ``a.b.c=value``
with the value parsed as YAML (``train.lr=0.01``, ``eval.seeds=[1,2]``, ``model.sam.depth=2``).

An unknown key or a value of the wrong type is a :class:`ConfigError` naming the key, the
place it came from and the closest valid keys.

    from util.config import load_config
    cfg = load_config("config/pascal/pascal_split0_resnet50.yaml", ["data.shot=5"])
    cfg.data.shot          # 5
    cfg["model"]["sam"]    # sections are dicts with attribute access
"""
from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import re

import yaml

from util.atomic import write_text_atomic

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = PROJECT_ROOT / "config" / "base.yaml"


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (PyYAML follows YAML 1.1, which needs ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


class Config(dict):
    """A dict whose keys can also be read as attributes (``cfg.train.lr``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key '{name}'; keys: {sorted(self)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}


def _to_config(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return Config({k: _to_config(v) for k, v in tree.items()})
    return tree


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            tree = yaml_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(tree).__name__}")
    return tree


def _flat_keys(tree: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        keys.append(prefix + k)
        if isinstance(v, Mapping):
            keys.extend(_flat_keys(v, prefix + k + "."))
    return keys


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_value(key: str, default: Any, value: Any, origin: str) -> Any:
    """Return ``value`` converted to the default's type, or raise ConfigError."""
    if default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    elif isinstance(default, Mapping):
        ok = isinstance(value, Mapping)
    else:  # pragma: no cover - base.yaml only holds YAML scalars, lists and mappings
        ok = type(value) is type(default)
    if not ok:
        raise ConfigError(
            f"config key '{key}' ({origin}) expects {_type_name(default)} "
            f"(default {default!r}), got {_type_name(value)} {value!r}")
    return value


def _unknown_key_error(key: str, schema: Mapping, origin: str) -> ConfigError:
    valid = _flat_keys(schema)
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    leaf = key.rsplit(".", 1)[-1]
    close += [k for k in valid if k.rsplit(".", 1)[-1] == leaf and k not in close][:3]
    hint = f"; closest valid keys: {', '.join(close)}" if close else ""
    return ConfigError(f"unknown config key '{key}' ({origin}){hint}")


def _merge(root: Mapping, schema: Mapping, target: dict, update: Mapping, origin: str,
           prefix: str = "") -> None:
    """Merge ``update`` into ``target`` (same shape as ``schema``), validating every key.

    ``root`` is the whole schema: suggestions for an unknown key are drawn from all of it, so
    a key put in the wrong section (``train.shot``) still points at the right one (``data.shot``).
    """
    for k, v in update.items():
        key = prefix + str(k)
        if k not in schema:
            raise _unknown_key_error(key, root, origin)
        default = schema[k]
        if isinstance(default, Mapping):
            if not isinstance(v, Mapping):
                raise ConfigError(f"config key '{key}' ({origin}) is a section; expected a mapping, "
                                  f"got {_type_name(v)} {v!r}")
            _merge(root, default, target[k], v, origin, key + ".")
        else:
            target[k] = _check_value(key, default, copy.deepcopy(v), origin)


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """Return [(file, tree)] from the most basic ancestor to ``path`` itself."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + (path,))
        raise ConfigError(f"circular _base_ inheritance: {chain}")
    tree = _read_yaml(path)
    bases = tree.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths, got {bases!r}")
    chain: list[tuple[Path, dict]] = []
    for base in bases:
        base_path = (path.parent / base) if not os.path.isabs(base) else Path(base)
        if base_path.resolve() == BASE_CONFIG.resolve():
            continue  # base.yaml is always applied first anyway
        chain.extend(_load_chain(base_path, seen + (path,)))
    chain.append((path, tree))
    return chain


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=1"`` -> ``("a.b", 1)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (for example train.lr=0.01)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML: {err}") from None
    return key, value


def _nest(key: str, value: Any) -> dict:
    tree: Any = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return tree


def load_schema() -> dict:
    schema = _read_yaml(BASE_CONFIG)
    schema.pop("_base_", None)
    return schema


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load ``config/base.yaml``, then ``path`` with its ``_base_`` chain, then ``overrides``."""
    schema = load_schema()
    cfg = copy.deepcopy(schema)
    if path is not None:
        for file, tree in _load_chain(Path(path)):
            _merge(schema, schema, cfg, tree, origin=f"in {file}")
    for text in overrides:
        key, value = parse_override(text)
        _merge(schema, schema, cfg, _nest(key, value), origin=f"command-line override '{text}'")
    return _to_config(cfg)


def save_config(cfg: Mapping, path: str | os.PathLike) -> None:
    """Write the effective configuration as YAML (atomically)."""
    tree = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    write_text_atomic(path, yaml.safe_dump(tree, sort_keys=False, default_flow_style=None))


def resolve_path(value: str, cfg: Mapping | None = None) -> Path:
    """A path from the config: ``{split}``/``{shot}`` filled in, relative paths from the project root."""
    if cfg is not None:
        value = value.format(split=cfg["data"]["split"], shot=cfg["data"]["shot"],
                             dataset=cfg["data"]["dataset"])
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else PROJECT_ROOT / path
