/*
 * aradia's TCG plugin: count (and log) executions of target guest-virtual addresses, without
 * ever stopping the VM; where the QEMU allows it, capture a syscall's arguments with the hit.
 *
 * Load:  -plugin counter.so,shm=/dev/shm/FILE
 * FILE is created and laid out by aradia (aradia/trace/pluginshm.py, class PluginShm), which also
 * owns the layout constants below: keep both in step (ARADIA_LAYOUT is checked at load).
 *
 * Targets live in the shared file, so aradia changes them while the guest runs. TCG decides what
 * to instrument when it translates a block, so after a change aradia forces re-translation of the
 * old and the new address (a GDB-stub write of the byte already there). A translation bakes the
 * target's slot index and generation into the callback; a hit whose generation no longer matches
 * the slot (a stale translation not yet flushed) is dropped and counted as stale.
 *
 * Per hit, the exec callback adds one to the vCPU's own counter and, if the target asks for it,
 * appends (slot, address, CLOCK_MONOTONIC ns) to the vCPU's own ring. Each vCPU's counters and
 * rings (each head on a cache line of its own) are written only by that vCPU's thread: no atomic
 * read-modify-write and no shared cache line on the hot path. The rings are lossy: the reader
 * notices from the head that it fell behind by more than the ring.
 *
 * Syscall arguments (TF_ARGS): a target on `__x64_sys_NAME(const struct pt_regs *regs)` reads rdi,
 * then the six argument slots of *regs at the byte offsets aradia put in the slot's argspec (aradia
 * takes them from the kernel's BTF: no struct layout is compiled in here), and optionally the
 * first bytes behind one of them (TF_DATA, e.g. a path). The record goes to the vCPU's args ring
 * before the hit that points at it is published.
 *
 * Syscall events (TF_EVENT, needs TF_ARGS): instead of a hit, the vCPU appends one self-contained
 * record to its event ring: the arguments, the task (pid, tgid, uid, comm: the per-CPU current task
 * read at gs_base + current_off, field offsets from aradia, which takes them from BTF), and the guest
 * memory behind pointer arguments as (address, bytes) regions: a NUL-terminated string at
 * argspec.data_arg (TF_DATA), a NULL-terminated argv array and its strings at argspec.argv_arg
 * (TF_ARGV), each bounded (STR_MAX, ARGV_MAX, EVENT_DATA; EV_TRUNC says a bound cut). aradia decodes
 * the record with the same decoder the stop path uses, reading those regions. The event filter
 * (pids/tgids, uids, comms) in the header is applied before anything is written: a filtered call
 * costs the task read only; with cache_task set (aradia armed TF_SWITCH targets on the context
 * switch, comm and credential changes) not even that: each vCPU keeps its task's identity and the
 * filter's verdict until a TF_SWITCH target runs on it or targets_version changes. aradia sets the
 * filter before it activates event targets.
 *
 * Compile-time capabilities come from the header of the installed QEMU (aradia/lab/plugin_build.py
 * detects them):
 *   ARADIA_HAVE_INSN_INLINE  qemu_plugin_register_vcpu_insn_exec_inline (QEMU < 9): a counter
 *                            add emitted into the translated code, no call; one counter per target
 *                            shared by all vCPUs and not atomic, so exact only on one vCPU.
 *   ARADIA_HAVE_READ_REGISTER  qemu_plugin_get_registers + qemu_plugin_read_register (QEMU >= 9)
 *   ARADIA_HAVE_READ_MEMORY    qemu_plugin_read_memory_vaddr (QEMU >= 9.2)
 * Argument capture needs both of the last two; without them an args target is a plain logged hit.
 * No glib of our own: QEMU >= 9's header includes <glib.h> for GArray/GByteArray, which plugin_build.py
 * satisfies with a minimal stand-in when glib's headers are not installed (QEMU links glib, so
 * the few g_* calls below resolve in the QEMU process).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#if defined(ARADIA_HAVE_READ_REGISTER) && defined(ARADIA_HAVE_READ_MEMORY)
#define ARADIA_ARGS 1
#endif

#define ARADIA_MAGIC 0x31474c5044415241ULL /* "ARADPLG1" little-endian */
#define ARADIA_LAYOUT 4
#define MAX_TARGETS 64
#define HEADER_SIZE 4096
#define NARGS 6
#define DATA_MAX 64        /* bytes copied behind a pointer argument */
#define ARGS_SPAN_MAX 256  /* the six slots are read from pt_regs in one span of at most this */

#define TF_ACTIVE 1u
#define TF_LOG 2u
#define TF_INLINE 4u
#define TF_ARGS 8u         /* capture the six syscall arguments (needs TF_LOG) */
#define TF_DATA 16u        /* and the first bytes at argument argspec.data_arg */
#define TF_EVENT 32u       /* write a syscall event record (task, filter, memory) instead of a hit */
#define TF_ARGV 64u        /* TF_EVENT: the argv array at argument argspec.argv_arg and its strings */
#define TF_SWITCH 128u     /* the vCPU's current task (or its comm, pid, creds) may change here */

