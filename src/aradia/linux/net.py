"""Sockets of the guest (what ``/proc/net/{tcp,tcp6,udp,udp6,unix}`` and ``ss -p`` show).

Sockets are found through the open files of every process, so each comes with its owning pid.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import drgn

from aradia.linux.bounds import GUEST_ERRORS, Warnings, bounded
from aradia.linux.walks import each_task, open_files

AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
              12: "NEW_SYN_RECV"}
S_IFMT, S_IFSOCK = 0o170000, 0o140000
SOCKFS_MAGIC = 0x534F434B  # include/uapi/linux/magic.h
SOCK_TYPES = {1: "stream", 2: "dgram", 3: "raw", 5: "seqpacket"}
PROTOS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 255: "raw"}


@dataclass
class Socket:
    """One socket: family, protocol, addresses and ports, state, owning pid and fd, inode."""

    family: str
    proto: str
    local_address: str
    local_port: int
    remote_address: str
    remote_port: int
    state: str
    pid: int
    fd: int
    inode: int


def _ip(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def _is_socket(file: drgn.Object) -> bool:
    """Whether ``file`` is a socket: its ``f_op`` is ``socket_file_ops`` or, for a kernel whose
    kallsyms lists no data (arm64), its inode is a socket on the sockfs superblock."""
    prog = file.prog_
    try:
        return bool(file.f_op.value_() == prog.symbol("socket_file_ops").address)
    except LookupError:
        inode = file.f_inode
        return (int(inode.i_mode) & S_IFMT) == S_IFSOCK and int(inode.i_sb.s_magic) == SOCKFS_MAGIC


def socket_info(file: drgn.Object, pid: int, fd: int) -> Socket | None:
    """A :class:`Socket` for an open ``struct file *``, or None when the file is not a socket."""
    if not _is_socket(file):
        return None
    prog = file.prog_
    sock = drgn.cast("struct socket *", file.private_data)
    inode = int(drgn.container_of(sock, "struct socket_alloc", "socket").vfs_inode.i_ino)
    sk = sock.sk
    if not sk:
        return Socket("?", "?", "", 0, "", 0, "UNCONNECTED", pid, fd, inode)
    common = sk.__sk_common
    family = int(common.skc_family)
    stype = int(sock.type)
    state_no = int(common.skc_state)
    if family == AF_UNIX:
        u = drgn.container_of(sk, "struct unix_sock", "sk")
        path = ""
        if u.addr:
            n = int(u.addr.len) - 2  # minus sun_family
            raw = prog.read(u.addr.name[0].sun_path.address_, max(0, min(n, 108)), False)
            path = ("@" + raw[1:].decode(errors="replace")) if raw[:1] == b"\0" else \
                raw.split(b"\0", 1)[0].decode(errors="replace")
        state = {1: "CONNECTED", 7: "UNCONNECTED", 10: "LISTEN"}.get(state_no, str(state_no))
        return Socket("unix", SOCK_TYPES.get(stype, str(stype)), path, 0, "", 0, state, pid, fd, inode)
    if family not in (AF_INET, AF_INET6):
        return Socket(str(family), SOCK_TYPES.get(stype, str(stype)), "", 0, "", 0, str(state_no), pid, fd,
                      inode)
    proto_no = int(sk.sk_protocol)
    proto = PROTOS.get(proto_no, str(proto_no))
    if family == AF_INET:
        laddr = _ip(int(common.skc_rcv_saddr).to_bytes(4, "little"))
        raddr = _ip(int(common.skc_daddr).to_bytes(4, "little"))
    else:
        laddr = _ip(prog.read(common.skc_v6_rcv_saddr.address_, 16, False))
        raddr = _ip(prog.read(common.skc_v6_daddr.address_, 16, False))
    lport = int(common.skc_num)
    rport = socket.ntohs(int(common.skc_dport))
    if proto == "tcp":
        state = TCP_STATES.get(state_no, str(state_no))
    else:
        state = "ESTABLISHED" if state_no == 1 else "UNCONNECTED"
    return Socket("inet" if family == AF_INET else "inet6", proto, laddr, lport, raddr, rport, state, pid, fd,
                  inode)


def sockets(prog: drgn.Program, *, warnings: Warnings | None = None) -> list[Socket]:
    """Every socket some process holds open, with its owner (a shared socket is listed per holder)."""
    warnings = Warnings() if warnings is None else warnings
    out = []
    for task in bounded(each_task(prog, warnings), "task list", warnings, limit=1 << 22,
                        key=lambda t: t.value_()):
        try:
            if int(task.pid) != int(task.tgid) or not task.files:
                continue
            pid = int(task.pid)
            for fd, file in bounded(open_files(task), f"files of {pid}", warnings, limit=1 << 20):
                try:
                    s = socket_info(file, pid, int(fd))
                except GUEST_ERRORS as e:
                    warnings.add(f"fd {fd} of {pid}: unreadable socket ({e})")
                    continue
                if s is not None:
                    out.append(s)
        except GUEST_ERRORS as e:
            warnings.add(f"task at {task.value_():#x}: unreadable ({e})")
    return out
