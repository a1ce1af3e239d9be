"""Every guest program the tests run, as C source built on the host with gcc, and one way to install it.

Each prints what it did as the guest saw it, so the tests compare aradia's view with the guest's own
words. ``loop`` and ``sysargs`` are static without libc (exact syscalls, nothing else), ``unixpair`` and
``acceptpair`` static with glibc; ``multi`` is one static multi-call program (its first argument picks
the part; its comm is the name it is installed as, so the same bytes serve as ``aradia-act`` and
``aradia-decoy``) and ``opener`` a dynamic one calling the guest's libc (for user-space probes).
:func:`install_program` copies a program into the guest; ``tests/guest_workload.py`` starts them.

(``bench/trace.py`` imports this file by its path for ``loop`` and ``a64loop``: it imports nothing from
``tests/``.)
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aradia.lab.launcher import Guest


def build_program(tmp: Path, name: str, source: str, flags: list[str], gcc: str = "gcc") -> bytes:
    """Compile ``source`` as program ``name`` with ``GCC FLAGS`` on the host (``gcc`` or a cross
    compiler such as ``aarch64-linux-gnu-gcc``); its bytes."""
    src, exe = tmp / f"{name}.c", tmp / name
    src.write_text(source)
    subprocess.run([gcc, *flags, "-o", str(exe), str(src)], check=True, capture_output=True, timeout=60)
    return exe.read_bytes()


def install_program(guest: Guest, name: str, data: bytes) -> None:
    """Copy a program into the guest as ``/tmp/NAME``, executable (over ssh: fast for large programs)."""
    path = f"/tmp/{name}"
    subprocess.run([*guest.ssh_argv(), f"cat > {path} && chmod +x {path}"], input=data, check=True,
                   capture_output=True, timeout=120)


# --- static, no libc ------------------------------------------------------------------------------------
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
    return build_program(tmp, "loop", LOOP_C, ["-static", "-nostdlib", "-Os", "-fno-stack-protector",
                                                "-fno-asynchronous-unwind-tables", "-fno-pie", "-no-pie", "-s",
                                                "-Wl,-N", "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments"])


SYSARGS_C = r"""
/* sysargs kill|open N: N syscalls whose six argument registers are known per call i. No libc.
 *   kill: kill(KILL_PID + i, 0), rdx = i, r10 = ~i, r8 = own pid, r9 = MAGIC ^ i     (all -ESRCH)
 *   open: openat(AT_FDCWD, buf, O_RDONLY | O_CLOEXEC, i), r8 = own pid, r9 = MAGIC ^ i, where buf
 *         (64 bytes) is "/nonexistent/aradia-%06d", NUL, then bytes 27..63 = k * 37 + 11;
 *         then once more (i = N) with the path "/nonexistent/aradia-edge" ending right before an
 *         unmapped page                                                                (all -ENOENT)
 * Prints "pid P buf B edge E calls N ok M" (M: calls that failed as they must). */
