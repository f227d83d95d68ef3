"""Dataclass configs with `key=value` command-line overrides, and the error handling every CLI here shares."""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import types
import typing
from typing import Any, Callable, Sequence, TypeVar

from jaxsae import hostmem

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in the class source, used as help text."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    docs = {}
    for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, flags=re.M):
        docs[m.group(1)] = m.group(2).strip()
    return docs


def _coerce(name: str, raw: str, typ: Any) -> Any:
    """Parse a command-line string into the field's declared type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        return _coerce(name, raw, non_none[0])
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config field {name!r}: expected a boolean, got {raw!r}")
    if typ in (int, float, str):
        try:
            return typ(float(raw)) if typ is int and re.fullmatch(r"\d+e\d+", raw) else typ(raw)
        except ValueError:
            raise ValueError(f"config field {name!r}: expected {typ.__name__}, got {raw!r}") from None
    if origin in (tuple, list):
        items = json.loads(raw) if raw.strip().startswith("[") else [s for s in raw.split(",") if s]
        inner = args[0] if args else str
        return origin(_coerce(name, str(i), inner) for i in items)
    return json.loads(raw)


def override(cfg: T, overrides: Sequence[str]) -> T:
    """Return a copy of the dataclass `cfg` with `key=value` strings applied; unknown keys are errors."""
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        if key not in names:
            raise ValueError(f"unknown config field {key!r} for {type(cfg).__name__}; known: {sorted(names)}")
        changes[key] = _coerce(key, raw, hints[key])
    return dataclasses.replace(cfg, **changes)


def split_argv(argv: Sequence[str], cfgs: Sequence[Any]) -> list[list[str]]:
    """Send each key=value to the first of several config dataclasses (classes or instances) with that field."""
    fields = [{f.name for f in dataclasses.fields(c)} for c in cfgs]
    owned = [[] for _ in cfgs]
    for item in argv:
        key = item.split("=", 1)[0].strip().lstrip("-").replace("-", "_")
        owners = [i for i, names in enumerate(fields) if key in names]
        if not owners:
            raise ValueError(f"unknown option {key!r}; known: {sorted(set().union(*fields))}")
        owned[owners[0]].append(item)
    return owned


def help_text(cfg: Any) -> str:
    """One line per field: name, current value, and its comment."""
    docs = field_docs(type(cfg))
    lines = [f"{type(cfg).__name__} fields (override with key=value):"]
    for f in dataclasses.fields(cfg):
        lines.append(f"  {f.name}={getattr(cfg, f.name)!r}  # {docs.get(f.name, '')}")
    return "\n".join(lines)


def parse(default: T, argv: Sequence[str] | None = None, usage: str = "") -> T | None:
    """`default` with the command line's key=value overrides (sys.argv[1:] when argv is None); None after
    printing `usage` and the field help when -h, --help or help is among the arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage + help_text(default))
        return None
    return override(default, argv)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# What a user can cause: a bad value, a missing or damaged file (JSONDecodeError is a ValueError), a full disk.
USER_ERRORS = (ValueError, OSError)
DEBUG_FLAG = "--debug"


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None, prog: str = "") -> int:
    """`main(argv)` as a command: a user error prints one line `prog: error: ...` and returns 2; `--debug`
    anywhere in argv re-raises it with its traceback instead. Bugs (any other exception) always propagate.
    First, before any JAX computation starts its threads, glibc is set to reuse freed memory (`hostmem`)."""
    hostmem.keep_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return main(argv) or 0
    except USER_ERRORS as e:
        if debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog or 'error'}: error: {msg} ({DEBUG_FLAG} shows the traceback)", file=sys.stderr, flush=True)
        return 2
