/*
 * Spill mode's eviction and prefetch: keeping the hot set of a tenant's memory on the GPU.
 *
 * In spill mode every cuMemAlloc_v2 is managed memory (memory.c): ranges within the quota
 * are advised to live on the device ("resident", charged to mem_used_bytes), ranges past
 * it in host memory ("spilled", charged to mem_spilled_bytes), and the device accesses
 * both.  This module keeps them in a table sorted by address and, before each kernel
 * launch:
 *
 *  1. finds the ranges the kernel uses: the 8-byte words of its parameters (their sizes
 *     from cuFuncGetParamInfo, asked once per function) looked up in the table, and marks
 *     them used by this launch;
 *  2. if the quota was lowered below what the tenant holds on the device, moves this
 *     process's resident ranges to the host until it fits again (spilled tenants shrink
 *     first: what lets a neighbour's guaranteed quota get its memory back);
 *  3. promotes the spilled ranges the kernel uses: reserves room in the quota (the same
 *     compare-and-swap as an allocation), evicting this process's resident ranges that
 *     the launch does not use, least recently used first (LRU) or oldest first (FIFO), when
 *     it has none; advises the device and prefetches to it on a stream of the shim's own,
 *     which the launch's stream then waits for.
 *
 * A full quota gives a range room only in place of ranges unused since the range's own
 * previous use (or never used, for one used the first time): one used again sooner than
 * anything it would evict.  Without that rule a working set larger than the quota used in
 * a cycle (a model's layers, every forward pass) thrashes: the least recently used range is always the next one needed, so every launch
 * would move a range in and one out.  With it, such a set settles with the quota full and
 * the rest read where it is, and a hot set that moves (sessions of a server) comes to the
 * device from its second use on.
 *
 * Why each step is safe: managed memory is coherent wherever its pages are, so a kernel
 * that touches a range while it moves, or one that was left on the host, reads the right
 * data (over the bus, or after a fault); moving data is never needed for correctness,
 * only for speed, and each failure along the way leaves a range where it was, charged as
 * it was.  The charges never pass the quota: a promotion reserves before it moves, an
 * eviction gives the quota back only after taking room in the spill bound, and on the
 * shim's stream the evictions run before the promotions they made room for.
 *
 * Cost in spill mode: one uncontended mutex, a hash probe for the function's layout, a
 * bounds check per 8-byte word of the arguments and a binary search per word that falls
 * among the ranges; migrations (the driver's advice and prefetches, a
 * scan of the table for a victim) only when a launch uses a spilled range or the quota
 * was lowered, and at most prefetch_bytes of promotions per launch, so that no launch
 * stalls for long.  Launches without kernelParams (the `extra` form), of functions whose
 * layout the driver does not give, or into a capturing stream move nothing.
 */
#include "uvm.h"

#include <pthread.h>
#include <string.h>

#define UVM_MAX_RANGES 4096u  /* ranges managed; past that they are fixed charges */
#define UVM_MAX_FUNCS 1024u   /* functions whose parameter layout is cached (a power of 2) */
#define UVM_FUNC_PROBES 8u
#define UVM_MAX_PARAMS 64u    /* parameters looked at per kernel */
/*
 * 8-byte words looked at per parameter: frameworks pass their pointers inside structures
 * (PyTorch's elementwise kernels an array of them, CUTLASS's GEMMs a Params block), so a
 * parameter of any size may hold some; the first 256 bytes of each are read.
 */
#define UVM_MAX_WORDS 32u
#define UVM_MAX_CONTEXTS 16u  /* contexts with a migration stream */
#define UVM_MAX_WANTED 64u    /* spilled ranges one launch may promote */
#define UVM_NOT_USED 0u       /* last_launch of a range no launch used yet */
#define UVM_NO_LAUNCH UINT64_MAX

_Atomic bool shim_uvm_live;

