"""Guest programs for the command-line tests, built on the host and copied in over ssh.

One static multi-call program (its first argument picks the part; its comm is the name it is
installed as, so the same bytes serve as ``aradia-act`` and ``aradia-decoy``), and one dynamic
program calling libc (for user-space probes). Each prints what it did as the guest saw it, so the
tests compare aradia's view with the guest's own words.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from guest_programs import _build_static

if TYPE_CHECKING:
    from aradia.lab.launcher import Guest

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

int main(int argc, char **argv) {
    if (argc < 2) return 2;
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
    return _build_static(tmp, "multi", MULTI_C, ["-O2", "-s", "-pthread"])


def build_opener(tmp: Path) -> bytes:
    """The dynamic ``opener`` (links the guest's libc.so.6)."""
    src, exe = tmp / "opener.c", tmp / "opener"
    src.write_text(OPENER_C)
    subprocess.run(["gcc", "-O2", "-s", "-o", str(exe), str(src)], check=True, capture_output=True, timeout=60)
    return exe.read_bytes()


def copy_in(guest: Guest, path: str, data: bytes) -> None:
    """Copy ``data`` into the guest as executable ``path`` (over ssh: fast for large programs)."""
    subprocess.run([*guest.ssh_argv(), f"cat > {path} && chmod +x {path}"], input=data, check=True,
                   capture_output=True, timeout=120)


def install(guest: Guest, tmp: Path) -> None:
    """Install the multi-call program as ``/tmp/aradia-act``, ``/tmp/aradia-decoy``, ``/tmp/multi``
    and ``/tmp/opener`` in the guest."""
    copy_in(guest, "/tmp/multi", build_multi(tmp))
    copy_in(guest, "/tmp/opener", build_opener(tmp))
    guest.run("cp /tmp/multi /tmp/aradia-act && cp /tmp/multi /tmp/aradia-decoy")