#define EVENT_SIZE 1024
#define EVENT_DATA (EVENT_SIZE - 104)
#define STR_MAX 256        /* bytes of one string captured at most (with its NUL) */
#define ARGV_MAX 32        /* argv pointers captured at most */
#define FILTER_MAX 8
#define COMM_LEN 16

#define EV_ARGS 1u         /* event.args are valid */
#define EV_TASK 2u         /* pid, tgid, uid, comm are valid */
#define EV_TRUNC 4u        /* a bound cut the captured memory short */
#define EV_FAULT 8u        /* a read of guest memory behind a pointer failed */

#define CAP_INSN_INLINE 1u
#define CAP_READ_REGISTER 2u
#define CAP_READ_MEMORY 4u
#define CAP_SYSCALL_ARGS 8u /* set once a vCPU found rdi: args capture works */
#define CAP_TASK 16u        /* set once a vCPU found gs_base: events carry their task */

#define HIT_ARGS 1u        /* hit.args_seq names this vCPU's args record of the hit */

#define AR_ARGS 1u         /* argrec.args are valid */
#define AR_DATA 2u         /* argrec.data holds data_len bytes */

struct target {          /* 32 bytes, written by aradia */
    uint64_t vaddr;
    uint64_t gen;        /* bumped by aradia whenever the slot changes; never 0 while active */
    uint32_t flags;
    uint32_t pad0;
    uint64_t pad1;
};

struct argspec {         /* 16 bytes, written by aradia: how to capture a slot's arguments */
    uint16_t off[NARGS]; /* byte offsets of di, si, dx, r10, r8, r9 in struct pt_regs */
    uint8_t data_arg;    /* TF_DATA: the argument (0..5) that points at the bytes to copy */
    uint8_t data_len;    /* TF_DATA: how many (1..DATA_MAX); with TF_EVENT 0 means a string (to STR_MAX) */
    uint8_t argv_arg;    /* TF_ARGV: the argument (0..5) that points at a NULL-terminated argv */
    uint8_t pad0;
};

struct evconf {          /* 248 bytes at 3328, written by aradia: syscall events */
    uint64_t events_off;     /* max_vcpus event rings of RING_HEAD_SIZE + event_entries * EVENT_SIZE */
    uint32_t event_entries;  /* a power of two */
    uint32_t event_size;     /* EVENT_SIZE */
    uint64_t current_off;    /* per-CPU offset of the current task pointer (0: tasks unknown) */
    uint16_t task_pid, task_tgid, task_comm, task_real_cred, cred_uid, pad0[3];
    uint32_t npids, nuids, ncomms;       /* filter sizes, 0: any */
    uint32_t cache_task;                 /* TF_SWITCH targets are armed: a vCPU may keep its task's
                                            identity and filter verdict until one of them runs */
    int32_t pids[FILTER_MAX];            /* a task passes when its pid or tgid is one of them */
    uint32_t uids[FILTER_MAX];
    char comms[FILTER_MAX][COMM_LEN];
};

struct header {
    /* 0: written by aradia at creation */
    uint64_t magic;
    uint32_t layout;
    uint32_t header_size;
    uint32_t max_targets;
    uint32_t max_vcpus;
    uint32_t ring_entries;   /* hits per vCPU ring, a power of two */
    uint32_t args_entries;   /* args records per vCPU ring, a power of two */
    uint64_t counters_off;   /* max_vcpus * max_targets u64, vCPU-major */
    uint64_t inline_off;     /* max_targets * 64 bytes: one u64 per cache line */
    uint64_t ring_off;       /* max_vcpus hit rings of ring_block bytes: head line, then entries */
    uint64_t file_size;
    /* 64: written by the plugin */
    uint32_t plugin_api;     /* QEMU_PLUGIN_VERSION built against */
    uint32_t qemu_api_cur;   /* the running QEMU's current plugin API */
    uint32_t smp_vcpus;
    uint32_t caps;
    uint64_t plugin_pid;
    uint64_t loaded_ns;
    uint64_t translations;   /* translated blocks seen */
    uint64_t instrumented;   /* instructions given a probe */
    uint64_t stale_hits;     /* hits of stale translations, dropped */
    uint64_t bad_vcpu;       /* hits from a vCPU index >= max_vcpus, dropped */
    /* 128: written by aradia */
    uint64_t targets_version;
    uint64_t args_off;       /* max_vcpus args rings of args_block bytes: head line, then records */
    uint64_t bases_off;      /* aradia's own (count bases); the plugin never touches it */
    uint8_t pad1[40];
    /* 192: written by the plugin */
    uint64_t arg_faults;     /* args or data the plugin could not read (register or memory) */
    uint8_t pad2[56];
    /* 256 */
    struct target targets[MAX_TARGETS];
    /* 2304 */
    struct argspec argspecs[MAX_TARGETS];
    /* 3328 */
    struct evconf ev;
    uint8_t pad3[8];
    /* 3584: written by the plugin */
    uint64_t filtered;       /* event hits the filter dropped */
    uint64_t event_faults;   /* event hits whose task could not be read (then filtered if a filter is set) */
};

