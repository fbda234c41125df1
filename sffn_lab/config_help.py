"""Every config key with its type, default and the one-line comment written beside it in ``config.py``.

``sffn config keys`` prints this table; shell completion of ``--set`` offers the keys.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass

from sffn_lab.config import Config, all_keys, field_types

_FIELD = re.compile(r"^\s+(\w+)\s*:[^=]+=.*?(?:#\s*(.*))?$")


@dataclass
class KeyHelp:
    key: str
    type: str
    default: typing.Any
    help: str


def _comments(cls: type) -> dict[str, str]:
    """field name → the comment on its line in the class source ('' when none)."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = _FIELD.match(line)
        if match:
            comments[match.group(1)] = (match.group(2) or "").strip()
    return comments


def key_help(cls: type = Config, prefix: str = "") -> list[KeyHelp]:
    """KeyHelp of every dotted leaf key under ``cls``, in declaration order (each variant's section after the
    shared FFN keys, its help the comments in its own options dataclass)."""
    comments = _comments(cls)
    defaults = cls()
    rows = []
    for name, kind in field_types(cls).items():
        if dataclasses.is_dataclass(kind):
            rows += key_help(kind, f"{prefix}{name}.")
        else:
            rows.append(KeyHelp(f"{prefix}{name}", getattr(kind, "__name__", str(kind)),
                                getattr(defaults, name), comments.get(name, "")))
    return rows


def complete_override(incomplete: str) -> list[str]:
    """Shell completion of ``--set``: the keys (``key=``) that start with what was typed."""
    if "=" in incomplete:
        return []
    return [f"{key}=" for key in all_keys() if key.startswith(incomplete)]