typedef unsigned long u64;
#define KILL_PID 0x3f000000ul
#define MAGIC 0x5a5aa5a500000000ul
static long sys6(long nr, long a, long b, long c, long d, long e, long f) {
    long r;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall" : "=a"(r) : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return r;
}
static char buf[64];
static char *fmt(char *p, u64 v) {
    char b[24]; int n = 0;
    do { b[n++] = '0' + v % 10; v /= 10; } while (v);
    while (n) *p++ = b[--n];
    return p;
}
static char *put(char *p, const char *s) { while (*s) *p++ = *s++; return p; }
void cmain(long *sp) {
    long argc = sp[0]; char **argv = (char **)(sp + 1);
    u64 n = 0, ok = 0, pid = (u64)sys6(39, 0, 0, 0, 0, 0, 0);
    if (argc < 3) sys6(60, 2, 0, 0, 0, 0, 0);
    for (char *s = argv[2]; *s >= '0' && *s <= '9'; s++) n = n * 10 + (u64)(*s - '0');
    int open = argv[1][0] == 'o';
    char *edge = 0;
    if (open) {
        char *page = (char *)sys6(9, 0, 8192, 3, 0x22, -1, 0);  /* two pages, the second unmapped */
        sys6(11, (long)(page + 4096), 4096, 0, 0, 0, 0);
        edge = page + 4096 - 25;
        put(edge, "/nonexistent/aradia-edge");
        edge[24] = 0;
        for (int k = 27; k < 64; k++) buf[k] = (char)(k * 37 + 11);
    }
    for (u64 i = 0; i < n; i++) {
        if (open) {
            char *p = put(buf, "/nonexistent/aradia-");
            for (int d = 5; d >= 0; d--) { u64 v = i; for (int j = 0; j < d; j++) v /= 10; *p++ = '0' + v % 10; }
            *p = 0;
            ok += sys6(257, -100, (long)buf, 0x80000, (long)i, (long)pid, (long)(MAGIC ^ i)) == -2;
        } else {
            ok += sys6(62, (long)(KILL_PID + i), 0, (long)i, (long)~i, (long)pid, (long)(MAGIC ^ i)) == -3;
        }
    }
    if (open) ok += sys6(257, -100, (long)edge, 0x80000, (long)n, (long)pid, (long)(MAGIC ^ n)) == -2;
    char out[160], *p = out;
    p = fmt(put(p, "pid "), pid);
    p = fmt(put(p, " buf "), (u64)buf);
    p = fmt(put(p, " edge "), (u64)edge);
    p = fmt(put(p, " calls "), n);
    p = fmt(put(p, " ok "), ok);
    *p++ = '\n';
    sys6(1, 1, (long)out, p - out, 0, 0, 0);
    sys6(60, 0, 0, 0, 0, 0, 0);
}
__asm__(".globl _start\n_start:\n mov %rsp, %rdi\n and $-16, %rsp\n call cmain\n hlt\n");
"""
#: The constants ``sysargs`` builds its arguments from (as in its source).
KILL_PID = 0x3F000000
MAGIC = 0x5A5AA5A500000000
EDGE_PATH = b"/nonexistent/aradia-edge\0"


def build_sysargs(tmp: Path) -> bytes:
    """Compile ``sysargs`` (static, no libc) on the host; its bytes."""
    return build_program(tmp, "sysargs", SYSARGS_C, ["-static", "-nostdlib", "-Os", "-fno-stack-protector",
                                                     "-fno-asynchronous-unwind-tables", "-fno-pie", "-no-pie", "-s",
                                                     "-Wl,--build-id=none"])


# --- with libc --------------------------------------------------------------------------------------------
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


def build_unixpair(tmp: Path, gcc: str = "gcc") -> bytes:
    """Compile ``unixpair`` (static) on the host with ``gcc``; its bytes."""
    return build_program(tmp, "unixpair", UNIX_C, ["-static", "-Os", "-s"], gcc)


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
    return build_program(tmp, "acceptpair", ACCEPT_C, ["-static", "-Os", "-s"])


#: The fixed address at which ``multi twins`` maps the page both twins write.
TWIN_VA = 0x5A5A0000

MULTI_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t go;
static void on_usr1(int s) { (void)s; go = 1; }
static void wait_usr1(void) {
    sigset_t block, old;
    sigemptyset(&block); sigaddset(&block, SIGUSR1);
    sigprocmask(SIG_BLOCK, &block, &old);
    while (!go) sigsuspend(&old);
    go = 0;
    sigprocmask(SIG_SETMASK, &old, 0);
}
static uint64_t now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000ull + t.tv_nsec;
}
static uint64_t phys_of(void *page) {
    uint64_t entry = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0 || pread(fd, &entry, 8, ((uintptr_t)page / 4096) * 8) != 8 || !(entry >> 63)) exit(1);
    close(fd);
    return (entry & ((1ull << 55) - 1)) * 4096;
}

/* ticker SECONDS 000000000000: spin for SECONDS; each round writes the round number into argv[3]
 * (the cmdline), then into the comm ("tk" + 12 digits), then with CLOCK_MONOTONIC into a locked
 * page whose guest-physical address it prints first. A host reading that page sees the guest's
 * clock and progress; both stand still while the guest is paused. Prints "phys ADDR", "ready PID". */
static int ticker(int argc, char **argv) {
    if (argc < 4 || strlen(argv[3]) != 12) return 2;
    volatile uint64_t *page = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (page == MAP_FAILED || mlock((void *)page, 4096)) return 1;
    page[0] = 0x72656b6369746172ull; /* "raticker" */
    printf("phys 0x%llx\nready %d\n", (unsigned long long)phys_of((void *)page), getpid());
    fflush(stdout);
    uint64_t end = now() + (uint64_t)atoi(argv[2]) * 1000000000ull;
    for (uint64_t n = 1;; n++) {
        char digits[13], name[16];
        snprintf(digits, sizeof digits, "%012llu", (unsigned long long)n);
        memcpy(argv[3], digits, 12);
        snprintf(name, sizeof name, "tk%s", digits);
        prctl(PR_SET_NAME, name);
        uint64_t t = now();
        page[2] = t;
        page[1] = n;
        if (t > end) return 0;
    }
}

/* actor TAG UID PORT: become UID, print "ready PID", wait for SIGUSR1, then openat
 * /tmp/aradia-open-TAG, connect to 127.0.0.1:PORT and execve /bin/true TAG. */
static int actor(int argc, char **argv) {
    if (argc < 5) return 2;
    int uid = atoi(argv[3]);
    signal(SIGUSR1, on_usr1);
    if (uid && (setgid(uid) || setuid(uid))) return 1;
    printf("ready %d\n", getpid());
    fflush(stdout);
    wait_usr1();
    char path[64];
    snprintf(path, sizeof path, "/tmp/aradia-open-%s", argv[2]);
    int fd = openat(AT_FDCWD, path, O_RDONLY);
    if (fd >= 0) close(fd);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[4]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    connect(s, (struct sockaddr *)&a, sizeof a);
    char *args[] = {"/bin/true", argv[2], 0};
    execve("/bin/true", args, (char *[]){0});
    return 1;
}

/* twins: map a page at a fixed address, fork; parent and child each print "twin PID" and, on each
 * SIGUSR1, store 8 bytes (their pid, repeated) at that address in one instruction. */
static int twins(void) {
    volatile uint64_t *p = mmap((void *)0x5a5a0000ul, 4096, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | MAP_POPULATE, -1, 0);
    if (p != (void *)0x5a5a0000ul) return 1;
    signal(SIGUSR1, on_usr1);
    pid_t child = fork();
    if (child < 0) return 1;
    pid_t me = getpid();
    p[0] = 0;
    printf("twin %d\n", me);
    fflush(stdout);
    for (;;) {
        wait_usr1();
        *p = 0x0101010101010101ull * (uint8_t)me;
    }
}

/* listen: TCP listeners on [::1], [::] and 127.0.0.1 and a UDP socket on [::1], each on a free
 * port; prints "sock FD FAMILY PROTO ADDRESS PORT" for each, then "ready PID", and waits. */
static int listener(void) {
    struct { int family, type; const char *addr; } want[] = {
        {AF_INET6, SOCK_STREAM, "::1"}, {AF_INET6, SOCK_STREAM, "::"},
        {AF_INET, SOCK_STREAM, "127.0.0.1"}, {AF_INET6, SOCK_DGRAM, "::1"}};
    for (unsigned i = 0; i < sizeof want / sizeof want[0]; i++) {
        struct sockaddr_storage ss = {0};
        socklen_t n;
        if (want[i].family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
            a->sin6_family = AF_INET6; inet_pton(AF_INET6, want[i].addr, &a->sin6_addr); n = sizeof *a;
        } else {
            struct sockaddr_in *a = (struct sockaddr_in *)&ss;
            a->sin_family = AF_INET; inet_pton(AF_INET, want[i].addr, &a->sin_addr); n = sizeof *a;
        }
        int s = socket(want[i].family, want[i].type, 0);
        if (s < 0 || bind(s, (struct sockaddr *)&ss, n)) return 1;
        if (want[i].type == SOCK_STREAM && listen(s, 4)) return 1;
        n = sizeof ss;
        getsockname(s, (struct sockaddr *)&ss, &n);
        int port = ntohs(want[i].family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                    : ((struct sockaddr_in *)&ss)->sin_port);
        printf("sock %d %s %s %s %d\n", s, want[i].family == AF_INET6 ? "inet6" : "inet",
               want[i].type == SOCK_STREAM ? "tcp" : "udp", want[i].addr, port);
    }
    printf("ready %d\n", getpid());
    fflush(stdout);
    for (;;) pause();
}

static void *sleeper(void *arg) { (void)arg; for (;;) pause(); return 0; }

/* threads N: N threads besides the main one, all waiting; prints "ready PID". */
static int threads(int argc, char **argv) {
    int n = argc > 2 ? atoi(argv[2]) : 3;
    for (int i = 0; i < n; i++) {
        pthread_t t;
        if (pthread_create(&t, 0, sleeper, 0)) return 1;
    }
    printf("ready %d\n", getpid());
    fflush(stdout);
    for (;;) pause();
}

/* mapfile PATH...: map each file's first page from offset 0 (as a loader maps a library's headers),
 * print "ready PID", then wait. */
static int mapfile(int argc, char **argv) {
    for (int i = 2; i < argc; i++) {
        int fd = open(argv[i], O_RDONLY);
        if (fd < 0 || mmap(0, 4096, PROT_READ, MAP_PRIVATE, fd, 0) == MAP_FAILED) { perror(argv[i]); return 1; }
    }
    printf("ready %d\n", getpid());
    fflush(stdout);
    for (;;) pause();
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    if (!strcmp(argv[1], "mapfile")) return mapfile(argc, argv);
    if (!strcmp(argv[1], "ticker")) return ticker(argc, argv);
    if (!strcmp(argv[1], "actor")) return actor(argc, argv);
    if (!strcmp(argv[1], "twins")) return twins();
    if (!strcmp(argv[1], "listen")) return listener();
    if (!strcmp(argv[1], "threads")) return threads(argc, argv);
    return 2;
}
"""