struct event {           /* EVENT_SIZE bytes */
    uint64_t time_ns;
    uint64_t seq;        /* its position in the ring */
    uint32_t target;
    uint32_t status;     /* EV_* */
    int32_t pid, tgid;
    uint32_t uid;
    uint32_t data_len;   /* bytes of data used: regions of (u64 address, u16 length, bytes) */
    char comm[COMM_LEN];
    uint64_t args[NARGS];
    uint8_t data[EVENT_DATA];
};

struct hit {             /* 32 bytes */
    uint64_t time_ns;
    uint64_t vaddr;
    uint32_t target;
    uint32_t flags;      /* HIT_* */
    uint64_t args_seq;   /* HIT_ARGS: position of the hit's record in the vCPU's args ring */
};

struct argrec {          /* 128 bytes */
    uint64_t args[NARGS];
    uint64_t seq;        /* its position in the ring (a check for the reader) */
    uint32_t status;     /* AR_* */
    uint32_t data_len;
    uint8_t data[DATA_MAX];
};

#define RING_HEAD_SIZE 64  /* a ring's head (entries ever written) alone on a cache line */

_Static_assert(sizeof(struct target) == 32, "target layout");
_Static_assert(sizeof(struct argspec) == 16, "argspec layout");
_Static_assert(sizeof(struct hit) == 32, "hit layout");
_Static_assert(sizeof(struct argrec) == 128, "argrec layout");
_Static_assert(__builtin_offsetof(struct header, plugin_api) == 64, "header layout");
_Static_assert(__builtin_offsetof(struct header, targets_version) == 128, "header layout");
_Static_assert(__builtin_offsetof(struct header, arg_faults) == 192, "header layout");
_Static_assert(__builtin_offsetof(struct header, targets) == 256, "header layout");
_Static_assert(__builtin_offsetof(struct header, argspecs) == 2304, "header layout");
_Static_assert(__builtin_offsetof(struct header, ev) == 3328, "header layout");
_Static_assert(sizeof(struct evconf) == 248, "evconf layout");
_Static_assert(__builtin_offsetof(struct header, filtered) == 3584, "header layout");
_Static_assert(sizeof(struct event) == EVENT_SIZE, "event layout");
_Static_assert(sizeof(struct header) <= HEADER_SIZE, "header size");

static struct header *hdr;
static uint64_t *counters;
static uint64_t *inline_counts;
static char *rings;
static uint64_t ring_block;
static uint64_t ring_mask;
static uint32_t max_vcpus;

#ifdef ARADIA_ARGS
static char *args_rings;
static uint64_t args_block;
static uint64_t args_mask;
static char *event_rings;
static uint64_t event_block;
static uint64_t event_mask;
struct vcpu_regs {       /* per vCPU, used only on its thread */
    struct qemu_plugin_register *rdi;
    struct qemu_plugin_register *gs_base;
    GByteArray *buf;
    bool task_known;     /* the fields below describe the current task (see evconf.cache_task) */
    bool task_read;      /* its identity could be read */
    bool task_passes;    /* the filter's verdict */
    uint64_t task_version; /* targets_version they were read under */
    int32_t pid, tgid;
    uint32_t uid;
    char comm[COMM_LEN];
};
static struct vcpu_regs *vregs;
#endif

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void log_hit(unsigned int vcpu, unsigned int idx, uint64_t vaddr, uint32_t flags, uint64_t args_seq)
{
    char *block = rings + (uint64_t)vcpu * ring_block;
    uint64_t *head = (uint64_t *)block;
    uint64_t pos = *head; /* only this vCPU's thread writes it */
    struct hit *h = (struct hit *)(block + RING_HEAD_SIZE) + (pos & ring_mask);
    h->time_ns = now_ns();
    h->vaddr = vaddr;
    h->target = idx;
    h->flags = flags;
    h->args_seq = args_seq;
    __atomic_store_n(head, pos + 1, __ATOMIC_RELEASE);
}

/* Count a hit; its slot's flags if it is current (else 0: stale or from a bad vCPU, dropped). */
static uint32_t count_hit(unsigned int vcpu, uint64_t udata, unsigned int *idx_out)
{
    unsigned int idx = (unsigned int)(udata % MAX_TARGETS);
    struct target *t = &hdr->targets[idx];
    if (__atomic_load_n(&t->gen, __ATOMIC_RELAXED) != udata / MAX_TARGETS) {
        __atomic_fetch_add(&hdr->stale_hits, 1, __ATOMIC_RELAXED);
        return 0;
    }
    if (vcpu >= max_vcpus) {
        __atomic_fetch_add(&hdr->bad_vcpu, 1, __ATOMIC_RELAXED);
        return 0;
    }
    /* only this vCPU's thread writes this word: a plain add, published with a relaxed store */
    uint64_t *c = &counters[(uint64_t)vcpu * MAX_TARGETS + idx];
    __atomic_store_n(c, *c + 1, __ATOMIC_RELAXED);
    *idx_out = idx;
    return __atomic_load_n(&t->flags, __ATOMIC_RELAXED) | TF_ACTIVE;
}

