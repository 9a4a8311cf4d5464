"""One config system: dataclasses are the schema, recipes (TOML/YAML/JSON) and dotted CLI flags fill them.

A command's options are the leaf fields of its config dataclass, spelled with dots
(`train.lr`). The same names work in a recipe (`[train] lr = 3e-4`), on the command line
(`--train.lr 3e-4`) and in Python (`cfg.train.lr`). Precedence: dataclass defaults < recipe <
command line. Anything that does not fit raises `ConfigError` with one line that names the key
and, for a typo, the closest valid key. Checks inside a config's `__post_init__` go through
`require`, so every bad value reads "KEY must be WHAT, got VALUE".

Why this is not jsonargparse or tyro (decided in the redesign, issue 15). The command line is
already argparse (stdlib); what is written here is the dataclass <-> dict <-> argparse glue:
- `from_dict`/`coerce`/`merge` are not only the CLI's: ten modules load saved model configs, HF
  config conversions, pipeline step specs, eval task files and adapter configs through them. A
  CLI library would replace only the ~110 lines of `leaves`/`build_parser`/`parse_config`, and
  we would keep both paths.
- Errors: ours are one line, with a "did you mean" over every dotted key, the same for a flag
  and for a recipe key (tests hold this). jsonargparse reports through argparse's usage + error
  lines (for a union, one line per type it tried); tyro prints a multi-line rich panel. Either
  would need its errors caught and rewritten.
- Recipes are TOML first (YAML/JSON too) and a bare RECIPE argument; tyro reads no config files,
  jsonargparse needs a loader registered for TOML and its own `--config` flag.
- `ModelConfig.__config_expand__` fills a named preset before the fields are checked, and a new
  `preset` replaces its whole table on merge; neither library has that hook in its dataclass path.
- Values: "2e9" and 2e9 are accepted for an int field (token budgets), "none" for an Optional,
  comma lists; `--max-new-tokens` and `--max_new_tokens` both work. Keeping these would be more
  code around a library than the code it removes.
Revisit if the glue grows past what it buys (subcommands stay in the `cli.py` table either way).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from lmforge.core.errors import ConfigError, LmforgeError

T = TypeVar("T")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


def option(default: Any = dataclasses.MISSING, help: str = "", *, default_factory: Any = dataclasses.MISSING,
           positional: bool = False) -> Any:
    """A dataclass field with the help text the CLI shows; `positional` makes it a bare CLI argument."""
    meta = {"help": help, "positional": positional}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------
# dict -> dataclass, with type checks


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build `cls` from a nested mapping; unknown keys and wrong types raise `ConfigError`."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a table of options, got {data!r}")
    expand = getattr(cls, "__config_expand__", None)
    if expand is not None:
        data = expand(dict(data), prefix)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(unknown_key_message(prefix + str(key), leaf_keys(cls, prefix)))
        default = _default_of(fields[key])
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, Mapping) and default is not dataclasses.MISSING:
            # A section given in part keeps the field's own default for the rest (which may differ
            # from the section class's defaults).
            value = merge(to_dict(default), value)
        kwargs[key] = coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field was not given
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from None


def _default_of(f: dataclasses.Field) -> Any:
    """The field's default value, or `dataclasses.MISSING` for a required field."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def unknown_key_message(key: str, candidates: Sequence[str]) -> str:
    msg = f"unknown config key '{key}'"
    hint = suggest(key, candidates)
    return msg + (f" (did you mean '{hint}'?)" if hint else "")