OPENER_C = r"""
/* opener: print "ready PID", wait for SIGUSR1, then call libc's openat() on each path given (flags
 * alternate O_RDONLY and O_RDONLY|O_CLOEXEC) and print "open PATH FLAGS-HEX ADDR-OF-PATH RESULT" with
 * the fd or -errno; repeat on every SIGUSR1. Dynamic: libc.so.6 is the guest's. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
static volatile sig_atomic_t go;
static void on_usr1(int s) { (void)s; go = 1; }
int main(int argc, char **argv) {
    sigset_t block, old;
    signal(SIGUSR1, on_usr1);
    sigemptyset(&block); sigaddset(&block, SIGUSR1);
    sigprocmask(SIG_BLOCK, &block, &old);
    printf("ready %d\n", getpid());
    fflush(stdout);
    for (;;) {
        while (!go) sigsuspend(&old);
        go = 0;
        for (int i = 1; i < argc; i++) {
            int flags = i % 2 ? O_RDONLY : O_RDONLY | O_CLOEXEC;
            int fd = openat(AT_FDCWD, argv[i], flags);
            int result = fd >= 0 ? fd : -errno;
            printf("open %s %x %p %d\n", argv[i], flags, (void *)argv[i], result);
            if (fd >= 0) close(fd);
        }
        printf("done\n");
        fflush(stdout);
    }
}
"""