static void on_hit(unsigned int vcpu, void *udata)
{
    unsigned int idx;
    uint32_t flags = count_hit(vcpu, (uint64_t)(uintptr_t)udata, &idx);
    if (flags & TF_LOG) {
        log_hit(vcpu, idx, __atomic_load_n(&hdr->targets[idx].vaddr, __ATOMIC_RELAXED), 0, 0);
    }
}

#ifdef ARADIA_ARGS
static bool read_mem(GByteArray *buf, uint64_t vaddr, size_t len)
{
    return qemu_plugin_read_memory_vaddr(vaddr, buf, len) && buf->len >= len;
}

/* Fill the vCPU's next args record for slot idx; returns its position in the args ring. */
static uint64_t capture_args(unsigned int vcpu, unsigned int idx, uint32_t flags)
{
    char *block = args_rings + (uint64_t)vcpu * args_block;
    uint64_t *head = (uint64_t *)block;
    uint64_t pos = *head; /* only this vCPU's thread writes it */
    struct argrec *r = (struct argrec *)(block + RING_HEAD_SIZE) + (pos & args_mask);
    struct argspec spec;
    memcpy(&spec, &hdr->argspecs[idx], sizeof spec);
    struct vcpu_regs *v = &vregs[vcpu];
    uint32_t status = 0, data_len = 0;
    uint64_t regs_ptr = 0;
    bool fault = true;
    if (v->rdi != NULL && v->buf != NULL) {
        g_byte_array_set_size(v->buf, 0);
        if (qemu_plugin_read_register(v->rdi, v->buf) == 8 && v->buf->len >= 8) {
            memcpy(&regs_ptr, v->buf->data, 8);
            unsigned int lo = spec.off[0], hi = spec.off[0];
            for (int k = 1; k < NARGS; k++) {
                lo = spec.off[k] < lo ? spec.off[k] : lo;
                hi = spec.off[k] > hi ? spec.off[k] : hi;
            }
            hi += 8;
            if (hi - lo <= ARGS_SPAN_MAX && read_mem(v->buf, regs_ptr + lo, hi - lo)) {
                for (int k = 0; k < NARGS; k++) {
                    memcpy(&r->args[k], v->buf->data + (spec.off[k] - lo), 8);
                }
                status |= AR_ARGS;
                fault = false;
            }
        }
    }
    if ((status & AR_ARGS) && (flags & TF_DATA) && spec.data_arg < NARGS && spec.data_len > 0) {
        uint64_t p = r->args[spec.data_arg];
        uint32_t want = spec.data_len < DATA_MAX ? spec.data_len : DATA_MAX;
        uint64_t room = 4096 - (p & 4095); /* bytes up to the end of p's page */
        if (read_mem(v->buf, p, want)) {
            data_len = want;
        } else if (room < want && read_mem(v->buf, p, room)) {
            data_len = (uint32_t)room; /* the next page is not mapped: what there is */
        }
        if (data_len) {
            memcpy(r->data, v->buf->data, data_len);
            status |= AR_DATA;
        } else {
            fault = true;
        }
    }
    if (fault) {
        __atomic_fetch_add(&hdr->arg_faults, 1, __ATOMIC_RELAXED);
    }
    r->seq = pos;
    r->status = status;
    r->data_len = data_len;
    __atomic_store_n(head, pos + 1, __ATOMIC_RELEASE);
    return pos;
}

/* Read a register of this vCPU as a u64 (false: not readable). */
static bool read_reg64(struct vcpu_regs *v, struct qemu_plugin_register *reg, uint64_t *out)
{
    if (reg == NULL) {
        return false;
    }
    g_byte_array_set_size(v->buf, 0);
    if (qemu_plugin_read_register(reg, v->buf) != 8 || v->buf->len < 8) {
        return false;
    }
    memcpy(out, v->buf->data, 8);
    return true;
}

static bool read_u64(struct vcpu_regs *v, uint64_t addr, uint64_t *out)
{
    if (!read_mem(v->buf, addr, 8)) {
        return false;
    }
    memcpy(out, v->buf->data, 8);
    return true;
}

