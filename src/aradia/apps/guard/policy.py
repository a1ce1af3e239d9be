"""The guard's policy file (TOML): what is protected, what is forbidden, who is allowed.

```toml
[[protect]]
path = "/srv/app"                 # a file, or a directory and everything under it
action = "block"                  # or "alert"
allow = [{ comm = "deployer" }, { exe = "/usr/local/bin/deploy" }, { uid = 1001 }]
[[forbid]]
exe = "/usr/bin/nc"
action = "block"
allow = [{ parent_comm = "appd" }]
```

An allow rule matches a process when every key it names matches: ``comm`` (its name), ``exe`` (its
program, compared as the resolved file), ``uid`` (its real uid), ``parent_comm`` and ``parent_exe``
(any ancestor's). An unknown key anywhere is an error.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aradia.errors import AradiaError

ACTIONS = ("block", "alert")
ALLOW_KEYS = {"comm": str, "exe": str, "uid": int, "parent_comm": str, "parent_exe": str}


class PolicyError(AradiaError):
    """A policy file that cannot be used (syntax, unknown key, wrong type)."""


@dataclass(frozen=True)
class Allow:
    """One allow rule: every field that is set must match the acting process."""

    comm: str | None = None
    exe: str | None = None
    uid: int | None = None
    parent_comm: str | None = None
    parent_exe: str | None = None

    def describe(self) -> str:
        """The rule as the policy wrote it (``comm=deployer``)."""
        return ",".join(f"{k}={v}" for k, v in vars(self).items() if v is not None)


@dataclass(frozen=True)
class Protect:
    """A protected file or tree."""

    path: str
    action: str
    allow: tuple[Allow, ...] = ()


@dataclass(frozen=True)
class Forbid:
    """A program that must not run."""

    exe: str
    action: str
    allow: tuple[Allow, ...] = ()


@dataclass(frozen=True)
class Policy:
    """A whole policy."""

    protect: tuple[Protect, ...] = ()
    forbid: tuple[Forbid, ...] = ()
    source: str = ""

    def programs(self) -> set[str]:
        """Every program path the policy names (forbidden ones and those of allow rules)."""
        out = {f.exe for f in self.forbid}
        for rule in (*self.protect, *self.forbid):
            for a in rule.allow:
                out.update(p for p in (a.exe, a.parent_exe) if p)
        return out


def _keys(table: dict[str, Any], allowed: set[str], required: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise PolicyError(f"{where}: unknown key{'s' if len(extra) > 1 else ''} {', '.join(extra)}")
    missing = sorted(required - set(table))
    if missing:
        raise PolicyError(f"{where}: missing {', '.join(missing)}")


def _allow(items: Any, where: str) -> tuple[Allow, ...]:
    if not isinstance(items, list):
        raise PolicyError(f"{where}: allow must be a list of tables")
    out = []
    for i, item in enumerate(items):
        at = f"{where}.allow[{i}]"
        if not isinstance(item, dict) or not item:
            raise PolicyError(f"{at}: an allow rule is a table with at least one of {', '.join(ALLOW_KEYS)}")
        _keys(item, set(ALLOW_KEYS), set(), at)
        for k, v in item.items():
            if not isinstance(v, ALLOW_KEYS[k]) or isinstance(v, bool):
                raise PolicyError(f"{at}: {k} must be {'an integer' if ALLOW_KEYS[k] is int else 'a string'}")
            if k in ("exe", "parent_exe") and not v.startswith("/"):
                raise PolicyError(f"{at}: {k} must be an absolute path")
        out.append(Allow(**item))
    return tuple(out)


def _action(table: dict[str, Any], where: str) -> str:
    action = table.get("action", "block")
    if action not in ACTIONS:
        raise PolicyError(f"{where}: action must be one of {', '.join(ACTIONS)}, not {action!r}")
    return str(action)


def _path(table: dict[str, Any], key: str, where: str) -> str:
    value = table[key]
    if not isinstance(value, str) or not value.startswith("/"):
        raise PolicyError(f"{where}: {key} must be an absolute path")
    return value.rstrip("/") or "/"


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """A :class:`Policy` from TOML text; :class:`PolicyError` names what is wrong and where."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{source}: {e}") from None
    _keys(doc, {"protect", "forbid"}, set(), source)
    protect, forbid = [], []
    for i, t in enumerate(doc.get("protect", [])):
        where = f"{source}: protect[{i}]"
        if not isinstance(t, dict):
            raise PolicyError(f"{where}: must be a table ([[protect]])")
        _keys(t, {"path", "action", "allow"}, {"path"}, where)
        protect.append(Protect(_path(t, "path", where), _action(t, where), _allow(t.get("allow", []), where)))
    for i, t in enumerate(doc.get("forbid", [])):
        where = f"{source}: forbid[{i}]"
        if not isinstance(t, dict):
            raise PolicyError(f"{where}: must be a table ([[forbid]])")
        _keys(t, {"exe", "action", "allow"}, {"exe"}, where)
        forbid.append(Forbid(_path(t, "exe", where), _action(t, where), _allow(t.get("allow", []), where)))
    if not protect and not forbid:
        raise PolicyError(f"{source}: protects nothing and forbids nothing")
    return Policy(tuple(protect), tuple(forbid), source)


def load_policy(path: str | Path) -> Policy:
    """The policy in file ``path``."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PolicyError(f"cannot read policy {path}: {e.strerror}") from None
    return parse_policy(text, str(path))