def build_multi(tmp: Path) -> bytes:
    """The static multi-call program (glibc, pthreads)."""
    return build_program(tmp, "multi", MULTI_C, ["-static", "-O2", "-s", "-pthread"])


def build_opener(tmp: Path) -> bytes:
    """The dynamic ``opener`` (links the guest's libc.so.6)."""
    return build_program(tmp, "opener", OPENER_C, ["-O2", "-s"])


XATTR_C = r"""
/* xattr set PATH NAME VALUE | xattr rm PATH NAME | xattr list PATH: extended attributes the way the
 * guest's own tools would change them (the test guest has no setfattr); errors as strerror. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/xattr.h>
int main(int argc, char **argv) {
    char names[4096];
    long r;
    if (argc == 5 && !strcmp(argv[1], "set")) r = setxattr(argv[2], argv[3], argv[4], strlen(argv[4]), 0);
    else if (argc == 4 && !strcmp(argv[1], "rm")) r = removexattr(argv[2], argv[3]);
    else if (argc == 3 && !strcmp(argv[1], "list")) {
        r = listxattr(argv[2], names, sizeof names);
        for (long i = 0; r > 0 && i < r; i += (long)strlen(names + i) + 1) puts(names + i);
        r = r < 0 ? r : 0;
    } else { fputs("usage: xattr set PATH NAME VALUE | rm PATH NAME | list PATH\n", stderr); return 2; }
    if (r) { fprintf(stderr, "xattr: %s: %s\n", argv[2], strerror(errno)); return 1; }
    return 0;
}
"""


