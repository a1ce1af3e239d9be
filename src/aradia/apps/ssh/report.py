"""Text renderings of ``aradia keys ssh`` and ``aradia decrypt ssh`` results for a terminal."""

from __future__ import annotations

import datetime
from typing import Any

from aradia.apps.ssh.keys import KeyScan

SKIPPED = {"CHANNEL_WINDOW_ADJUST", "IGNORE"}  # noise in a transcript; kept in --json


def key_lines(result: KeyScan) -> list[str]:
    """One line per key candidate, then a summary."""
    lines = [f"pid {k.pid} ({k.comm}) {k.source:12} {k.cipher:30} key {k.key}"
             + (f" iv {k.iv} ({k.iv_is})" if k.iv else "") for k in result.keys]
    lines.append(f"{len(result.keys)} key candidate(s) in {len(result.pids)} daemon process(es) "
                 f"({', '.join(map(str, result.pids)) or 'none running'}): {result.scanned} bytes "
                 f"in {result.seconds:.2f} s")
    return lines


def _clock(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%H:%M:%S.%f")[:-3]


def _message_line(m: dict[str, Any]) -> str | None:
    arrow = "->" if m["dir"] == "c2s" else "<-"
    name = m["name"]
    if name in SKIPPED:
        return None
    extra = {k: v for k, v in m.items() if k not in ("time", "dir", "seq", "type", "name", "data")}
    text = f"{_clock(m['time'])} {arrow} {name}"
    if extra:
        text += " " + " ".join(f"{k}={v!r}" for k, v in extra.items())
    if "data" in m:
        text += f" {m['data']!r}"
    return text


def decrypt_lines(result: dict[str, Any]) -> list[str]:
    """Each connection: endpoints, versions, algorithms and keys used, then its messages in capture
    order (channel data shown as text), then problems."""
    lines = []
    for c in result["connections"]:
        lines.append(f"== {c['client']} -> {c['server']}  {c.get('client_version', '?')} / "
                     f"{c.get('server_version', '?')}")
        for e in c["epochs"]:
            for d in ("c2s", "s2c"):
                u = e.get(d)
                if u is None:
                    continue
                how = f"key from pid {u['pid']} ({u['source']})" if u.get("key") else "no key"
                lines.append(f"   keys {e['epoch']} {d}: {u['cipher']} {u.get('mac', '')} -- {how}")
        lines += [t for m in c["messages"] if (t := _message_line(m)) is not None]
        lines += [f"   problem: {e}" for e in c["errors"]]
        lines.append("   complete" if c["complete"] else "   INCOMPLETE")
    if result["other_connections"]:
        lines.append(f"({result['other_connections']} other TCP connection(s) in the capture)")
    lines += [f"warning: {w}" for w in result["warnings"]]
    if not result["connections"]:
        lines.append("no SSH connection in the capture")
    return lines


__all__ = ["decrypt_lines", "key_lines"]
