/*
 * The deterministic test guest.
 *
 * Each vCPU owns an equal slice of the working set. Every tick it writes `mutations_per_tick`
 * pseudo-random 64-bit words into its slice and folds (page, word, value) into a running hash.
 * vCPU 0 then prints one line per tick, `tick <n> hash <16 hex digits>`, combining the hashes
 * of all vCPUs at that tick, so the output is a pure function of the boot parameters whatever
 * the scheduling. When all ticks are done vCPU 0 prints `done <ticks> hash <..>` and writes the
 * exit status to port 0xf4. Plain integer code only: no SSE, no xsave.
 */
#include <stdint.h>

#define BOOT_MAGIC 0x3154534547414e53ULL /* "SNAGEST1" little endian */
#define PAGE_SIZE 4096ULL
#define WORDS_PER_PAGE (PAGE_SIZE / 8)
#define STATUS_STRIDE 8 /* one 64-byte line per vCPU in the done-tick table */
#define HASH_LOG_OFFSET 4096ULL
#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL

#define PORT_SERIAL 0x3f8
#define PORT_EXIT 0xf4

enum exit_status { EXIT_OK = 0, EXIT_BAD_PARAMS = 1 };

struct boot_params {
    uint64_t magic;
    uint64_t seed;
    uint64_t ws_base;
    uint64_t ws_pages;
    uint64_t mutations_per_tick;
    uint64_t ticks;
    uint64_t num_cpus;
    uint64_t status_base;
};

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

void *memset(void *d, int c, unsigned long n) {
    unsigned char *p = d;
    while (n--) *p++ = (unsigned char)c;
    return d;
}

void *memcpy(void *d, const void *s, unsigned long n) {
    unsigned char *p = d;
    const unsigned char *q = s;
    while (n--) *p++ = *q++;
    return d;
}

static void put_char(char c) { outb(PORT_SERIAL, (uint8_t)c); }

static void put_str(const char *s) {
    while (*s) put_char(*s++);
}

static void put_dec(uint64_t v) {
    char buf[21];
    int i = 0;
    do {
        buf[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i) put_char(buf[--i]);
}

static void put_hex(uint64_t v) {
    for (int shift = 60; shift >= 0; shift -= 4) put_char("0123456789abcdef"[(v >> shift) & 0xf]);
}

static uint64_t next_random(uint64_t *state) {
    /* xorshift64* */
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545f4914f6cdd1dULL;
}

static uint64_t mix(uint64_t h, uint64_t v) { return (h ^ v) * FNV_PRIME; }

static void finish(uint32_t status) { outl(PORT_EXIT, status); }

void guest_main(uint64_t cpu, const struct boot_params *p) {
    if (p->magic != BOOT_MAGIC || p->num_cpus == 0 || cpu >= p->num_cpus || p->ws_pages < p->num_cpus) {
        if (cpu == 0) {
            put_str("bad boot parameters\n");
            finish(EXIT_BAD_PARAMS);
        }
        return;
    }
    const uint64_t ncpu = p->num_cpus;
    const uint64_t pages = p->ws_pages / ncpu;
    uint64_t *const slice = (uint64_t *)(p->ws_base + cpu * pages * PAGE_SIZE);
    volatile uint64_t *const done = (volatile uint64_t *)p->status_base;
    volatile uint64_t *const hash_log = (volatile uint64_t *)(p->status_base + HASH_LOG_OFFSET);

    uint64_t rng = p->seed ^ (0x9e3779b97f4a7c15ULL * (cpu + 1));
    if (rng == 0) rng = 1;
    uint64_t h = mix(FNV_OFFSET, cpu);
    uint64_t combined = FNV_OFFSET;

    for (uint64_t t = 1; t <= p->ticks; t++) {
        for (uint64_t j = 0; j < p->mutations_per_tick; j++) {
            uint64_t r = next_random(&rng);
            uint64_t page = r % pages;
            uint64_t word = (r >> 40) % WORDS_PER_PAGE;
            uint64_t value = next_random(&rng);
            slice[page * WORDS_PER_PAGE + word] = value;
            h = mix(mix(mix(h, page), word), value);
        }
        hash_log[(t - 1) * ncpu + cpu] = h;
        barrier();
        done[cpu * STATUS_STRIDE] = t;
        if (cpu != 0) continue;

        combined = FNV_OFFSET;
        for (uint64_t c = 0; c < ncpu; c++) {
            while (done[c * STATUS_STRIDE] < t) cpu_relax();
            combined = mix(combined, hash_log[(t - 1) * ncpu + c]);
        }
        put_str("tick ");
        put_dec(t);
        put_str(" hash ");
        put_hex(combined);
        put_char('\n');
    }
    if (cpu == 0) {
        put_str("done ");
        put_dec(p->ticks);
        put_str(" hash ");
        put_hex(combined);
        put_char('\n');
        finish(EXIT_OK);
    }
}