def build_xattr(tmp: Path) -> bytes:
    """``xattr`` (static, glibc)."""
    return build_program(tmp, "xattr", XATTR_C, ["-O2", "-static"])


def install_cli_programs(guest: Guest, tmp: Path) -> None:
    """Install the multi-call program as ``/tmp/aradia-act``, ``/tmp/aradia-decoy`` and ``/tmp/multi``,
    and ``/tmp/opener``, in the guest."""
    install_program(guest, "multi", build_multi(tmp))
    install_program(guest, "opener", build_opener(tmp))
    guest.run("cp /tmp/multi /tmp/aradia-act && cp /tmp/multi /tmp/aradia-decoy")


# --- page cache control (static, glibc) ------------------------------------------------------------------
PCACHE_C = r"""
/* pcache resident FILE         prints "resident R of N MAP" (mincore: MAP has 1/0 per page)
 * pcache evict FILE PAGES      posix_fadvise(DONTNEED) on every other run of PAGES pages (the 2nd,
 *                              4th...), then prints what `resident` prints
 * pcache hold FILE             opens FILE read-only, prints "held PID", sleeps (for a deleted-open test)
 * pcache sleep                 prints "sleeping PID", sleeps (run as a copy to delete its executable) */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
static int resident(const char *path) {
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st)) { perror(path); return 1; }
    long n = (st.st_size + 4095) / 4096, r = 0;
    unsigned char *vec = calloc(n + 1, 1);
    if (n) {
        void *m = mmap(0, st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED || mincore(m, st.st_size, vec)) { perror("mincore"); return 1; }
        munmap(m, st.st_size);
    }
    printf("resident ");
    for (long i = 0; i < n; i++) r += vec[i] & 1;
    printf("%ld of %ld ", r, n);
    for (long i = 0; i < n; i++) putchar(vec[i] & 1 ? '1' : '0');
    putchar('\n');
    close(fd);
    return 0;
}
int main(int argc, char **argv) {
    if (argc >= 3 && !strcmp(argv[1], "resident")) return resident(argv[2]);
    if (argc >= 4 && !strcmp(argv[1], "evict")) {
        int fd = open(argv[2], O_RDONLY);
        struct stat st;
        long run = atol(argv[3]) * 4096;
        if (fd < 0 || fstat(fd, &st) || run <= 0) { perror(argv[2]); return 1; }
        for (long off = run; off < st.st_size; off += 2 * run)
            if (posix_fadvise(fd, off, run, POSIX_FADV_DONTNEED)) { perror("fadvise"); return 1; }
        close(fd);
        return resident(argv[2]);
    }
    if (argc >= 3 && !strcmp(argv[1], "hold")) {
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) { perror(argv[2]); return 1; }
        printf("held %d fd %d\n", getpid(), fd);
        fflush(stdout);
        for (;;) pause();
    }
    if (argc >= 2 && !strcmp(argv[1], "sleep")) {
        printf("sleeping %d\n", getpid());
        fflush(stdout);
        for (;;) pause();
    }
    fprintf(stderr, "usage: pcache resident|evict|hold|sleep ...\n");
    return 2;
}
"""


def build_pcache(tmp: Path) -> bytes:
    """The static ``pcache`` program: page-cache residency (mincore), eviction (fadvise), holders."""
    return build_program(tmp, "pcache", PCACHE_C, ["-static", "-O2", "-s"])