/* The six syscall arguments from the pt_regs at rdi (false: unreadable). */
static bool read_args(struct vcpu_regs *v, const struct argspec *spec, uint64_t args[NARGS])
{
    uint64_t regs_ptr;
    if (!read_reg64(v, v->rdi, &regs_ptr)) {
        return false;
    }
    unsigned int lo = spec->off[0], hi = spec->off[0];
    for (int k = 1; k < NARGS; k++) {
        lo = spec->off[k] < lo ? spec->off[k] : lo;
        hi = spec->off[k] > hi ? spec->off[k] : hi;
    }
    hi += 8;
    if (hi - lo > ARGS_SPAN_MAX || !read_mem(v->buf, regs_ptr + lo, hi - lo)) {
        return false;
    }
    for (int k = 0; k < NARGS; k++) {
        memcpy(&args[k], v->buf->data + (spec->off[k] - lo), 8);
    }
    return true;
}

/* The current task's identity; false when it cannot be read. */
static bool read_task(struct vcpu_regs *v, struct event *e)
{
    const struct evconf *c = &hdr->ev;
    uint64_t gs, task, cred;
    if (c->current_off == 0 || !read_reg64(v, v->gs_base, &gs) || gs == 0 ||
        !read_u64(v, gs + c->current_off, &task) || task == 0) {
        return false;
    }
    uint64_t lo = c->task_pid < c->task_tgid ? c->task_pid : c->task_tgid;
    if (!read_mem(v->buf, task + lo, 8 + (c->task_pid > c->task_tgid ? c->task_pid - c->task_tgid
                                                                      : c->task_tgid - c->task_pid))) {
        return false;
    }
    memcpy(&e->pid, v->buf->data + (c->task_pid - lo), 4);
    memcpy(&e->tgid, v->buf->data + (c->task_tgid - lo), 4);
    if (!read_mem(v->buf, task + c->task_comm, COMM_LEN)) {
        return false;
    }
    memcpy(e->comm, v->buf->data, COMM_LEN);
    e->comm[COMM_LEN - 1] = 0;
    e->uid = UINT32_MAX;
    if (read_u64(v, task + c->task_real_cred, &cred) && cred != 0 && read_mem(v->buf, cred + c->cred_uid, 4)) {
        memcpy(&e->uid, v->buf->data, 4);
    }
    return true;
}

static bool passes(const struct event *e, bool have_task)
{
    const struct evconf *c = &hdr->ev;
    uint32_t np = c->npids < FILTER_MAX ? c->npids : FILTER_MAX;
    uint32_t nu = c->nuids < FILTER_MAX ? c->nuids : FILTER_MAX;
    uint32_t nc = c->ncomms < FILTER_MAX ? c->ncomms : FILTER_MAX;
    if (np == 0 && nu == 0 && nc == 0) {
        return true;
    }
    if (!have_task) {
        return false;
    }
    bool ok = np == 0;
    for (uint32_t i = 0; i < np && !ok; i++) {
        ok = c->pids[i] == e->pid || c->pids[i] == e->tgid;
    }
    bool uok = nu == 0;
    for (uint32_t i = 0; i < nu && !uok; i++) {
        uok = c->uids[i] == e->uid;
    }
    bool cok = nc == 0;
    for (uint32_t i = 0; i < nc && !cok; i++) {
        cok = strncmp(c->comms[i], e->comm, COMM_LEN) == 0;
    }
    return ok && uok && cok;
}

/* Append a region header (address, length) and return where its bytes go (NULL: no room). */
static uint8_t *region(struct event *e, uint64_t addr, uint16_t len)
{
    if (e->data_len + 10u + len > EVENT_DATA) {
        return NULL;
    }
    uint8_t *at = e->data + e->data_len;
    memcpy(at, &addr, 8);
    memcpy(at + 8, &len, 2);
    e->data_len += 10u + len;
    return at + 10;
}

/* Capture the NUL-terminated string at p (at most STR_MAX bytes with the NUL), page by page. */
static void capture_string(struct vcpu_regs *v, struct event *e, uint64_t p)
{
    if (p == 0) {
        return;
    }
    uint32_t got = 0;
    while (got < STR_MAX) {
        uint32_t room = 4096 - (uint32_t)((p + got) & 4095);
        uint32_t want = STR_MAX - got < room ? STR_MAX - got : room;
        if (!read_mem(v->buf, p + got, want)) {
            e->status |= EV_FAULT;
            return;
        }
        void *nul = memchr(v->buf->data, 0, want);
        uint16_t len = nul ? (uint16_t)((uint8_t *)nul - v->buf->data + 1) : (uint16_t)want;
        uint8_t *dst = region(e, p + got, len);
        if (dst == NULL) {
            e->status |= EV_TRUNC;
            return;
        }
        memcpy(dst, v->buf->data, len);
        if (nul) {
            return;
        }
        got += want;
    }
    e->status |= EV_TRUNC;
}

