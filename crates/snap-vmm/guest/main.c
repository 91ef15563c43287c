/*
 * The deterministic test guest.
 *
 * Each vCPU owns an equal slice of the working set. Every tick it writes `mutations_per_tick`
 * pseudo-random 64-bit words into its slice and folds (page, word, value) into a running hash.
 * vCPU 0 then prints one line per tick, `tick <n> hash <16 hex digits>`, combining the hashes
 * of all vCPUs at that tick, so the output is a pure function of the boot parameters whatever
 * the scheduling. When all ticks are done vCPU 0 prints `done <ticks> hash <..>` and writes the
 * exit status to port 0xf4. Plain integer code only: no SSE, no xsave.
 *
 * With disk_blocks_per_tick > 0, vCPU 0 also drives the virtio-blk device of disk 0 (virtio-mmio
 * version 2, polled, one queue) each tick: it writes that many sectors of pseudo-random content
 * at pseudo-random positions within the first disk_sectors sectors, flushes, reads back the last
 * sector it wrote (checking it) and one pseudo-random sector, and folds the written and read
 * bytes into a running disk hash printed as ` disk <16 hex digits>` at the end of each line.
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

enum exit_status { EXIT_OK = 0, EXIT_BAD_PARAMS = 1, EXIT_DISK = 2 };

struct boot_params {
    uint64_t magic;
    uint64_t seed;
    uint64_t ws_base;
    uint64_t ws_pages;
    uint64_t mutations_per_tick;
    uint64_t ticks;
    uint64_t num_cpus;
    uint64_t status_base;
    uint64_t disk_blocks_per_tick;
    uint64_t disk_sectors;
    uint64_t disk_area;
    uint64_t disk_mmio;
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

/* ---- virtio-blk driver (virtio-mmio version 2, polled) ---- */

#define MMIO_MAGIC 0x000
#define MMIO_VERSION 0x004
#define MMIO_DEVICE_ID 0x008
#define MMIO_DEVICE_FEATURES 0x010
#define MMIO_DEVICE_FEATURES_SEL 0x014
#define MMIO_DRIVER_FEATURES 0x020
#define MMIO_DRIVER_FEATURES_SEL 0x024
#define MMIO_QUEUE_SEL 0x030
#define MMIO_QUEUE_NUM_MAX 0x034
#define MMIO_QUEUE_NUM 0x038
#define MMIO_QUEUE_READY 0x044
#define MMIO_QUEUE_NOTIFY 0x050
#define MMIO_INTERRUPT_STATUS 0x060
#define MMIO_INTERRUPT_ACK 0x064
#define MMIO_STATUS 0x070
#define MMIO_QUEUE_DESC 0x080
#define MMIO_QUEUE_AVAIL 0x090
#define MMIO_QUEUE_USED 0x0a0
#define MMIO_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define F_BLK_FLUSH (1u << 9)
#define F_VERSION_1_HI 1u /* feature bit 32 */

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8

#define SECTOR 512
#define WORDS_PER_SECTOR (SECTOR / 8)
#define QUEUE_SIZE 64
#define MAX_REQUESTS 20
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DISK_ID_BYTES 20

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct blk_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

/* The driver's memory, at params->disk_area (page aligned, 8 pages). */
struct disk_area {
    struct desc desc[QUEUE_SIZE];                       /* 0x0000 */
    uint8_t pad0[0x400 - sizeof(struct desc) * QUEUE_SIZE];
    uint16_t avail[2 + QUEUE_SIZE + 1];                 /* 0x0400: flags, idx, ring, used_event */
    uint8_t pad1[0x400 - sizeof(uint16_t) * (QUEUE_SIZE + 3)];
    uint32_t used[1 + 2 * QUEUE_SIZE + 1];              /* 0x0800: flags|idx, ring, avail_event */
    uint8_t pad2[0x800 - sizeof(uint32_t) * (2 * QUEUE_SIZE + 2)];
    struct blk_header header[MAX_REQUESTS];             /* 0x1000 */
    uint8_t status[MAX_REQUESTS];
    uint8_t pad3[0x1000 - sizeof(struct blk_header) * MAX_REQUESTS - MAX_REQUESTS];
    uint64_t data[MAX_REQUESTS][WORDS_PER_SECTOR];      /* 0x2000 */
};

struct disk {
    volatile uint32_t *mmio;
    struct disk_area *area;
    uint16_t avail_idx;
    uint16_t next_desc;
    uint16_t requests;
    uint64_t rng;
    uint64_t hash;
};