# --- AES key schedules (static, glibc) -------------------------------------------------------------------
AESKEYS_C = r"""
/* aeskeys [NOISE_BYTES]: generates an AES-128, -192 and -256 key (getrandom), expands each into a
 * heap buffer (FIPS-197 key expansion, bytes in order) and prints one line per key:
 *     key BITS HEX at VADDR
 * then, with NOISE_BYTES, fills that many bytes with random data (touched, so resident) and prints
 *     noise VADDR SIZE
 * then "ready PID" and waits. On SIGUSR1 it prints, per key, how many bits of the schedule in its
 * memory differ from a fresh expansion of the key: "diff BITS N". */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>
static uint8_t sbox[256];
static void make_sbox(void) {
    uint8_t p = 1, q = 1;
    do {
        p = p ^ (uint8_t)(p << 1) ^ (p & 0x80 ? 0x1B : 0);
        q ^= q << 1; q ^= q << 2; q ^= q << 4;
        if (q & 0x80) q ^= 0x09;
        uint8_t x = q ^ (uint8_t)((q << 1) | (q >> 7)) ^ (uint8_t)((q << 2) | (q >> 6))
                      ^ (uint8_t)((q << 3) | (q >> 5)) ^ (uint8_t)((q << 4) | (q >> 4));
        sbox[p] = x ^ 0x63;
    } while (p != 1);
    sbox[0] = 0x63;
}
static void expand(const uint8_t *key, int nk, uint8_t *w) {
    static const uint8_t rcon[] = {1, 2, 4, 8, 16, 32, 64, 128, 0x1b, 0x36};
    int total = 4 * (nk + 7);
    memcpy(w, key, 4 * nk);
    for (int i = nk; i < total; i++) {
        uint8_t t[4];
        memcpy(t, w + 4 * (i - 1), 4);
        if (i % nk == 0) {
            uint8_t u = t[0];
            t[0] = sbox[t[1]] ^ rcon[i / nk - 1]; t[1] = sbox[t[2]]; t[2] = sbox[t[3]]; t[3] = sbox[u];
        } else if (nk == 8 && i % nk == 4) {
            for (int k = 0; k < 4; k++) t[k] = sbox[t[k]];
        }
        for (int k = 0; k < 4; k++) w[4 * i + k] = w[4 * (i - nk) + k] ^ t[k];
    }
}
static uint8_t keys[3][32], *sched[3];
static const int nks[3] = {4, 6, 8};
static volatile sig_atomic_t check;
static void on_usr1(int sig) { (void)sig; check = 1; }
int main(int argc, char **argv) {
    make_sbox();
    for (int k = 0; k < 3; k++) {
        if (getrandom(keys[k], 32, 0) != 32) return 1;
        sched[k] = malloc(240 + 64);
        memset(sched[k], 0, 240 + 64);
        expand(keys[k], nks[k], sched[k]);
        printf("key %d ", 32 * nks[k]);
        for (int i = 0; i < 4 * nks[k]; i++) printf("%02x", keys[k][i]);
        printf(" at %p\n", (void *)sched[k]);
    }
    if (argc > 1) {
        size_t n = strtoull(argv[1], 0, 0);
        uint8_t *noise = malloc(n);
        for (size_t off = 0; off < n; ) {
            ssize_t got = getrandom(noise + off, n - off > 33554432 ? 33554432 : n - off, 0);
            if (got <= 0) return 1;
            off += (size_t)got;
        }
        printf("noise %p %zu\n", (void *)noise, n);
    }
    signal(SIGUSR1, on_usr1);
    printf("ready %d\n", getpid());
    fflush(stdout);
    for (;;) {
        pause();
        if (check) {
            check = 0;
            for (int k = 0; k < 3; k++) {
                uint8_t fresh[240];
                int bits = 0, total = 16 * (nks[k] + 7);
                expand(keys[k], nks[k], fresh);
                for (int i = 0; i < total; i++) bits += __builtin_popcount(fresh[i] ^ sched[k][i]);
                explicit_bzero(fresh, sizeof fresh);  /* leave no schedule of our own on the stack */
                printf("diff %d %d\n", 32 * nks[k], bits);
            }
            fflush(stdout);
        }
    }
}
"""


def build_aeskeys(tmp: Path) -> bytes:
    """The static ``aeskeys`` program: AES-128/192/256 schedules in its heap, keys on stdout."""
    return build_program(tmp, "aeskeys", AESKEYS_C, ["-static", "-O2", "-s"])


# --- arm64 (AArch64), static, no libc -----------------------------------------------------------------
A64_SYS_C = r"""
typedef unsigned long u64;
static long sys3(long nr, long a, long b, long c) {
    register long x8 __asm__("x8") = nr;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    __asm__ volatile("svc #0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2) : "memory");
    return x0;
}
static u64 num(const char *s) { u64 v = 0; while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0'); return v; }
static char *fmt(char *p, long sv) {
    char b[24]; int n = 0; u64 v = sv < 0 ? (u64)-sv : (u64)sv;
    if (sv < 0) *p++ = '-';
    do { b[n++] = '0' + v % 10; v /= 10; } while (v);
    while (n) *p++ = b[--n];
    return p;
}
static char *put(char *p, const char *s) { while (*s) *p++ = *s++; return p; }
"""