/* Capture len bytes at p (a buffer, a sockaddr); up to the end of p's page if the next is unmapped. */
static void capture_bytes(struct vcpu_regs *v, struct event *e, uint64_t p, uint32_t len)
{
    uint32_t room = 4096 - (uint32_t)(p & 4095);
    if (p == 0) {
        return;
    }
    if (!read_mem(v->buf, p, len)) {
        if (room >= len || !read_mem(v->buf, p, room)) {
            e->status |= EV_FAULT;
            return;
        }
        len = room;
    }
    uint8_t *dst = region(e, p, (uint16_t)len);
    if (dst == NULL) {
        e->status |= EV_TRUNC;
        return;
    }
    memcpy(dst, v->buf->data, len);
}

/* Capture a NULL-terminated array of string pointers at p (with its NULL) and the strings. */
static void capture_argv(struct vcpu_regs *v, struct event *e, uint64_t p)
{
    uint64_t ptrs[ARGV_MAX + 1];
    unsigned int n = 0;
    bool end = false;
    if (p == 0) {
        return;
    }
    while (n <= ARGV_MAX) {
        if (!read_u64(v, p + 8u * n, &ptrs[n])) {
            e->status |= EV_FAULT;
            break;
        }
        if (ptrs[n] == 0) {
            end = true;
            n++;
            break;
        }
        n++;
    }
    if (!end) {
        e->status |= EV_TRUNC;
        n = n > ARGV_MAX ? ARGV_MAX : n;
    }
    if (n == 0) {
        return;
    }
    uint8_t *dst = region(e, p, (uint16_t)(8u * n));
    if (dst == NULL) {
        e->status |= EV_TRUNC;
        return;
    }
    memcpy(dst, ptrs, 8u * n);
    for (unsigned int i = 0; i < n && ptrs[i] != 0; i++) {
        capture_string(v, e, ptrs[i]);
    }
}

/* A syscall event for slot idx: task, filter, arguments, memory; into the vCPU's event ring. */
static void emit_event(unsigned int vcpu, unsigned int idx, uint32_t flags)
{
    struct vcpu_regs *v = &vregs[vcpu];
    if (v->buf == NULL) {
        return;
    }
    uint64_t version = __atomic_load_n(&hdr->targets_version, __ATOMIC_ACQUIRE);
    if (!v->task_known || v->task_version != version ||
        !__atomic_load_n(&hdr->ev.cache_task, __ATOMIC_RELAXED)) {
        struct event tmp;
        tmp.pid = tmp.tgid = -1;
        tmp.uid = UINT32_MAX;
        memset(tmp.comm, 0, COMM_LEN);
        v->task_read = read_task(v, &tmp);
        v->task_passes = passes(&tmp, v->task_read);
        v->pid = tmp.pid;
        v->tgid = tmp.tgid;
        v->uid = tmp.uid;
        memcpy(v->comm, tmp.comm, COMM_LEN);
        v->task_version = version;
        v->task_known = true;
        if (!v->task_read) {
            __atomic_fetch_add(&hdr->event_faults, 1, __ATOMIC_RELAXED);
            v->task_known = false; /* try again at the next call */
        }
    }
    bool have_task = v->task_read;
    if (!v->task_passes) {
        __atomic_fetch_add(&hdr->filtered, 1, __ATOMIC_RELAXED);
        return;
    }
    char *block = event_rings + (uint64_t)vcpu * event_block;
    uint64_t *head = (uint64_t *)block;
    uint64_t pos = *head; /* only this vCPU's thread writes it */
    struct event *e = (struct event *)(block + RING_HEAD_SIZE) + (pos & event_mask);
    struct argspec spec;
    memcpy(&spec, &hdr->argspecs[idx], sizeof spec);
    e->time_ns = now_ns();
    e->target = idx;
    e->status = have_task ? EV_TASK : 0;
    e->pid = v->pid;
    e->tgid = v->tgid;
    e->uid = v->uid;
    memcpy(e->comm, v->comm, COMM_LEN);
    e->data_len = 0;
    if (read_args(v, &spec, e->args)) {
        e->status |= EV_ARGS;
        if ((flags & TF_DATA) && spec.data_arg < NARGS && spec.data_len == 0) {
            capture_string(v, e, e->args[spec.data_arg]);
        } else if ((flags & TF_DATA) && spec.data_arg < NARGS) {
            capture_bytes(v, e, e->args[spec.data_arg], spec.data_len);
        }
        if ((flags & TF_ARGV) && spec.argv_arg < NARGS) {
            capture_argv(v, e, e->args[spec.argv_arg]);
        }
    } else {
        memset(e->args, 0, sizeof e->args);
        __atomic_fetch_add(&hdr->arg_faults, 1, __ATOMIC_RELAXED);
    }
    e->seq = pos;
    __atomic_store_n(head, pos + 1, __ATOMIC_RELEASE);
}

/* A TF_SWITCH target: the vCPU's task identity must be read again at its next event. */
static void on_switch(unsigned int vcpu, void *udata)
{
    unsigned int idx;
    if (count_hit(vcpu, (uint64_t)(uintptr_t)udata, &idx) & TF_SWITCH) {
        vregs[vcpu].task_known = false;
    }
}