struct uvm_range {
    uint64_t base;
    uint64_t size;
    uint64_t last_launch; /* the last launch that used it; 0: none yet */
    uint64_t seq;         /* allocation order, for FIFO */
    CUcontext ctx;
    int ordinal;
    int entry;
    enum uvm_state state;
};

struct uvm_func {
    CUfunction f;                  /* NULL: free */
    bool known;                    /* the driver gave its layout */
    uint8_t params;                /* parameters to look at */
    uint8_t words[UVM_MAX_PARAMS]; /* 8-byte words of each that may hold a pointer */
};

/* A stream of the shim's own per context: migrations queue there, off the tenant's streams. */
struct uvm_mover {
    CUcontext ctx; /* NULL: free */
    CUstream stream;
    CUevent done;
};

/*
 * Fixed size, no allocation on the launch path.  Past UVM_MAX_RANGES live ranges a new one
 * is not managed: it keeps the charge and advice it was allocated with for its lifetime.
 */
static struct {
    pthread_mutex_t lock;
    struct uvm_range ranges[UVM_MAX_RANGES]; /* sorted by base */
    uint32_t count;
    uint64_t next_seq;
    uint64_t launches;
    uint32_t funcs_epoch;
    struct uvm_func funcs[UVM_MAX_FUNCS];
    /* Reported once at exit (BUD_LOG_LEVEL=info): what spill mode did in this process. */
    struct {
        uint64_t without_layout, promoted, declined, evicted;
    } seen;
    struct uvm_mover movers[UVM_MAX_CONTEXTS];
} table = {.lock = PTHREAD_MUTEX_INITIALIZER};

/* What one launch (or one allocation: launch UVM_NO_LAUNCH) works with. */
struct uvm_pass {
    uint64_t launch;
    int ordinal;
    int entry;
    CUcontext ctx;
    uint64_t quota;
    uint32_t wanted[UVM_MAX_WANTED]; /* indices of spilled ranges the launch uses */
    uint64_t wanted_prev[UVM_MAX_WANTED]; /* the launch that used each before this one */
    uint32_t nwanted;
    struct uvm_mover *mover;         /* set at the first migration */
    bool mover_failed;
    bool promoted;
};

/* ---- the range table (lock held) ------------------------------------------------------ */

