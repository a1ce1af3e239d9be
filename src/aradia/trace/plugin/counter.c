/*
 * aradia's TCG plugin: count (and log) executions of target guest-virtual addresses, without
 * ever stopping the VM.
 *
 * Load:  -plugin counter.so,shm=/dev/shm/FILE
 * FILE is created and laid out by aradia (aradia/trace/plugin.py, class PluginShm), which also
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
 * ring (with its head on a cache line of its own) are written only by that vCPU's thread: no
 * atomic read-modify-write and no shared cache line on the hot path. The ring is lossy: the
 * reader notices from the head that it fell behind by more than the ring.
 *
 * Compile-time capabilities come from the header of the installed QEMU (plugin.py detects them):
 *   ARADIA_HAVE_INSN_INLINE  qemu_plugin_register_vcpu_insn_exec_inline (QEMU < 9): a counter
 *                            add emitted into the translated code, no call; one counter per target
 *                            shared by all vCPUs and not atomic, so exact only on one vCPU.
 * No glib: only libc and the plugin header.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define ARADIA_MAGIC 0x31474c5044415241ULL /* "ARADPLG1" little-endian */
#define ARADIA_LAYOUT 2
#define MAX_TARGETS 64
#define HEADER_SIZE 4096

#define TF_ACTIVE 1u
#define TF_LOG 2u
#define TF_INLINE 4u

#define CAP_INSN_INLINE 1u
#define CAP_READ_REGISTER 2u
#define CAP_READ_MEMORY 4u

struct target {          /* 32 bytes, written by aradia */
    uint64_t vaddr;
    uint64_t gen;        /* bumped by aradia whenever the slot changes; never 0 while active */
    uint32_t flags;
    uint32_t pad0;
    uint64_t pad1;
};

struct header {
    /* 0: written by aradia at creation */
    uint64_t magic;
    uint32_t layout;
    uint32_t header_size;
    uint32_t max_targets;
    uint32_t max_vcpus;
    uint32_t ring_entries;   /* per vCPU, a power of two */
    uint32_t pad0;
    uint64_t counters_off;   /* max_vcpus * max_targets u64, vCPU-major */
    uint64_t inline_off;     /* max_targets * 64 bytes: one u64 per cache line */
    uint64_t ring_off;       /* max_vcpus rings of ring_block bytes: head line, then entries */
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
    /* 128: control, written by aradia */
    uint64_t targets_version;
    uint8_t pad1[120];
    /* 256 */
    struct target targets[MAX_TARGETS];
};

struct hit {             /* 32 bytes */
    uint64_t time_ns;
    uint64_t vaddr;
    uint32_t target;
    uint32_t pad0;
    uint64_t pad1;
};

#define RING_HEAD_SIZE 64  /* the head (entries ever written) alone on a cache line */

_Static_assert(sizeof(struct target) == 32, "target layout");
_Static_assert(sizeof(struct hit) == 32, "hit layout");
_Static_assert(__builtin_offsetof(struct header, plugin_api) == 64, "header layout");
_Static_assert(__builtin_offsetof(struct header, targets_version) == 128, "header layout");
_Static_assert(__builtin_offsetof(struct header, targets) == 256, "header layout");
_Static_assert(sizeof(struct header) <= HEADER_SIZE, "header size");

static struct header *hdr;
static uint64_t *counters;
static uint64_t *inline_counts;
static char *rings;
static uint64_t ring_block;
static uint64_t ring_mask;
static uint32_t max_vcpus;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void log_hit(unsigned int vcpu, unsigned int idx, uint64_t vaddr)
{
    char *block = rings + (uint64_t)vcpu * ring_block;
    uint64_t *head = (uint64_t *)block;
    uint64_t pos = *head; /* only this vCPU's thread writes it */
    struct hit *h = (struct hit *)(block + RING_HEAD_SIZE) + (pos & ring_mask);
    h->time_ns = now_ns();
    h->vaddr = vaddr;
    h->target = idx;
    __atomic_store_n(head, pos + 1, __ATOMIC_RELEASE);
}

static void on_hit(unsigned int vcpu, void *udata)
{
    uint64_t u = (uint64_t)(uintptr_t)udata;
    unsigned int idx = (unsigned int)(u % MAX_TARGETS);
    struct target *t = &hdr->targets[idx];
    if (__atomic_load_n(&t->gen, __ATOMIC_RELAXED) != u / MAX_TARGETS) {
        __atomic_fetch_add(&hdr->stale_hits, 1, __ATOMIC_RELAXED);
        return;
    }
    if (vcpu >= max_vcpus) {
        __atomic_fetch_add(&hdr->bad_vcpu, 1, __ATOMIC_RELAXED);
        return;
    }
    /* only this vCPU's thread writes this word: a plain add, published with a relaxed store */
    uint64_t *c = &counters[(uint64_t)vcpu * MAX_TARGETS + idx];
    __atomic_store_n(c, *c + 1, __ATOMIC_RELAXED);
    uint32_t flags = __atomic_load_n(&t->flags, __ATOMIC_RELAXED);
    if (flags & TF_LOG) {
        log_hit(vcpu, idx, __atomic_load_n(&t->vaddr, __ATOMIC_RELAXED));
    }
}

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
            uint64_t udata = want_gen[j] * MAX_TARGETS + want[j];
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_hit, QEMU_PLUGIN_CB_NO_REGS,
                                                   (void *)(uintptr_t)udata);
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
        h->max_vcpus > 1024 || h->ring_entries == 0 || (h->ring_entries & (h->ring_entries - 1)) ||
        !within(h->counters_off, (uint64_t)h->max_vcpus * MAX_TARGETS * 8, size) ||
        !within(h->inline_off, MAX_TARGETS * 64, size) ||
        !within(h->ring_off, (uint64_t)h->max_vcpus *
                (RING_HEAD_SIZE + (uint64_t)h->ring_entries * sizeof(struct hit)), size) ||
        (h->counters_off | h->inline_off | h->ring_off) % 64) {
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
    h->plugin_api = QEMU_PLUGIN_VERSION;
    h->qemu_api_cur = (uint32_t)info->version.cur;
    h->smp_vcpus = info->system_emulation ? (uint32_t)info->system.smp_vcpus : 0;
    h->caps = caps;
    h->loaded_ns = now_ns();
    __atomic_store_n(&h->plugin_pid, (uint64_t)getpid(), __ATOMIC_RELEASE);

    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    return 0;
}