A64_LOOP_C = A64_SYS_C + r"""
/* a64loop N [NR]: N syscalls number NR (default 173, getppid) with zero arguments, then "calls N ns T"
 * with T from CLOCK_MONOTONIC (clock_gettime as a syscall: the same line as the x86-64 loop). */
struct ts { long sec, nsec; };
static u64 now(void) { struct ts t; sys3(113, 1, (long)&t, 0); return (u64)t.sec * 1000000000ul + (u64)t.nsec; }
void cmain(long *sp) {
    long argc = sp[0]; char **argv = (char **)(sp + 1);
    u64 n = argc > 1 ? num(argv[1]) : 0, nr = argc > 2 ? num(argv[2]) : 173;
    u64 t0 = now();
    for (u64 i = 0; i < n; i++) sys3((long)nr, 0, 0, 0);
    u64 t1 = now();
    char out[80], *p = put(out, "calls ");
    p = fmt(p, (long)n);
    p = put(p, " ns ");
    p = fmt(p, (long)(t1 - t0));
    *p++ = '\n';
    sys3(64, 1, (long)out, p - out);
    sys3(93, 0, 0, 0);
}
__asm__(".globl _start\n_start:\n mov x0, sp\n bl cmain\n b .\n");
"""

A64_CALLS_C = A64_SYS_C + r"""
/* a64calls N: N getsid(0) calls, then N openat(AT_FDCWD, "/nonexistent/aradia-K", O_RDONLY) for
 * K = 0..N-1; prints "pid P sid S enoent E calls N" (S: what getsid returned every time, -1 if it
 * ever differed; E: how many openat calls failed with ENOENT). */
void cmain(long *sp) {
    long argc = sp[0]; char **argv = (char **)(sp + 1);
    u64 n = argc > 1 ? num(argv[1]) : 0;
    long sid = sys3(156, 0, 0, 0), enoent = 0;
    for (u64 i = 1; i < n; i++) if (sys3(156, 0, 0, 0) != sid) sid = -1;
    char path[40];
    for (u64 i = 0; i < n; i++) {
        char *q = put(path, "/nonexistent/aradia-");
        q = fmt(q, (long)i);
        *q = 0;
        if (sys3(56, -100, (long)path, 0) == -2) enoent++;
    }
    char out[128], *p = put(out, "pid ");
    p = fmt(p, sys3(172, 0, 0, 0));
    p = put(p, " sid "); p = fmt(p, sid);
    p = put(p, " enoent "); p = fmt(p, enoent);
    p = put(p, " calls "); p = fmt(p, (long)n);
    *p++ = '\n';
    sys3(64, 1, (long)out, p - out);
    sys3(93, 0, 0, 0);
}
__asm__(".globl _start\n_start:\n mov x0, sp\n bl cmain\n b .\n");
"""

#: arm64's generic syscall numbers the arm64 programs use: getsid (quiet: nothing else in the guest
#: calls it), getppid (every bash calls it as it starts)
A64_QUIET_NR, A64_QUIET_SYMBOL = 156, "__arm64_sys_getsid"
A64_NOISY_SYMBOL = "__arm64_sys_getppid"

A64_FLAGS = ["-static", "-nostdlib", "-Os", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
             "-fno-pie", "-no-pie", "-s", "-Wl,--build-id=none"]


def build_a64loop(tmp: Path, gcc: str) -> bytes:
    """Compile ``a64loop`` (arm64, static, no libc) with cross compiler ``gcc``; its bytes."""
    return build_program(tmp, "a64loop", A64_LOOP_C, A64_FLAGS, gcc=gcc)


def build_a64calls(tmp: Path, gcc: str) -> bytes:
    """Compile ``a64calls`` (arm64, static, no libc) with cross compiler ``gcc``; its bytes."""
    return build_program(tmp, "a64calls", A64_CALLS_C, A64_FLAGS, gcc=gcc)