static uint32_t mmio_read(struct disk *d, uint32_t reg) { return d->mmio[reg / 4]; }
static void mmio_write(struct disk *d, uint32_t reg, uint32_t v) { d->mmio[reg / 4] = v; }

static void disk_fail(const char *why) {
    put_str("virtio-blk: ");
    put_str(why);
    put_char('\n');
    finish(EXIT_DISK);
    for (;;) __asm__ volatile("cli; hlt");
}

static void add_desc(struct disk *d, uint64_t addr, uint32_t len, uint16_t flags, int last) {
    struct desc *x = &d->area->desc[d->next_desc];
    x->addr = addr;
    x->len = len;
    x->flags = flags | (last ? 0 : DESC_F_NEXT);
    x->next = last ? 0 : (uint16_t)(d->next_desc + 1);
    d->next_desc++;
}

/* Queues request `i` of the batch: header, optional data of `len` bytes, status. */
static void add_request(struct disk *d, uint32_t type, uint64_t sector, void *data, uint32_t len, int device_writes) {
    uint16_t i = d->requests++;
    uint16_t head = d->next_desc;
    d->area->header[i].type = type;
    d->area->header[i].reserved = 0;
    d->area->header[i].sector = sector;
    d->area->status[i] = 0xff;
    add_desc(d, (uint64_t)&d->area->header[i], sizeof(struct blk_header), 0, 0);
    if (len) add_desc(d, (uint64_t)data, len, device_writes ? DESC_F_WRITE : 0, 0);
    add_desc(d, (uint64_t)&d->area->status[i], 1, DESC_F_WRITE, 1);
    d->area->avail[2 + (d->avail_idx % QUEUE_SIZE)] = head;
    d->avail_idx++;
}

/* Publishes the batch, notifies, waits for every request and checks their status. */
static void submit(struct disk *d) {
    volatile uint16_t *avail_idx = &d->area->avail[1];
    volatile uint32_t *used_head = &d->area->used[0];
    barrier();
    *avail_idx = d->avail_idx;
    barrier();
    mmio_write(d, MMIO_QUEUE_NOTIFY, 0);
    uint64_t spins = 0;
    while ((uint16_t)(*used_head >> 16) != d->avail_idx) {
        if (++spins > 100000000ULL) disk_fail("no completion");
        cpu_relax();
    }
    barrier();
    mmio_write(d, MMIO_INTERRUPT_ACK, mmio_read(d, MMIO_INTERRUPT_STATUS));
    for (uint16_t i = 0; i < d->requests; i++)
        if (d->area->status[i] != 0) disk_fail("request failed");
    d->requests = 0;
    d->next_desc = 0;
}

