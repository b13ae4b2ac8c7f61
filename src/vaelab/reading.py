"""Bounded, typed reading of the files vaelab reads: configs, metadata, CSVs, weights, data.

Every file is opened without blocking and must be a regular file (a FIFO named config.json must
not hang a command); its size is checked against a limit before anything is read; JSON is parsed
with its nesting depth bounded and non-finite numbers (NaN, Infinity) refused, and then checked
for the types the caller expects. Every problem is a `VaelabError` of the caller's class naming
the file.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from .errors import CheckpointError, VaelabError

# JSON files vaelab writes are a few kB; metrics files with histograms a few hundred.
MAX_JSON_BYTES = 16 * 1024 * 1024
# Deeper than any structure vaelab writes (optimizer states are about 6 levels), far below the
# recursion limits of the parsers and of the code that walks the result.
MAX_JSON_DEPTH = 64


def format_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def read_bytes(path: str | Path, max_bytes: int, what: str = "file",
               error: type[VaelabError] = CheckpointError) -> bytes:
    """The content of a regular file of at most `max_bytes`; anything else is `error` naming it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise error(f"{path}: {format_bytes(info.st_size)}, more than the {format_bytes(max_bytes)} "
                        f"a {what} can be (damaged, or the wrong file)")
        chunks, total = [], 0
        # Never ask for more than the file holds (os.read allocates what it is asked for), but
        # for one byte past its size, to notice a file that grows while it is read.
        while chunk := os.read(fd, min(1 << 24, max_bytes + 1 - total, info.st_size + 1 - total) or 1):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # grew while being read
                raise error(f"{path}: more than the {format_bytes(max_bytes)} a {what} can be (it grew while read)")
        return b"".join(chunks)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)


def _refuse_constant(name: str):
    raise ValueError(f"non-finite number {name}")


def parse_json(text: str | bytes, where: str, error: type[VaelabError] = CheckpointError,
               max_depth: int = MAX_JSON_DEPTH, finite: bool = True) -> Any:
    """JSON text -> Python values, with nesting deeper than `max_depth` refused, and NaN and
    infinities too unless `finite` is False (metrics files may hold a NaN standard error)."""
    try:
        value = json.loads(text, **({"parse_constant": _refuse_constant} if finite else {}))
    except RecursionError:
        raise error(f"{where}: nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError:
        raise error(f"{where}: not UTF-8 text") from None
    except ValueError as e:  # json.JSONDecodeError and the non-finite constants
        text = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise error(f"{where}: {text}" if text.startswith("non-finite") else f"{where}: not JSON ({text})") from None
    # json.loads turns 1e999 into inf without calling parse_constant.
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > max_depth:
            raise error(f"{where}: nested deeper than {max_depth} levels")
        if finite and isinstance(v, float) and not math.isfinite(v):
            raise error(f"{where}: non-finite number {v}")
        if isinstance(v, dict):
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
    return value


def read_json(path: str | Path, max_bytes: int = MAX_JSON_BYTES, error: type[VaelabError] = CheckpointError,
              expect: type | None = dict, finite: bool = True) -> Any:
    """A JSON file, bounded and checked as `parse_json`; the top level must be `expect` (a dict
    by default; None accepts any value)."""
    value = parse_json(read_bytes(path, max_bytes, "JSON file", error), str(path), error, finite=finite)
    if expect is not None and not isinstance(value, expect):
        raise error(f"{path}: expected a JSON {_json_name(expect)}, got {_json_name(type(value))}")
    return value


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
               bool: "true/false", type(None): "null"}


def _json_name(t: type | tuple) -> str:
    if isinstance(t, tuple):
        return " or ".join(_json_name(x) for x in t)
    return _JSON_NAMES.get(t, t.__name__)


def require_fields(obj: Any, fields: dict[str, type | tuple], where: str,
                   error: type[VaelabError] = CheckpointError) -> dict:
    """Check that `obj` is a JSON object whose `fields` have the given types (int is not bool, a
    float field takes an int); returns it. Extra keys are allowed."""
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object, got {_json_name(type(obj))}")
    for key, types in fields.items():
        types = types if isinstance(types, tuple) else (types,)
        value = obj.get(key, _MISSING)
        if value is _MISSING:
            raise error(f"{where}: missing {key!r}")
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            continue
        if isinstance(value, bool) and bool not in types:
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            raise error(f"{where}: {key!r} must be a JSON {_json_name(types)}, got {_json_name(type(value))}")
    return obj


_MISSING = object()
