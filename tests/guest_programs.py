"""Tiny guest programs compiled on the host for tests (static, no libc, so any guest runs them)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aradia.lab.launcher import Guest


def install_program(guest: Guest, name: str, data: bytes) -> None:
    """Copy a program into the guest as ``/tmp/NAME``, executable (through the console)."""
    guest.run(f"echo {base64.b64encode(data).decode()} | base64 -d > /tmp/{name}; chmod +x /tmp/{name}")


def _build_static(tmp: Path, name: str, source: str, flags: list[str]) -> bytes:
    """Compile ``source`` as a static program ``name`` on the host; its bytes."""
    src, exe = tmp / f"{name}.c", tmp / name
    src.write_text(source)
    subprocess.run(["gcc", "-static", *flags, "-o", str(exe), str(src)], check=True, capture_output=True,
                   timeout=60)
    return exe.read_bytes()

LOOP_C = r"""
/* loop N [NR]: N syscalls number NR (default 110, getppid) with zero arguments, then "calls N ns T"
 * with T from CLOCK_MONOTONIC. No libc. */
typedef unsigned long u64;
static long sys3(long nr, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(nr), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}
struct ts { long sec, nsec; };
static u64 now(void) { struct ts t; sys3(228, 1, (long)&t, 0); return (u64)t.sec * 1000000000ul + t.nsec; }
static char *fmt(char *p, u64 v) {
    char b[24]; int n = 0;
    do { b[n++] = '0' + v % 10; v /= 10; } while (v);
    while (n) *p++ = b[--n];
    return p;
}
void cmain(long *sp) {
    long argc = sp[0]; char **argv = (char **)(sp + 1);
    u64 n = 0, nr = 0;
    if (argc > 1) for (char *s = argv[1]; *s >= '0' && *s <= '9'; s++) n = n * 10 + (u64)(*s - '0');
    if (argc > 2) for (char *s = argv[2]; *s >= '0' && *s <= '9'; s++) nr = nr * 10 + (u64)(*s - '0');
    if (argc <= 2) nr = 110;
    u64 t0 = now();
    for (u64 i = 0; i < n; i++) sys3((long)nr, 0, 0, 0);
    u64 t1 = now();
    char out[80], *p = out;
    for (const char *a = "calls "; *a; ) *p++ = *a++;
    p = fmt(p, n);
    for (const char *b = " ns "; *b; ) *p++ = *b++;
    p = fmt(p, t1 - t0);
    *p++ = '\n';
    sys3(1, 1, (long)out, p - out);
    sys3(60, 0, 0, 0);
}
__asm__(".globl _start\n_start:\n mov %rsp, %rdi\n and $-16, %rsp\n call cmain\n hlt\n");
"""


#: A syscall only ``loop N QUIET_NR`` makes in the test guests: getsid(0). Counts of getppid (the
#: default) include the calls of every bash that starts meanwhile (bash asks for its parent's pid when
#: it starts, e.g. the one ``Guest.run`` starts to run the loop); nothing in the guests calls getsid.
QUIET_NR = 124
QUIET_SYMBOL = "__x64_sys_getsid"


def build_loop(tmp: Path) -> bytes:
    """Compile ``loop`` (static, no libc) on the host; its bytes, ready to copy into a guest."""
    return _build_static(tmp, "loop", LOOP_C, ["-nostdlib", "-Os", "-fno-stack-protector",
                                                "-fno-asynchronous-unwind-tables", "-fno-pie", "-no-pie", "-s",
                                                "-Wl,-N", "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments"])


UNIX_C = r"""
/* unixpair PATH: listen on a unix socket at PATH, connect to it, accept, then sleep forever. */
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (argc < 2) return 2;
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    unlink(argv[1]);
    int l = socket(AF_UNIX, SOCK_STREAM, 0), c = socket(AF_UNIX, SOCK_STREAM, 0);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 4)) return 1;
    if (connect(c, (struct sockaddr *)&a, sizeof a)) return 1;
    int s = accept(l, 0, 0);
    if (s < 0) return 1;
    for (;;) pause();
}
"""


def build_unixpair(tmp: Path) -> bytes:
    """Compile ``unixpair`` (static) on the host; its bytes."""
    return _build_static(tmp, "unixpair", UNIX_C, ["-Os", "-s"])


ACCEPT_C = r"""
/* acceptpair: for IPv4 and IPv6 loopback, listen on a free port, connect to it, accept with the
 * peer's address, then print what the guest itself knows: the listening port, the connecting
 * socket's own port, the accepted fd, and the bytes the accepted socket read. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
static int pair(int family) {
    struct sockaddr_storage a = {0}, me = {0}, peer = {0};
    socklen_t n = sizeof a;
    if (family == AF_INET) {
        struct sockaddr_in *v4 = (struct sockaddr_in *)&a;
        v4->sin_family = AF_INET; v4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    } else {
        struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&a;
        v6->sin6_family = AF_INET6; v6->sin6_addr = in6addr_loopback;
    }
    int l = socket(family, SOCK_STREAM, 0), c = socket(family, SOCK_STREAM, 0);
    if (bind(l, (struct sockaddr *)&a, family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6)))
        return 1;
    if (listen(l, 1) || getsockname(l, (struct sockaddr *)&a, &n)) return 1;
    if (connect(c, (struct sockaddr *)&a, n)) return 1;
    n = sizeof me;
    if (getsockname(c, (struct sockaddr *)&me, &n)) return 1;
    n = sizeof peer;
    int s = accept(l, (struct sockaddr *)&peer, &n);
    if (s < 0) return 1;
    char msg[32], buf[32] = {0};
    int len = snprintf(msg, sizeof msg, "ping-%d", family);
    if (write(c, msg, len) != len || read(s, buf, sizeof buf - 1) != len) return 1;
    int lport = ntohs(((struct sockaddr_in *)&a)->sin_port), cport = ntohs(((struct sockaddr_in *)&me)->sin_port);
    printf("family %d listen %d client %d accepted %d read %s\n", family, lport, cport, s, buf);
    close(s); close(c); close(l);
    return 0;
}
int main(void) { return pair(AF_INET) || pair(AF_INET6); }
"""


def build_acceptpair(tmp: Path) -> bytes:
    """Compile ``acceptpair`` (static) on the host; its bytes."""
    return _build_static(tmp, "acceptpair", ACCEPT_C, ["-Os", "-s"])