static void disk_init(struct disk *d, const struct boot_params *p) {
    d->mmio = (volatile uint32_t *)p->disk_mmio;
    d->area = (struct disk_area *)p->disk_area;
    d->avail_idx = 0;
    d->next_desc = 0;
    d->requests = 0;
    memset(d->area, 0, sizeof(struct disk_area));
    if (mmio_read(d, MMIO_MAGIC) != 0x74726976 || mmio_read(d, MMIO_VERSION) != 2 || mmio_read(d, MMIO_DEVICE_ID) != 2)
        disk_fail("no device");
    mmio_write(d, MMIO_STATUS, 0);
    mmio_write(d, MMIO_STATUS, S_ACKNOWLEDGE);
    mmio_write(d, MMIO_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    mmio_write(d, MMIO_DEVICE_FEATURES_SEL, 1);
    uint32_t hi = mmio_read(d, MMIO_DEVICE_FEATURES);
    mmio_write(d, MMIO_DEVICE_FEATURES_SEL, 0);
    uint32_t lo = mmio_read(d, MMIO_DEVICE_FEATURES);
    if (!(hi & F_VERSION_1_HI) || !(lo & F_BLK_FLUSH)) disk_fail("features missing");
    mmio_write(d, MMIO_DRIVER_FEATURES_SEL, 0);
    mmio_write(d, MMIO_DRIVER_FEATURES, F_BLK_FLUSH);
    mmio_write(d, MMIO_DRIVER_FEATURES_SEL, 1);
    mmio_write(d, MMIO_DRIVER_FEATURES, F_VERSION_1_HI);
    mmio_write(d, MMIO_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(mmio_read(d, MMIO_STATUS) & S_FEATURES_OK)) disk_fail("features refused");
    uint64_t capacity = mmio_read(d, MMIO_CONFIG) | ((uint64_t)mmio_read(d, MMIO_CONFIG + 4) << 32);
    if (capacity < p->disk_sectors) disk_fail("disk too small");
    mmio_write(d, MMIO_QUEUE_SEL, 0);
    if (mmio_read(d, MMIO_QUEUE_NUM_MAX) < QUEUE_SIZE) disk_fail("queue too small");
    mmio_write(d, MMIO_QUEUE_NUM, QUEUE_SIZE);
    uint64_t desc = (uint64_t)d->area->desc, avail = (uint64_t)d->area->avail, used = (uint64_t)d->area->used;
    mmio_write(d, MMIO_QUEUE_DESC, (uint32_t)desc);
    mmio_write(d, MMIO_QUEUE_DESC + 4, (uint32_t)(desc >> 32));
    mmio_write(d, MMIO_QUEUE_AVAIL, (uint32_t)avail);
    mmio_write(d, MMIO_QUEUE_AVAIL + 4, (uint32_t)(avail >> 32));
    mmio_write(d, MMIO_QUEUE_USED, (uint32_t)used);
    mmio_write(d, MMIO_QUEUE_USED + 4, (uint32_t)(used >> 32));
    mmio_write(d, MMIO_QUEUE_READY, 1);
    mmio_write(d, MMIO_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);

    d->rng = p->seed ^ 0xd1b54a32d192ed03ULL;
    if (d->rng == 0) d->rng = 1;
    d->hash = mix(FNV_OFFSET, 0xd15c);
    uint8_t *id = (uint8_t *)d->area->data[0];
    add_request(d, T_GET_ID, 0, id, DISK_ID_BYTES, 1);
    submit(d);
    for (int i = 0; i < DISK_ID_BYTES; i++) d->hash = mix(d->hash, id[i]);
}

/* One tick of disk work (see the comment at the top). */
static void disk_tick(struct disk *d, const struct boot_params *p) {
    uint64_t last = 0, last_sector = 0;
    for (uint64_t j = 0; j < p->disk_blocks_per_tick; j++) {
        uint64_t sector = next_random(&d->rng) % p->disk_sectors;
        uint64_t *buf = d->area->data[j];
        d->hash = mix(d->hash, sector);
        for (int w = 0; w < WORDS_PER_SECTOR; w++) {
            buf[w] = next_random(&d->rng);
            d->hash = mix(d->hash, buf[w]);
        }
        add_request(d, T_OUT, sector, buf, SECTOR, 0);
        last = j;
        last_sector = sector;
    }
    add_request(d, T_FLUSH, 0, 0, 0, 0);
    submit(d);

    uint64_t *back = d->area->data[MAX_REQUESTS - 2];
    uint64_t *other = d->area->data[MAX_REQUESTS - 1];
    uint64_t other_sector = next_random(&d->rng) % p->disk_sectors;
    add_request(d, T_IN, last_sector, back, SECTOR, 1);
    add_request(d, T_IN, other_sector, other, SECTOR, 1);
    submit(d);
    for (int w = 0; w < WORDS_PER_SECTOR; w++)
        if (back[w] != d->area->data[last][w]) disk_fail("read back differs from what was written");
    d->hash = mix(d->hash, other_sector);
    for (int w = 0; w < WORDS_PER_SECTOR; w++) d->hash = mix(d->hash, other[w]);
}

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
    const int use_disk = cpu == 0 && p->disk_blocks_per_tick > 0;
    struct disk disk;
    if (use_disk) {
        if (p->disk_blocks_per_tick > MAX_REQUESTS - 2 || p->disk_sectors == 0) disk_fail("bad disk parameters");
        disk_init(&disk, p);
    }

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
        if (use_disk) disk_tick(&disk, p);

        combined = FNV_OFFSET;
        for (uint64_t c = 0; c < ncpu; c++) {
            while (done[c * STATUS_STRIDE] < t) cpu_relax();
            combined = mix(combined, hash_log[(t - 1) * ncpu + c]);
        }
        put_str("tick ");
        put_dec(t);
        put_str(" hash ");
        put_hex(combined);
        if (use_disk) {
            put_str(" disk ");
            put_hex(disk.hash);
        }
        put_char('\n');
    }
    if (cpu == 0) {
        put_str("done ");
        put_dec(p->ticks);
        put_str(" hash ");
        put_hex(combined);
        if (use_disk) {
            put_str(" disk ");
            put_hex(disk.hash);
        }
        put_char('\n');
        finish(EXIT_OK);
    }
}
