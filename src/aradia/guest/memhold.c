/*
 * memhold: a guest-side test program for aradia.
 *
 * Maps SIZE bytes (default 1 MiB) at a fixed virtual address, fills it with a pattern derived from
 * SEED (64-bit word i = SEED ^ (i * 0x9E3779B97F4A7C15)), mlocks it and prints where it lives:
 *
 *   pid N / vaddr 0x... / size N / seed N
 *   page INDEX VADDR PHYS     (one per 4 KiB page, PHYS from /proc/self/pagemap; 0 if hidden)
 *   ready
 *
 * Then it serves line commands (from stdin, or from a FIFO with --fifo PATH, which it keeps open
 * for writing itself so writers may come and go). Each answer ends with "ok" or "err MESSAGE":
 *
 *   dump OFF LEN      -> "data HEX" of region[OFF:OFF+LEN]  (LEN <= 65536)
 *   poke OFF HEX      -> writes the bytes
 *   check             -> "mismatch COUNT FIRST_OFFSET" against the pattern (-1 if none)
 *   pages             -> the page lines again
 *   quit              -> exits
 *
 * usage: memhold SEED [SIZE] [--addr HEX] [--fifo PATH]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif

#define PAGE 4096UL
#define MAX_SIZE (256UL << 20)
#define MAX_DUMP 65536UL
#define GOLDEN 0x9E3779B97F4A7C15ULL

static unsigned char *region;
static unsigned long region_size;
static uint64_t seed;

static uint64_t pattern_word(uint64_t i) { return seed ^ (i * GOLDEN); }

static uint64_t phys_of(int pagemap, uintptr_t va)
{
    uint64_t entry = 0;
    if (pagemap < 0 || pread(pagemap, &entry, sizeof entry, (off_t)(va / PAGE) * 8) != sizeof entry)
        return 0;
    if (!(entry & (1ULL << 63)))
        return 0;
    return (entry & ((1ULL << 55) - 1)) * PAGE;
}

static void print_pages(void)
{
    int pagemap = open("/proc/self/pagemap", O_RDONLY);
    for (unsigned long i = 0; i < region_size / PAGE; i++) {
        uintptr_t va = (uintptr_t)region + i * PAGE;
        printf("page %lu 0x%" PRIxPTR " 0x%" PRIx64 "\n", i, va, phys_of(pagemap, va));
    }
    if (pagemap >= 0)
        close(pagemap);
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int range_ok(unsigned long off, unsigned long len)
{
    return off <= region_size && len <= region_size - off;
}

static void serve(FILE *in)
{
    char line[2 * MAX_DUMP + 64];
    while (fgets(line, sizeof line, in)) {
        char cmd[16] = "", arg[2 * MAX_DUMP + 1] = "";
        unsigned long off = 0, len = 0;
        line[strcspn(line, "\r\n")] = 0;
        if (sscanf(line, "%15s", cmd) != 1)
            continue;
        if (!strcmp(cmd, "quit")) {
            printf("ok\n");
            fflush(stdout);
            return;
        } else if (!strcmp(cmd, "dump")) {
            if (sscanf(line, "%*s %lu %lu", &off, &len) != 2 || len > MAX_DUMP || !range_ok(off, len)) {
                printf("err bad range\n");
            } else {
                printf("data ");
                for (unsigned long i = 0; i < len; i++)
                    printf("%02x", ((volatile unsigned char *)region)[off + i]);
                printf("\nok\n");
            }
        } else if (!strcmp(cmd, "poke")) {
            size_t n;
            if (sscanf(line, "%*s %lu %131072s", &off, arg) != 2 || (n = strlen(arg)) % 2 ||
                !range_ok(off, n / 2)) {
                printf("err bad poke\n");
            } else {
                int bad = 0;
                for (size_t i = 0; i < n / 2; i++) {
                    int hi = hexval(arg[2 * i]), lo = hexval(arg[2 * i + 1]);
                    if (hi < 0 || lo < 0) { bad = 1; break; }
                    ((volatile unsigned char *)region)[off + i] = (unsigned char)(hi << 4 | lo);
                }
                printf(bad ? "err bad hex\n" : "ok\n");
            }
        } else if (!strcmp(cmd, "check")) {
            unsigned long count = 0;
            long first = -1;
            for (unsigned long i = 0; i < region_size / 8; i++) {
                if (((volatile uint64_t *)region)[i] != pattern_word(i)) {
                    if (first < 0) first = (long)(i * 8);
                    count++;
                }
            }
            printf("mismatch %lu %ld\nok\n", count, first);
        } else if (!strcmp(cmd, "spin")) {
            /* Busy-loop in user mode touching the region so a host can catch this process on a vCPU
             * (its CR3 is then in the vCPU's registers). */
            struct timespec t0, t;
            if (sscanf(line, "%*s %lu", &len) != 1 || len > 600) {
                printf("err bad spin\n");
            } else {
                unsigned long sum = 0;
                clock_gettime(CLOCK_MONOTONIC, &t0);
                do {
                    for (unsigned long i = 0; i < 4096; i++)
                        sum += ((volatile unsigned char *)region)[(i * 4096) % region_size];
                    clock_gettime(CLOCK_MONOTONIC, &t);
                } while ((unsigned long)(t.tv_sec - t0.tv_sec) < len);
                printf("spun %lu\nok\n", sum & 1);
            }
        } else if (!strcmp(cmd, "pages")) {
            print_pages();
            printf("ok\n");
        } else {
            printf("err unknown command\n");
        }
        fflush(stdout);
    }
}

int main(int argc, char **argv)
{
    unsigned long addr = 0x5a5a00000000UL;
    const char *fifo = NULL;
    char *end;
    int pos = 0;

    region_size = 1UL << 20;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--addr") && i + 1 < argc) {
            addr = strtoul(argv[++i], NULL, 16);
        } else if (!strcmp(argv[i], "--fifo") && i + 1 < argc) {
            fifo = argv[++i];
        } else if (pos == 0) {
            seed = strtoull(argv[i], &end, 0);
            pos++;
        } else if (pos == 1) {
            region_size = strtoul(argv[i], &end, 0);
            pos++;
        } else {
            fprintf(stderr, "usage: memhold SEED [SIZE] [--addr HEX] [--fifo PATH]\n");
            return 2;
        }
    }
    if (region_size == 0 || region_size > MAX_SIZE || region_size % PAGE) {
        fprintf(stderr, "memhold: SIZE must be a multiple of 4096 up to %lu\n", MAX_SIZE);
        return 2;
    }
    region = mmap((void *)addr, region_size, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    if (region == MAP_FAILED)
        region = mmap(NULL, region_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED) {
        perror("memhold: mmap");
        return 1;
    }
    for (unsigned long i = 0; i < region_size / 8; i++)
        ((uint64_t *)region)[i] = pattern_word(i);
    if (mlock(region, region_size) != 0)
        perror("memhold: mlock");

    FILE *in = stdin;
    if (fifo) {
        if (mkfifo(fifo, 0600) != 0 && errno != EEXIST) {
            perror("memhold: mkfifo");
            return 1;
        }
        int fd = open(fifo, O_RDWR);
        if (fd < 0 || !(in = fdopen(fd, "r"))) {
            perror("memhold: open fifo");
            return 1;
        }
    }
    printf("pid %d\nvaddr 0x%lx\nsize %lu\nseed %" PRIu64 "\n", (int)getpid(), (unsigned long)region,
           region_size, seed);
    print_pages();
    printf("ready\n");
    fflush(stdout);
    serve(in);
    return 0;
}
