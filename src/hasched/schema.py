"""Checked input: JSON files whose every error names the file and the field.

Used for every file a user hands to hasched (schedules, checkpoint metadata, campaign and
search configs) and meant for any new one (chip maps, LUTs): parse with :func:`read_json`,
then check with :func:`check_fields` (a whole object against ``{field: kind}``),
:func:`require` (one field) or :func:`check_type` (one value). A kind is a type, a union
(``str | None``) or ``list[T]``; JSON ``true`` never passes for an integer and ``0.9``
never for an integer either, so nothing is silently coerced.

Example:
    >>> check_fields({"rows": 4, "pes": [0, 1]}, {"rows": int, "pes": list[int]},
    ...              file="chip.json")
    {'rows': 4, 'pes': [0, 1]}
    >>> check_type([0, True], list[int], file="s.json", name="perm")
    Traceback (most recent call last):
    ...
    hasched.errors.HaschedError: s.json: perm[1] must be an integer, got true
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, get_args, get_origin

from hasched.errors import HaschedError

__all__ = ["Kind", "read_json", "check_type", "require", "check_fields"]


def _os_reason(path: Path, err: OSError) -> HaschedError:
    from hasched.io import os_error  # the one list of OSError reasons

    return os_error(path, err, "read")


def read_json(path: str | Path, *, what: str = "file") -> Any:
    """Parses a JSON file; every failure is one line naming the file.

    Raises:
        HaschedError: Missing, unreadable, not UTF-8, or not JSON (with line and column).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HaschedError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise HaschedError(f"{what} {path} is a folder, not a file") from None
    except OSError as err:
        raise _os_reason(path, err) from None
    except UnicodeDecodeError:
        raise HaschedError(f"{what} {path} is not a text (UTF-8) file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise HaschedError(f"{what} {path} is not valid JSON (line {err.lineno}, column "
                           f"{err.colno}: {err.msg})") from None
    except RecursionError:
        raise HaschedError(f"{what} {path} is nested too deeply") from None


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "an object", type(None): "null"}

Kind = Any  # a type, a tuple or union of types, or ``list[T]`` (see :func:`check_type`)


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"),
                       (list, "list"), (dict, "object"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _matches(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # JSON true is not the integer 1
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _alternatives(kind: Kind) -> tuple:
    if isinstance(kind, tuple):
        return kind
    if isinstance(kind, types.UnionType):
        return get_args(kind)
    return (kind,)


def _describe(kind: Kind) -> str:
    names = []
    for k in _alternatives(kind):
        if get_origin(k) is list:
            names.append(f"a list of {_describe(get_args(k)[0]).split(' ', 1)[1]}s")
        else:
            names.append(_KIND_NAMES.get(k, k.__name__))
    return " or ".join(names)


def _short(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_type(value: Any, kind: Kind, *, file: str | Path, name: str) -> Any:
    """Returns ``value`` if it is of ``kind``; else raises naming ``file`` and ``name``.

    ``kind`` is a type, a tuple or union of types (``str | None``) or ``list[T]`` (every
    item checked, the error names the item: ``seeds[2]``). ``bool`` never passes for
    ``int`` or ``float``; ``int`` passes for ``float``.

    Example:
        >>> check_type([1, 2], list[int], file="f.json", name="seeds")
        [1, 2]
    """
    for k in _alternatives(kind):
        if get_origin(k) is list and isinstance(value, list):
            item = get_args(k)[0]
            for i, v in enumerate(value):
                check_type(v, item, file=file, name=f"{name}[{i}]")
            return value
        if get_origin(k) is None and _matches(value, k):
            return value
    raise HaschedError(f"{file}: {name} must be {_describe(kind)}, got {_short(value)}")


def require(
    obj: Any,
    field: str,
    kind: Kind,
    *,
    file: str | Path,
    where: str = "",
    default: Any = ...,
) -> Any:
    """``obj[field]``, checked to be of ``kind``; errors name ``file`` and the field.

    Args:
        obj: A parsed JSON value expected to be an object.
        field: The key.
        kind: Allowed type(s), see :func:`check_type`.
        file: The file, for messages.
        where: Dotted path of ``obj`` inside the file (``"config"``), for messages.
        default: Returned when the field is absent (default: the field is required).

    Example:
        >>> require({"seed": 1}, "seed", int, file="meta.json")
        1
    """
    name = f"{where}.{field}" if where else field
    if not isinstance(obj, dict):
        raise HaschedError(f"{file}: {where or 'the top level'} must be an object, got a "
                           f"JSON {_json_type(obj)}")
    if field not in obj:
        if default is not ...:
            return default
        raise HaschedError(f"{file}: missing field {name!r}")
    return check_type(obj[field], kind, file=file, name=name)


def check_fields(
    obj: Any, spec: dict[str, Kind], *, file: str | Path, where: str = "",
    extra_ok: bool = False,
) -> dict:
    """Checks an object against ``{field: kind}``: every field present and of its kind.

    Args:
        obj: A parsed JSON value expected to be an object.
        spec: The fields and their kinds (see :func:`check_type`).
        file, where: For messages, as in :func:`require`.
        extra_ok: Accept fields that ``spec`` does not name (default: refused).

    Example:
        >>> check_fields({"rows": 4, "pes": [0, 1]}, {"rows": int, "pes": list[int]},
        ...              file="chip.json")
        {'rows': 4, 'pes': [0, 1]}
    """
    for field in spec:
        require(obj, field, spec[field], file=file, where=where)
    unknown = sorted(set(obj) - set(spec))
    if unknown and not extra_ok:
        raise HaschedError(f"{file}: unknown field {where + '.' if where else ''}{unknown[0]}")
    return obj