/* The first index whose base is above addr. */
static uint32_t upper_bound(uint64_t addr)
{
    uint32_t lo = 0, hi = table.count;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (table.ranges[mid].base <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* The range holding addr (a kernel may be passed a pointer into one), or NULL. */
static struct uvm_range *find_containing(uint64_t addr)
{
    uint32_t i = upper_bound(addr);
    if (i == 0)
        return NULL;
    struct uvm_range *r = &table.ranges[i - 1];
    return addr - r->base < r->size ? r : NULL;
}

static void remove_at(uint32_t i)
{
    memmove(&table.ranges[i], &table.ranges[i + 1],
            (table.count - i - 1) * sizeof(table.ranges[0]));
    table.count--;
}

bool shim_uvm_add(uint64_t base, uint64_t size, int ordinal, int entry, CUcontext ctx,
                  enum uvm_state state)
{
    pthread_mutex_lock(&table.lock);
    uint32_t i = upper_bound(base);
    if (i > 0 && table.ranges[i - 1].base == base)
        remove_at(--i); /* a stale entry for a reused address (its free went unseen) */
    bool added = table.count < UVM_MAX_RANGES;
    if (added) {
        memmove(&table.ranges[i + 1], &table.ranges[i],
                (table.count - i) * sizeof(table.ranges[0]));
        table.ranges[i] = (struct uvm_range){.base = base, .size = size, .seq = ++table.next_seq,
                                             .ctx = ctx, .ordinal = ordinal, .entry = entry,
                                             .state = state};
        table.count++;
    }
    pthread_mutex_unlock(&table.lock);
    return added;
}

bool shim_uvm_forget(uint64_t base, enum uvm_state *state)
{
    pthread_mutex_lock(&table.lock);
    uint32_t i = upper_bound(base);
    bool found = i > 0 && table.ranges[i - 1].base == base;
    if (found) {
        *state = table.ranges[i - 1].state;
        remove_at(i - 1);
    }
    pthread_mutex_unlock(&table.lock);
    return found;
}

void shim_uvm_forget_context(CUcontext ctx)
{
    pthread_mutex_lock(&table.lock);
    for (uint32_t m = 0; m < UVM_MAX_CONTEXTS; m++)
        if (table.movers[m].ctx == ctx)
            table.movers[m] = (struct uvm_mover){0}; /* the driver destroyed its stream */
    pthread_mutex_unlock(&table.lock);
}

void shim_uvm_after_fork_child(void)
{
    /* The parent's ranges, streams and functions are not the child's. */
    pthread_mutex_init(&table.lock, NULL);
    table.count = 0;
    memset(table.funcs, 0, sizeof(table.funcs));
    memset(table.movers, 0, sizeof(table.movers));
}

/* ---- which ranges a launch uses ------------------------------------------------------- */

/*
 * The size of f's parameter `index`.  The CUDA runtime launches CUkernel handles of its
 * libraries where a CUfunction is expected (the driver takes either); the driver answers
 * for those through cuKernelGetParamInfo.
 */
static CUresult param_size(CUfunction f, uint32_t index, bool as_kernel, size_t *size)
{
    size_t offset = 0;
    if (as_kernel) {
        __typeof__(&cuKernelGetParamInfo) kernel_info = REAL(cuKernelGetParamInfo);
        return kernel_info ? kernel_info((CUkernel)f, index, &offset, size)
                           : CUDA_ERROR_NOT_SUPPORTED;
    }
    __typeof__(&cuFuncGetParamInfo) func_info = REAL(cuFuncGetParamInfo);
    return func_info ? func_info(f, index, &offset, size) : CUDA_ERROR_NOT_SUPPORTED;
}

/* Ask the driver once: how many 8-byte words each parameter has (pointers are among them). */
static void learn_layout(struct uvm_func *slot, CUfunction f)
{
    *slot = (struct uvm_func){.f = f};
    size_t size = 0;
    CUresult rc = param_size(f, 0, false, &size);
    bool as_kernel = false;
    /* not a function the driver knows as one (INVALID_VALUE: one without parameters) */
    if (rc != CUDA_SUCCESS && rc != CUDA_ERROR_INVALID_VALUE &&
        param_size(f, 0, true, &size) == CUDA_SUCCESS) {
        as_kernel = true;
        rc = CUDA_SUCCESS;
    }
    for (uint32_t i = 0; i < UVM_MAX_PARAMS; i++) {
        if (i > 0) {
            size = 0;
            rc = param_size(f, i, as_kernel, &size);
        }
        if (rc != CUDA_SUCCESS) {
            /* past the last parameter; any other answer at the first: no layout */
            slot->known = i > 0 || rc == CUDA_ERROR_INVALID_VALUE;
            return;
        }
        size_t words = size / sizeof(CUdeviceptr);
        slot->words[i] = (uint8_t)(words < UVM_MAX_WORDS ? words : UVM_MAX_WORDS);
        slot->params = (uint8_t)(i + 1);
    }
    slot->known = true; /* more than UVM_MAX_PARAMS: the first ones are looked at */
}

static uint32_t func_hash(CUfunction f)
{
    uint64_t x = (uint64_t)(uintptr_t)f * 0x9e3779b97f4a7c15ull;
    return (uint32_t)(x >> 40) & (UVM_MAX_FUNCS - 1);
}

/*
 * f's layout from the cache, asking the driver on a miss.  The cache starts over when a
 * context is destroyed (a module's function handles may come back for other functions);
 * a full probe sequence replaces its first entry.  A stale layout only misplaces a
 * prefetch.
 */
static const struct uvm_func *layout_of(CUfunction f)
{
    uint32_t epoch = atomic_load_explicit(&shim_context_epoch, memory_order_relaxed);
    if (epoch != table.funcs_epoch) {
        memset(table.funcs, 0, sizeof(table.funcs));
        table.funcs_epoch = epoch;
    }
    uint32_t h = func_hash(f);
    for (uint32_t p = 0; p < UVM_FUNC_PROBES; p++) {
        struct uvm_func *slot = &table.funcs[(h + p) & (UVM_MAX_FUNCS - 1)];
        if (slot->f == f)
            return slot;
        if (!slot->f) {
            learn_layout(slot, f);
            return slot;
        }
    }
    learn_layout(&table.funcs[h], f);
    return &table.funcs[h];
}

static void want(struct uvm_pass *pass, struct uvm_range *r, uint64_t prev_launch)
{
    uint32_t index = (uint32_t)(r - table.ranges);
    for (uint32_t w = 0; w < pass->nwanted; w++)
        if (pass->wanted[w] == index)
            return;
    if (pass->nwanted < UVM_MAX_WANTED) {
        pass->wanted_prev[pass->nwanted] = prev_launch;
        pass->wanted[pass->nwanted++] = index;
    }
}

/*
 * A word of a launch's arguments that points into a range of the launch's context: mark it
 * used by the launch.  Another context's ranges are that context's to move, as its own
 * launches use them (victim() never takes them either).
 */
static void mark_word(struct uvm_pass *pass, uint64_t addr, uint64_t lowest, uint64_t highest)
{
    if (addr < lowest || addr >= highest)
        return; /* most words (sizes, strides, flags) are nowhere near the ranges */
    struct uvm_range *r = find_containing(addr);
    if (!r || r->ordinal != pass->ordinal || r->ctx != pass->ctx || r->last_launch == pass->launch)
        return;
    uint64_t prev_launch = r->last_launch;
    r->last_launch = pass->launch;
    if (r->state == UVM_SPILLED)
        want(pass, r, prev_launch);
}

/*
 * Mark the ranges the launch's arguments point into, read as 8-byte words (a structure's
 * pointers sit at multiples of 8 from its start); note the spilled ones.  A word that only
 * looks like a pointer into a range marks it too: at worst a prefetch the kernel did not
 * need.
 */
static void mark_used(struct uvm_pass *pass, CUfunction f, void **params)
{
    const struct uvm_func *layout = layout_of(f);
    if (!layout->known) {
        table.seen.without_layout++;
        return;
    }
    if (!table.count)
        return;
    const struct uvm_range *last = &table.ranges[table.count - 1];
    uint64_t lowest = table.ranges[0].base, highest = last->base + last->size;
    for (uint32_t i = 0; i < layout->params; i++) {
        const unsigned char *value = params[i];
        for (uint32_t w = 0; value && w < layout->words[i]; w++) {
            uint64_t addr;
            memcpy(&addr, value + w * sizeof(addr), sizeof(addr)); /* however aligned */
            mark_word(pass, addr, lowest, highest);
        }
    }
}

/* ---- moving ranges -------------------------------------------------------------------- */

static struct uvm_mover *mover_for(CUcontext ctx)
{
    struct uvm_mover *free_slot = NULL;
    for (uint32_t m = 0; m < UVM_MAX_CONTEXTS; m++) {
        if (table.movers[m].ctx == ctx)
            return &table.movers[m];
        if (!table.movers[m].ctx && !free_slot)
            free_slot = &table.movers[m];
    }
    if (!free_slot)
        return NULL;
    CUstream stream = NULL;
    CUevent done = NULL;
    /* Non-blocking: it never waits for, nor holds up, the tenant's legacy stream. */
    if (REAL(cuStreamCreate)(&stream, CU_STREAM_NON_BLOCKING) != CUDA_SUCCESS)
        return NULL;
    if (REAL(cuEventCreate)(&done, CU_EVENT_DISABLE_TIMING) != CUDA_SUCCESS) {
        REAL(cuStreamDestroy_v2)(stream);
        return NULL;
    }
    *free_slot = (struct uvm_mover){.ctx = ctx, .stream = stream, .done = done};
    return free_slot;
}

static bool have_mover(struct uvm_pass *pass)
{
    if (!pass->mover && !pass->mover_failed) {
        pass->mover = mover_for(pass->ctx);
        pass->mover_failed = pass->mover == NULL;
    }
    return pass->mover != NULL;
}

static CUmemLocation location(int ordinal, bool on_host)
{
    if (on_host)
        return (CUmemLocation){.type = CU_MEM_LOCATION_TYPE_HOST, .id = 0};
    CUdevice dev = 0;
    REAL(cuDeviceGet)(&dev, ordinal);
    return (CUmemLocation){.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = dev};
}

CUresult shim_uvm_place(CUdeviceptr base, uint64_t size, int ordinal, bool on_host)
{
    __typeof__(&cuMemAdvise_v2) advise = REAL(cuMemAdvise_v2);
    if (!advise)
        return CUDA_ERROR_NOT_SUPPORTED;
    CUmemLocation device = location(ordinal, false);
    CUresult rc = advise(base, size, CU_MEM_ADVISE_SET_PREFERRED_LOCATION,
                         on_host ? location(ordinal, true) : device);
    return rc == CUDA_SUCCESS ? advise(base, size, CU_MEM_ADVISE_SET_ACCESSED_BY, device) : rc;
}

/*
 * Queue the range's move to `where` on the shim's stream, prefetch_bytes at a time.  A
 * refused prefetch is not an error: the advice already placed the range, and pages follow
 * it when they are touched.
 */
static void prefetch(const struct uvm_pass *pass, const struct uvm_range *r, CUmemLocation where)
{
    __typeof__(&cuMemPrefetchAsync_v2) move = REAL(cuMemPrefetchAsync_v2);
    if (!move)
        return;
    uint64_t chunk = shim.uvm.prefetch_bytes ? shim.uvm.prefetch_bytes : r->size;
    for (uint64_t off = 0; off < r->size; off += chunk) {
        uint64_t len = r->size - off < chunk ? r->size - off : chunk;
        if (move(r->base + off, len, where, 0, pass->mover->stream) != CUDA_SUCCESS)
            return;
    }
}

/*
 * Advise a range, its charge already moved, to the host or the device and queue its move
 * there, counting the bytes migrated; false, nothing moved, when the driver refuses the
 * advice (the caller moves the charge back).
 */
static bool relocate(const struct uvm_pass *pass, struct uvm_range *r, bool to_host)
{
    if (shim_uvm_place(r->base, r->size, r->ordinal, to_host) != CUDA_SUCCESS)
        return false;
    prefetch(pass, r, location(r->ordinal, to_host));
    r->state = to_host ? UVM_SPILLED : UVM_RESIDENT;
    struct fcsp_usage_device *u = &shim.usage->device[r->entry];
    atomic_fetch_add_explicit(to_host ? &u->mem_migrated_out_bytes : &u->mem_migrated_in_bytes,
                              r->size, memory_order_relaxed);
    return true;
}

/*
 * Move a resident range to the host: first take its room in the spill bound (past it the
 * range stays, and nothing is evicted), then advise and prefetch it there.
 */
static bool evict(struct uvm_pass *pass, struct uvm_range *r)
{
    if (!have_mover(pass) ||
        !shim_memory_charge_spilled(r->ordinal, r->entry, r->size, false))
        return false;
    if (!relocate(pass, r, true)) {
        shim_memory_charge_resident(r->ordinal, r->entry, r->size, true);
        return false;
    }
    table.seen.evicted++;
    return true;
}

/* A resident range of the launch's context it may evict: not its own unless asked, and
 * only one last used before launch `before`. */
static bool evictable(const struct uvm_pass *pass, const struct uvm_range *r, bool own_too,
                      uint64_t before)
{
    return r->state == UVM_RESIDENT && r->ordinal == pass->ordinal && r->ctx == pass->ctx &&
           (own_too || r->last_launch != pass->launch) &&
           r->last_launch < before;
}

/* The next range to evict by the policy, or NULL. */
static struct uvm_range *victim(const struct uvm_pass *pass, bool own_too, uint64_t before)
{
    bool fifo = shim.uvm.evict_policy == FCSP_EVICT_FIFO;
    struct uvm_range *best = NULL;
    uint64_t best_key = UINT64_MAX;
    for (uint32_t i = 0; i < table.count; i++) {
        struct uvm_range *r = &table.ranges[i];
        if (!evictable(pass, r, own_too, before))
            continue;
        /* seq breaks ties: of ranges never used, the oldest goes first */
        uint64_t key = fifo ? r->seq : r->last_launch;
        if (!best || key < best_key || (key == best_key && r->seq < best->seq)) {
            best = r;
            best_key = key;
        }
    }
    return best;
}

static uint64_t used_bytes(const struct uvm_pass *pass)
{
    return atomic_load_explicit(&shim.usage->device[pass->entry].mem_used_bytes,
                                memory_order_relaxed);
}

/* Bytes of resident ranges the launch could evict for a range last used at `before`. */
static uint64_t evictable_bytes(const struct uvm_pass *pass, uint64_t before)
{
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < table.count; i++)
        if (evictable(pass, &table.ranges[i], false, before))
            bytes += table.ranges[i].size;
    return bytes;
}

/*
 * The quota was lowered below what the tenant holds on the device: evict by the policy,
 * the launch's own ranges last, until it fits or this process has nothing left to move.
 * Not bounded per launch: the quota is a limit, and a neighbour's guarantee waits on it.
 */
static void shrink_to_quota(struct uvm_pass *pass)
{
    while (used_bytes(pass) > pass->quota) {
        struct uvm_range *r = victim(pass, false, UVM_NO_LAUNCH);
        if (!r)
            r = victim(pass, true, UVM_NO_LAUNCH);
        if (!r || !evict(pass, r))
            return;
    }
}

/*
 * Room for `size` bytes in the quota, evicting what the launch does not use and was last
 * used before launch `before` (the previous use of the range that needs the room).
 */
static bool make_room(struct uvm_pass *pass, uint64_t size, uint64_t before)
{
    uint64_t used = used_bytes(pass);
    uint64_t room = pass->quota > used ? pass->quota - used : 0;
    if (room >= size)
        return true;
    if (room + evictable_bytes(pass, before) < size) {
        table.seen.declined++;
        return false; /* would evict for nothing, or what is in use as recently */
    }
    while (!(used_bytes(pass) + size <= pass->quota)) {
        struct uvm_range *r = victim(pass, false, before);
        if (!r || !evict(pass, r))
            return false;
    }
    return true;
}

/* Bring a spilled range to the device: reserve its room, then advise and prefetch it. */
static bool promote(struct uvm_pass *pass, struct uvm_range *r, uint64_t prev_launch)
{
    if (r->size > pass->quota || !have_mover(pass))
        return false;
    /* A range never used before evicts only ranges never used either. */
    uint64_t before = prev_launch == UVM_NOT_USED ? UVM_NOT_USED + 1 : prev_launch;
    bool charged = false;
    for (int tries = 0; tries < 2 && !charged; tries++) {
        if (!make_room(pass, r->size, before))
            return false;
        /* another thread's allocation may take the room first: one more try */
        charged = shim_memory_charge_resident(r->ordinal, r->entry, r->size, false);
    }
    if (!charged)
        return false;
    if (!relocate(pass, r, false)) {
        shim_memory_charge_spilled(r->ordinal, r->entry, r->size, true);
        return false;
    }
    table.seen.promoted++;
    pass->promoted = true;
    return true;
}

/* At most prefetch_bytes promoted per launch (one range at least), so no launch stalls. */
static void promote_wanted(struct uvm_pass *pass)
{
    uint64_t moved = 0;
    for (uint32_t w = 0; w < pass->nwanted && moved < shim.uvm.prefetch_bytes; w++) {
        struct uvm_range *r = &table.ranges[pass->wanted[w]];
        if (r->state == UVM_SPILLED && promote(pass, r, pass->wanted_prev[w]))
            moved += r->size;
    }
}

/* The launch's stream waits for the promotions, so that its kernel finds them in place. */
static void order_launch(const struct uvm_pass *pass, CUstream stream, bool ptsz)
{
    if (!pass->promoted)
        return;
    if (ptsz && !stream)
        stream = CU_STREAM_PER_THREAD;
    if (REAL(cuEventRecord)(pass->mover->done, pass->mover->stream) == CUDA_SUCCESS)
        REAL(cuStreamWaitEvent)(stream, pass->mover->done, 0);
}

/* Work queued into a stream being captured would join the graph: move nothing then. */
static bool capturing(CUstream stream, bool ptsz)
{
    __typeof__(&cuStreamIsCapturing) query =
        ptsz ? REAL(cuStreamIsCapturing_ptsz) : REAL(cuStreamIsCapturing);
    CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
    if (!query || query(stream, &status) != CUDA_SUCCESS)
        return true; /* cannot tell: leave the stream alone */
    return status != CU_STREAM_CAPTURE_STATUS_NONE;
}

/* The device, its spill-mode quota and the current context; false outside spill mode. */
static bool begin_pass(struct uvm_pass *pass, uint64_t launch)
{
    *pass = (struct uvm_pass){.launch = launch};
    pass->entry = shim_current_device(&pass->ordinal);
    if (pass->entry < 0 || atomic_load_explicit(&shim.exiting, memory_order_relaxed))
        return false;
    struct shim_limit limit = shim_device_limit(pass->ordinal);
    if (limit.mode != FCSP_MEM_SPILL || !limit.bytes)
        return false;
    pass->quota = limit.bytes;
    return REAL(cuCtxGetCurrent)(&pass->ctx) == CUDA_SUCCESS && pass->ctx;
}

void shim_uvm_before_launch(CUfunction f, void **params, CUstream stream, bool ptsz)
{
    struct uvm_pass pass;
    if (!begin_pass(&pass, 0))
        return;
    pthread_mutex_lock(&table.lock);
    pass.launch = ++table.launches;
    if (params && f)
        mark_used(&pass, f, params);
    bool over = used_bytes(&pass) > pass.quota;
    bool promote_some = pass.nwanted && shim.uvm.prefetch_bytes;
    if ((over || promote_some) && !capturing(stream, ptsz)) {
        if (over)
            shrink_to_quota(&pass);
        if (promote_some)
            promote_wanted(&pass);
        order_launch(&pass, stream, ptsz);
    }
    pthread_mutex_unlock(&table.lock);
}

void shim_uvm_fit_quota(int ordinal, int entry)
{
    struct uvm_pass pass;
    if (!begin_pass(&pass, UVM_NO_LAUNCH) || pass.ordinal != ordinal || pass.entry != entry ||
        used_bytes(&pass) <= pass.quota)
        return;
    pthread_mutex_lock(&table.lock);
    shrink_to_quota(&pass);
    pthread_mutex_unlock(&table.lock);
}

void shim_uvm_report(void)
{
    pthread_mutex_lock(&table.lock);
    shim_log(LOG_INFO, "spill mode: %llu launches (%llu without a parameter layout), %llu ranges "
                       "promoted, %llu evicted, %llu promotions declined",
             (unsigned long long)table.launches, (unsigned long long)table.seen.without_layout,
             (unsigned long long)table.seen.promoted, (unsigned long long)table.seen.evicted,
             (unsigned long long)table.seen.declined);
    pthread_mutex_unlock(&table.lock);
}
