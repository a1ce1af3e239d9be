"""Decoding x86-64 syscall arguments from the ``struct pt_regs`` a syscall entry receives."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import Any

from aradia.linux import bounds

MAX_STR = 4096
MAX_ARGV = 256
#: pt_regs fields of a syscall's arguments (the syscall ABI: r10, not rcx, holds the fourth).
SYSCALL_ARG_REGS = ("di", "si", "dx", "r10", "r8", "r9")

ReadUser = Callable[[int, int], bytes]


def user_cstring(read: ReadUser, addr: int, limit: int = MAX_STR) -> str | None:
    """A NUL-terminated string of user memory; None when unreadable (a guest pointer may be anything).

    (:func:`aradia.linux.bounds.read_cstring` is the read that raises.)
    """
    if not addr:
        return None
    try:
        return bounds.read_cstring(read, addr, limit, partial=True)
    except bounds.GUEST_ERRORS:
        return None


def read_argv(read: ReadUser, addr: int) -> list[str] | None:
    """A NULL-terminated array of string pointers (argv, envp) in user memory."""
    if not addr:
        return []
    out: list[str] = []
    for i in range(MAX_ARGV):
        try:
            (p,) = struct.unpack("<Q", read(addr + 8 * i, 8))
        except Exception:
            return out or None
        if not p:
            return out
        out.append(user_cstring(read, p) or "")
    return out


def decode_sockaddr(read: ReadUser, addr: int, length: int) -> dict[str, Any] | None:
    """A ``struct sockaddr`` (AF_INET, AF_INET6, AF_UNIX) from user memory."""
    if not addr or not 2 <= length <= 128:
        return None
    try:
        raw = read(addr, length)
    except Exception:
        return None
    family = struct.unpack_from("<H", raw)[0]
    if family == socket.AF_INET and len(raw) >= 8:
        return {"family": "inet", "address": str(ipaddress.ip_address(raw[4:8])),
                "port": struct.unpack_from(">H", raw, 2)[0]}
    if family == socket.AF_INET6 and len(raw) >= 24:
        return {"family": "inet6", "address": str(ipaddress.ip_address(raw[8:24])),
                "port": struct.unpack_from(">H", raw, 2)[0]}
    if family == socket.AF_UNIX:
        path = raw[2:]
        if path[:1] == b"\0":
            return {"family": "unix", "path": "@" + path[1:].split(b"\0")[0].decode(errors="replace")}
        return {"family": "unix", "path": path.split(b"\0")[0].decode(errors="replace")}
    return {"family": family}


def _int(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def decode(name: str, args: list[int], read: ReadUser) -> dict[str, Any]:
    """The arguments of syscall ``name`` (raw register values ``args``) as a dict."""
    a = args
    if name in ("execve", "execveat"):
        off = 1 if name == "execveat" else 0
        return {"path": user_cstring(read, a[off]), "argv": read_argv(read, a[off + 1])}
    if name in ("openat", "openat2"):
        return {"dfd": _int32(a[0]), "path": user_cstring(read, a[1]), "flags": a[2] & 0xFFFFFFFF}
    if name == "open":
        return {"path": user_cstring(read, a[0]), "flags": a[1] & 0xFFFFFFFF}
    if name in ("connect", "bind"):
        return {"fd": _int32(a[0]), "addr": decode_sockaddr(read, a[1], a[2] & 0xFFFFFFFF)}
    if name in ("accept", "accept4"):
        return {"fd": _int32(a[0])}  # the peer is known at the end: decode_exit
    if name in ("read", "write", "pread64", "pwrite64"):
        out: dict[str, Any] = {"fd": _int32(a[0]), "count": a[2]}
        if name.startswith(("write", "pwrite")) and a[2]:
            try:
                out["data"] = read(a[1], min(a[2], 64))
            except Exception:
                out["data"] = None
        return out
    if name == "kill":
        return {"pid": _int32(a[0]), "sig": _int32(a[1])}
    if name in ("exit", "exit_group"):
        return {"status": a[0] & 0xFF}
    if name in ("clone", "clone3", "fork", "vfork"):
        return {"flags": a[0]} if name == "clone" else {}
    return {r: v for r, v in zip(SYSCALL_ARG_REGS, a, strict=False)}


MAX_ERRNO = 4095


def decode_exit(name: str, args: list[int], ret: int, read: ReadUser) -> dict[str, Any]:
    """The arguments and results of syscall ``name`` once its work is done: ``ret`` is what the
    kernel function that did it returned (``do_accept``: a file or an error, ``vfs_read``: bytes)."""
    out = decode(name, args, read)
    error = -_int(ret) if (ret >= (1 << 64) - MAX_ERRNO) else None
    out["error"] = error
    if name in ("accept", "accept4"):
        out["addr"] = None
        if error is None and args[1] and args[2]:
            try:
                (length,) = struct.unpack("<i", read(args[2], 4))
            except Exception:
                length = 0
            out["addr"] = decode_sockaddr(read, args[1], length)
    elif name in ("read", "pread64"):
        out["ret"] = _int(ret)
        out["data"] = None
        if error is None and ret > 0:
            try:
                out["data"] = read(args[1], min(ret, 64))
            except Exception:
                out["data"] = None
    return out