def suggest(key: str, candidates: Sequence[str]) -> str | None:
    """Closest valid key: whole dotted name first, then just its last part."""
    key = key.lstrip("-")
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return close[0]
    tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.7)
    return tails[close[0]] if close else None


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting CLI strings; raise a one-line error."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, key + ".")
    if origin in (list, tuple, Sequence, typing.Sequence):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        elem = args[0] if args else Any
        items = [coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if _is_integral(value) else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    return value


def _is_integral(s: str) -> bool:
    try:
        f = float(s)
    except ValueError:
        return False
    return f.is_integer() and any(c in s for c in "eE.")


# ----------------------------------------------------------------------------------------------
# dataclass -> dict, files


def to_dict(obj: Any) -> Any:
    """Plain nested dict (lists for tuples, str for paths) suitable for JSON/TOML."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON recipe into a dict."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"recipe not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: recipe must be .toml, .yaml, .yml or .json")
    except ConfigError:
        raise
    except Exception as e:  # parser errors carry line numbers in their message
        raise ConfigError(f"{path}: cannot parse recipe: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a table of options at the top level")
    return data


def save_config(obj: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(obj), indent=2) + "\n", encoding="utf-8")


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = data.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"'{p}' is an option, not a section (in '{key}')")
        data = nxt
    data[parts[-1]] = value


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: tables merge key by key, anything else in `override` wins. A table that names a
    new `preset` replaces its base table: the preset defines every key the user did not give."""
    if "preset" in override and override.get("preset") != base.get("preset"):
        return dict(override)
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------------------------
# the command line


@dataclasses.dataclass(frozen=True)
class Leaf:
    key: str
    type: Any
    default: Any
    help: str
    positional: bool


def leaves(cls: type, prefix: str = "", instance: Any = None) -> list[Leaf]:
    """Every option of `cls`, nested sections flattened to dotted keys; defaults come from
    `instance` when given (a section's default may differ from its class's defaults)."""
    out = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        default = getattr(instance, f.name) if instance is not None else _default_of(f)
        if dataclasses.is_dataclass(tp):
            out.extend(leaves(tp, f"{prefix}{f.name}.", default if dataclasses.is_dataclass(default) else None))
            continue
        out.append(Leaf(prefix + f.name, tp, default, f.metadata.get("help", ""),
                        bool(f.metadata.get("positional", False))))
    return out


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    return [leaf.key for leaf in leaves(cls, prefix)]


def _metavar(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(map(str, get_args(tp))) + "}"
    if origin in (Union, types.UnionType):
        return "|".join(_metavar(a) for a in get_args(tp) if a is not type(None))
    if origin in (list, tuple):
        return _metavar(get_args(tp)[0]) if get_args(tp) else "ITEM"
    return getattr(tp, "__name__", str(tp)).upper()


def _is_list(tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_is_list(a) for a in get_args(tp))
    return origin in (list, tuple)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self.prog}: {message}")


def build_parser(cls: type, prog: str, description: str = "", recipe: bool = True) -> argparse.ArgumentParser:
    usage = f"{prog} {'[RECIPE] ' if recipe else ''}[--section.key VALUE ...]"
    parser = _Parser(prog=prog, description=description, allow_abbrev=False, usage=usage,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups: dict[str, Any] = {}
    if recipe:
        parser.add_argument("recipe", nargs="?", default=None,
                            help="TOML/YAML/JSON recipe; command-line options override it")
    for leaf in leaves(cls):
        default = "required" if leaf.default is dataclasses.MISSING else json.dumps(to_dict(leaf.default))
        help_text = f"{leaf.help} (default: {default})".strip().replace("%", "%%")
        is_list = _is_list(leaf.type)
        if leaf.positional:
            nargs = ("*" if is_list else "?") if leaf.default is not dataclasses.MISSING else ("+" if is_list else None)
            parser.add_argument(leaf.key, nargs=nargs, default=argparse.SUPPRESS,
                                metavar=leaf.key.upper().replace(".", "_"), help=help_text)
            continue
        kwargs: dict[str, Any] = {"dest": leaf.key, "default": argparse.SUPPRESS, "help": help_text,
                                  "metavar": _metavar(leaf.type)}
        if leaf.type is bool:
            kwargs.update(nargs="?", const="true")
        elif is_list:
            kwargs.update(nargs="+")
        flags = ["--" + leaf.key]
        if "_" in leaf.key:  # --max-new-tokens and --max_new_tokens both work
            flags.append("--" + leaf.key.replace("_", "-"))
        section = leaf.key.rsplit(".", 1)[0] if "." in leaf.key else ""
        if section and section not in groups:
            groups[section] = parser.add_argument_group(f"[{section}]")
        (groups[section] if section else parser).add_argument(*flags, **kwargs)
    parser.add_argument("--print-config", action="store_true", default=False,
                        help="print the resolved config as JSON and exit")
    return parser


def parse_config(cls: type[T], argv: Sequence[str], prog: str, description: str = "",
                 recipe: bool = True) -> tuple[T, bool]:
    """Parse `argv` into `cls`; returns (config, print_config_only)."""
    parser = build_parser(cls, prog, description, recipe)
    ns, unknown = parser.parse_known_args(list(argv))
    if unknown:
        flags = [u for u in unknown if u.startswith("-")]
        if flags:
            bad = flags[0].split("=", 1)[0]
            hint = suggest(bad.lstrip("-").replace("-", "_"), leaf_keys(cls))
            raise ConfigError(f"{prog}: unknown option '{bad}'" + (f" (did you mean '--{hint}'?)" if hint else ""))
        raise ConfigError(f"{prog}: unexpected argument '{unknown[0]}'")
    values = vars(ns)
    data: dict[str, Any] = {}
    if recipe and values.get("recipe"):
        data = load_recipe(values["recipe"])
    for leaf in leaves(cls):
        if leaf.key in values:
            set_dotted(data, leaf.key, values[leaf.key])
    return from_dict(cls, data), bool(values.get("print_config"))


def require(ok: bool, key: str, value: Any, what: str) -> None:
    """The one config check: raise a one-line `ConfigError` naming the key when `ok` is false."""
    if not ok:
        raise ConfigError(f"{key} must be {what}, got {value!r}")