static void on_hit_args(unsigned int vcpu, void *udata)
{
    unsigned int idx;
    uint32_t flags = count_hit(vcpu, (uint64_t)(uintptr_t)udata, &idx);
    if (!(flags & TF_LOG)) {
        return;
    }
    if (flags & TF_EVENT) {
        emit_event(vcpu, idx, flags);
        return;
    }
    uint64_t vaddr = __atomic_load_n(&hdr->targets[idx].vaddr, __ATOMIC_RELAXED);
    if (flags & TF_ARGS) {
        log_hit(vcpu, idx, vaddr, HIT_ARGS, capture_args(vcpu, idx, flags));
    } else {
        log_hit(vcpu, idx, vaddr, 0, 0);
    }
}

static void on_vcpu_init(qemu_plugin_id_t id, unsigned int vcpu)
{
    (void)id;
    if (vcpu >= max_vcpus) {
        return;
    }
    GArray *regs = qemu_plugin_get_registers();
    if (regs == NULL) {
        return;
    }
    const qemu_plugin_reg_descriptor *d = (const qemu_plugin_reg_descriptor *)(void *)regs->data;
    for (unsigned int i = 0; i < regs->len; i++) {
        if (d[i].name != NULL && strcmp(d[i].name, "rdi") == 0) {
            vregs[vcpu].rdi = d[i].handle;
        } else if (d[i].name != NULL && strcmp(d[i].name, "gs_base") == 0) {
            vregs[vcpu].gs_base = d[i].handle;
        }
    }
    g_array_free(regs, true);
    if (vregs[vcpu].rdi != NULL) {
        if (vregs[vcpu].buf == NULL) {
            vregs[vcpu].buf = g_byte_array_new();
        }
        __atomic_fetch_or(&hdr->caps, CAP_SYSCALL_ARGS, __ATOMIC_RELEASE);
        if (vregs[vcpu].gs_base != NULL) {
            __atomic_fetch_or(&hdr->caps, CAP_TASK, __ATOMIC_RELEASE);
        }
    }
}
#endif

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    __atomic_fetch_add(&hdr->translations, 1, __ATOMIC_RELAXED);
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (n == 0) {
        return;
    }
    uint64_t start = qemu_plugin_tb_vaddr(tb);
    struct qemu_plugin_insn *last = qemu_plugin_tb_get_insn(tb, n - 1);
    uint64_t end = qemu_plugin_insn_vaddr(last) + qemu_plugin_insn_size(last);

    /* snapshot the targets this block can contain; most blocks contain none */
    unsigned int want[MAX_TARGETS];
    uint64_t want_vaddr[MAX_TARGETS], want_gen[MAX_TARGETS];
    uint32_t want_flags[MAX_TARGETS];
    unsigned int nwant = 0;
    for (unsigned int i = 0; i < MAX_TARGETS; i++) {
        struct target *t = &hdr->targets[i];
        uint32_t flags = __atomic_load_n(&t->flags, __ATOMIC_ACQUIRE);
        if (!(flags & TF_ACTIVE)) {
            continue;
        }
        uint64_t va = __atomic_load_n(&t->vaddr, __ATOMIC_RELAXED);
        if (va - start < end - start) {
            want[nwant] = i;
            want_vaddr[nwant] = va;
            want_gen[nwant] = __atomic_load_n(&t->gen, __ATOMIC_RELAXED);
            want_flags[nwant] = flags;
            nwant++;
        }
    }
    if (nwant == 0) {
        return;
    }
    for (size_t k = 0; k < n; k++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, k);
        uint64_t va = qemu_plugin_insn_vaddr(insn);
        for (unsigned int j = 0; j < nwant; j++) {
            if (want_vaddr[j] != va) {
                continue;
            }
            __atomic_fetch_add(&hdr->instrumented, 1, __ATOMIC_RELAXED);
#ifdef ARADIA_HAVE_INSN_INLINE
            if (want_flags[j] & TF_INLINE) {
                qemu_plugin_register_vcpu_insn_exec_inline(insn, QEMU_PLUGIN_INLINE_ADD_U64,
                                                           &inline_counts[want[j] * 8], 1);
                continue;
            }
#endif
            void *udata = (void *)(uintptr_t)(want_gen[j] * MAX_TARGETS + want[j]);
#ifdef ARADIA_ARGS
            if (want_flags[j] & TF_SWITCH) {
                qemu_plugin_register_vcpu_insn_exec_cb(insn, on_switch, QEMU_PLUGIN_CB_NO_REGS, udata);
                continue;
            }
            if ((want_flags[j] & (TF_ARGS | TF_LOG)) == (TF_ARGS | TF_LOG)) {
                /* reads registers: QEMU must have them in the CPU state at this instruction */
                qemu_plugin_register_vcpu_insn_exec_cb(insn, on_hit_args, QEMU_PLUGIN_CB_R_REGS, udata);
                continue;
            }
#endif
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_hit, QEMU_PLUGIN_CB_NO_REGS, udata);
        }
    }
}

