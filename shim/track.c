/*
 * What each live allocation was charged, found again at free time without a
 * lock: an open-addressing hash table over an anonymous mapping, claimed and
 * released with compare-and-swaps.
 *
 * An entry is keyed by (value, kind): device pointers, VMM handles, arrays
 * and IPC mappings are different name spaces.  `key` says whether the slot
 * is in use; `meta` (kind, usage entry, valid bit) is published last with a
 * release store, so a reader that sees a matching meta also sees the size.
 * A free claims the entry by swapping meta to 0 (only one of two racing
 * frees wins), then marks the key as a tombstone that inserts may reuse.
 */
#include "track.h"

#include <string.h>
#include <sys/mman.h>

#include "shim.h"

#define TRACK_CAPACITY (1u << 16) /* live allocations; PyTorch keeps a few thousand segments */
#define TRACK_EMPTY 0ull
#define TRACK_TOMBSTONE (~0ull)
#define META_VALID 0x80000000u

struct track_entry {
    _Atomic uint64_t key;
    _Atomic uint32_t meta;
    uint32_t reserved;
    _Atomic uint64_t size;
    _Atomic uint64_t ctx;
};
_Static_assert(sizeof(struct track_entry) == 32, "track entries pack two to a cache line");

static struct track_entry *table;

int shim_track_init(void)
{
    /* 2 MiB of address space, touched only where entries land. */
    void *p = mmap(NULL, TRACK_CAPACITY * sizeof(struct track_entry), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return -1;
    if (table)
        munmap(table, TRACK_CAPACITY * sizeof(struct track_entry));
    table = p;
    return 0;
}

static uint32_t slot_of(uint64_t key, enum track_kind kind)
{
    uint64_t x = key ^ ((uint64_t)kind << 56);
    x ^= x >> 33; /* murmur3's finaliser: allocation addresses differ in few, high bits */
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return (uint32_t)x & (TRACK_CAPACITY - 1);
}

static uint32_t make_meta(enum track_kind kind, int entry)
{
    return META_VALID | (uint32_t)kind | ((uint32_t)entry << 8);
}

int shim_track_insert(uint64_t key, enum track_kind kind, int entry, uint64_t size, void *ctx)
{
    if (!table || key == TRACK_EMPTY || key == TRACK_TOMBSTONE)
        return -1;
    uint32_t start = slot_of(key, kind);
    for (uint32_t i = 0; i < TRACK_CAPACITY; i++) {
        struct track_entry *e = &table[(start + i) & (TRACK_CAPACITY - 1)];
        uint64_t k = atomic_load_explicit(&e->key, memory_order_acquire);
        while (k == TRACK_EMPTY || k == TRACK_TOMBSTONE) {
            if (atomic_compare_exchange_weak_explicit(&e->key, &k, key, memory_order_acq_rel,
                                                      memory_order_acquire)) {
                atomic_store_explicit(&e->size, size, memory_order_relaxed);
                atomic_store_explicit(&e->ctx, (uint64_t)(uintptr_t)ctx, memory_order_relaxed);
                atomic_store_explicit(&e->meta, make_meta(kind, entry), memory_order_release);
                return 0;
            }
        }
    }
    return -1;
}

/* Claim a live entry whose meta is `meta`: fill hit and free the slot. */
static bool claim(struct track_entry *e, uint32_t meta, struct track_hit *hit)
{
    if (!atomic_compare_exchange_strong_explicit(&e->meta, &meta, 0, memory_order_acq_rel,
                                                 memory_order_relaxed))
        return false;
    hit->key = atomic_load_explicit(&e->key, memory_order_relaxed);
    hit->size = atomic_load_explicit(&e->size, memory_order_relaxed);
    hit->entry = (int)((meta >> 8) & 0xff);
    hit->kind = (enum track_kind)(meta & 0xff);
    atomic_store_explicit(&e->key, TRACK_TOMBSTONE, memory_order_release);
    return true;
}

bool shim_track_remove(uint64_t key, enum track_kind kind, struct track_hit *hit)
{
    if (!table || key == TRACK_EMPTY || key == TRACK_TOMBSTONE)
        return false;
    uint32_t start = slot_of(key, kind);
    for (uint32_t i = 0; i < TRACK_CAPACITY; i++) {
        struct track_entry *e = &table[(start + i) & (TRACK_CAPACITY - 1)];
        uint64_t k = atomic_load_explicit(&e->key, memory_order_acquire);
        if (k == TRACK_EMPTY)
            return false;
        if (k != key)
            continue;
        uint32_t meta = atomic_load_explicit(&e->meta, memory_order_acquire);
        if (meta == make_meta(kind, (int)((meta >> 8) & 0xff)) && claim(e, meta, hit))
            return true;
    }
    return false;
}

size_t shim_track_remove_ctx(void *ctx, void (*release)(const struct track_hit *))
{
    size_t n = 0;
    if (!table || !ctx)
        return 0;
    for (uint32_t i = 0; i < TRACK_CAPACITY; i++) {
        struct track_entry *e = &table[i];
        uint64_t k = atomic_load_explicit(&e->key, memory_order_acquire);
        if (k == TRACK_EMPTY || k == TRACK_TOMBSTONE)
            continue;
        uint32_t meta = atomic_load_explicit(&e->meta, memory_order_acquire);
        struct track_hit hit;
        if ((meta & META_VALID) &&
            atomic_load_explicit(&e->ctx, memory_order_relaxed) == (uint64_t)(uintptr_t)ctx &&
            claim(e, meta, &hit)) {
            release(&hit);
            n++;
        }
    }
    return n;
}