static int fail(const char *why, const char *path)
{
    char buf[512];
    snprintf(buf, sizeof buf, "aradia counter plugin: %s%s%s\n", why, path ? ": " : "", path ? path : "");
    qemu_plugin_outs(buf);
    fputs(buf, stderr);
    return -1;
}

static bool within(uint64_t off, uint64_t len, uint64_t size)
{
    return off <= size && len <= size - off;
}

static bool pow2(uint32_t n)
{
    return n >= 2 && !(n & (n - 1));
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    const char *path = NULL;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "shm=", 4) == 0) {
            path = argv[i] + 4;
        } else {
            return fail("unknown argument", argv[i]);
        }
    }
    if (path == NULL) {
        return fail("missing argument shm=PATH", NULL);
    }
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        return fail(strerror(errno), path);
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size < HEADER_SIZE) {
        close(fd);
        return fail("shared file too small", path);
    }
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) {
        return fail(strerror(errno), path);
    }
    struct header *h = base;
    uint64_t size = (uint64_t)st.st_size;
    if (h->magic != ARADIA_MAGIC || h->layout != ARADIA_LAYOUT || h->header_size != HEADER_SIZE ||
        h->max_targets != MAX_TARGETS || h->file_size != size || h->max_vcpus == 0 ||
        h->max_vcpus > 1024 || !pow2(h->ring_entries) || !pow2(h->args_entries) ||
        !within(h->counters_off, (uint64_t)h->max_vcpus * MAX_TARGETS * 8, size) ||
        !within(h->inline_off, MAX_TARGETS * 64, size) ||
        !within(h->ring_off, (uint64_t)h->max_vcpus *
                (RING_HEAD_SIZE + (uint64_t)h->ring_entries * sizeof(struct hit)), size) ||
        !within(h->args_off, (uint64_t)h->max_vcpus *
                (RING_HEAD_SIZE + (uint64_t)h->args_entries * sizeof(struct argrec)), size) ||
        (h->counters_off | h->inline_off | h->ring_off | h->args_off) % 64 ||
        h->counters_off < HEADER_SIZE || h->inline_off < HEADER_SIZE || h->ring_off < HEADER_SIZE ||
        h->args_off < HEADER_SIZE || h->ev.event_size != EVENT_SIZE || !pow2(h->ev.event_entries) ||
        h->ev.events_off % 64 || h->ev.events_off < HEADER_SIZE ||
        !within(h->ev.events_off, (uint64_t)h->max_vcpus *
                (RING_HEAD_SIZE + (uint64_t)h->ev.event_entries * EVENT_SIZE), size)) {
        munmap(base, (size_t)size);
        return fail("not an aradia plugin file of this layout", path);
    }
    hdr = h;
    max_vcpus = h->max_vcpus;
    counters = (uint64_t *)((char *)base + h->counters_off);
    inline_counts = (uint64_t *)((char *)base + h->inline_off);
    rings = (char *)base + h->ring_off;
    ring_block = RING_HEAD_SIZE + (uint64_t)h->ring_entries * sizeof(struct hit);
    ring_mask = h->ring_entries - 1;

    uint32_t caps = 0;
#ifdef ARADIA_HAVE_INSN_INLINE
    caps |= CAP_INSN_INLINE;
#endif
#ifdef ARADIA_HAVE_READ_REGISTER
    caps |= CAP_READ_REGISTER;
#endif
#ifdef ARADIA_HAVE_READ_MEMORY
    caps |= CAP_READ_MEMORY;
#endif
#ifdef ARADIA_ARGS
    args_rings = (char *)base + h->args_off;
    args_block = RING_HEAD_SIZE + (uint64_t)h->args_entries * sizeof(struct argrec);
    args_mask = h->args_entries - 1;
    event_rings = (char *)base + h->ev.events_off;
    event_block = RING_HEAD_SIZE + (uint64_t)h->ev.event_entries * EVENT_SIZE;
    event_mask = h->ev.event_entries - 1;
    vregs = calloc(max_vcpus, sizeof *vregs);
    if (vregs == NULL) {
        munmap(base, (size_t)size);
        hdr = NULL;
        return fail("out of memory", NULL);
    }
#endif
    h->plugin_api = QEMU_PLUGIN_VERSION;
    h->qemu_api_cur = (uint32_t)info->version.cur;
    h->smp_vcpus = info->system_emulation ? (uint32_t)info->system.smp_vcpus : 0;
    h->caps = caps; /* CAP_SYSCALL_ARGS is added when a vCPU has found its rdi */
    h->loaded_ns = now_ns();
    __atomic_store_n(&h->plugin_pid, (uint64_t)getpid(), __ATOMIC_RELEASE);

#ifdef ARADIA_ARGS
    qemu_plugin_register_vcpu_init_cb(id, on_vcpu_init);
#endif
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    return 0;
}
