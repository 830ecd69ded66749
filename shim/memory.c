/*
 * Device memory: every allocation path is charged to the tenant before it
 * reaches the driver, and given back when the memory is.
 *
 * The check and the charge are one compare-and-swap on
 * usage->device[d].mem_used_bytes, which all of a tenant's processes map
 * MAP_SHARED: two processes racing for the last bytes cannot both pass.
 * A failed allocation gives its reservation back.
 *
 * Accounting rules, per family:
 *  - cuMemAlloc, pitch, managed: the bytes asked for (pitch: trued up to
 *    pitch x height once the driver has chosen the pitch).
 *  - stream-ordered (cuMemAllocAsync, cuMemAllocFromPoolAsync): charged at
 *    allocation, released at cuMemFree(Async).  Bytes a pool keeps cached
 *    after a free are not charged: a pool cannot hold more than the peak of
 *    its live allocations, which the quota bounds, so cuMemPoolTrimTo needs
 *    no accounting of its own.
 *  - VMM (cuMemCreate): the handle's size on the device in prop->location,
 *    from create to cuMemRelease; host-located handles are not device memory.
 *  - arrays and mipmapped arrays: estimated from the descriptor, then trued
 *    up with cuArrayGetMemoryRequirements where the driver has it.
 *  - IPC imports: the mapping's size, charged to the importer (it holds the
 *    memory mapped; the exporter may be another tenant).
 *  - destroying a context (cuCtxDestroy, the last primary-context release,
 *    a reset) frees everything made in it, and so releases its charges.
 * Not charged: contexts themselves, memory imported by
 * cuMemImportFromShareableHandle or external-memory interop (the exporter
 * allocated it), graph memory nodes.
 *
 * Spill mode (FCSP_MEM_SPILL): an allocation that does not fit the quota is
 * served from managed memory kept in host memory and mapped by the GPU
 * (cuMemAllocManaged, then cuMemAdvise: preferred location the host, accessed
 * by the device), so that the tenant's memory on the device stays within its
 * quota.  It is charged to mem_spilled_bytes with one compare-and-swap that
 * checks the spill bound, never to mem_used_bytes; past the bound, or where
 * the driver will not take the advice, it is refused as in hard mode.
 *  - spill: cuMemAlloc_v2; cuMemAllocManaged, already managed, advised the
 *    same way; never past what the GPU has free (gpu_could_hold).
 *  - refused past the quota, as in hard mode: cuMemAlloc (its 32-bit pointer
 *    cannot hold a managed one: 64-bit drivers place none below 4 GiB), pitch (the pitch is the driver's
 *    choice for device memory, which managed memory has none of), stream-ordered
 *    and pool allocations (a managed pointer cannot come from a pool, nor go
 *    back to one at cuMemFreeAsync), VMM (a managed allocation cannot back a
 *    handle), arrays (an opaque device layout) and IPC imports (the exporter's
 *    memory, mapped where it is).
 * In spill mode cuMemAlloc_v2 within the quota is managed memory too, advised to live
 * on the device, so that uvm.c can move ranges between the device and the host as
 * launches use them; such ranges are tracked as TRACK_UVM, and the range table in uvm.c
 * says which counter holds their charge at free time.
 * The tenant's view (cuMemGetInfo, cuDeviceTotalMem, NVML) stays the quota,
 * so that frameworks size themselves to the device memory they really have.
 */
#include <string.h>

#include "calib.h"
#include "shim.h"
#include "track.h"
#include "uvm.h"

struct alloc_site {
    int ordinal; /* CUDA ordinal */
    int entry;   /* usage entry */
    CUcontext ctx;
};

void shim_memory_init(void)
{
    if (shim_track_init() < 0)
        shim_log(LOG_WARN, "cannot map the allocation table; frees will not release charges");
}

void shim_memory_after_fork_child(void)
{
    /* The parent's allocations are not the child's to free. */
    shim_track_init();
}

/* ---- charging ------------------------------------------------------------------ */

static void saturating_sub(_Atomic uint64_t *counter, uint64_t bytes)
{
    uint64_t value = atomic_load_explicit(counter, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(counter, &value, value > bytes ? value - bytes : 0,
                                                  memory_order_release, memory_order_relaxed))
        ;
}

static void update_peak(_Atomic uint64_t *peak, uint64_t value)
{
    uint64_t seen = atomic_load_explicit(peak, memory_order_relaxed);
    while (value > seen && !atomic_compare_exchange_weak_explicit(peak, &seen, value,
                                                                  memory_order_relaxed,
                                                                  memory_order_relaxed))
        ;
}

static void note_soft_excess(struct fcsp_usage_device *u, uint64_t before, uint64_t after,
                             uint64_t limit)
{
    atomic_fetch_add_explicit(&u->mem_soft_excess_bytes, after - (before > limit ? before : limit),
                              memory_order_relaxed);
    static atomic_flag warned = ATOMIC_FLAG_INIT;
    if (!atomic_flag_test_and_set(&warned))
        shim_log(LOG_WARN, "soft memory quota of %llu bytes exceeded (%llu in use); allowed",
                 (unsigned long long)limit, (unsigned long long)after);
}

/*
 * Reserve `size` bytes of site's device quota for the tenant: CUDA_SUCCESS, or
 * CUDA_ERROR_OUT_OF_MEMORY when they do not fit and the quota is not soft (the
 * caller refuses or spills).  Before that answer, look for dead processes whose
 * charge is still held, once.
 */
static CUresult reserve(const struct alloc_site *site, uint64_t size)
{
    struct fcsp_usage_proc *rec = shim_proc();
    struct fcsp_usage_device *u = &shim.usage->device[site->entry];
    struct shim_limit limit = shim_device_limit(site->ordinal);
    bool reaped = false;
    uint64_t used = atomic_load_explicit(&u->mem_used_bytes, memory_order_relaxed);
    for (;;) {
        uint64_t next = used + size < used ? UINT64_MAX : used + size;
        if (limit.bytes && next > limit.bytes && !reaped) {
            shim_reap_dead();
            reaped = true;
            used = atomic_load_explicit(&u->mem_used_bytes, memory_order_relaxed);
            continue;
        }
        if (limit.bytes && next > limit.bytes && limit.mode != FCSP_MEM_SOFT)
            return CUDA_ERROR_OUT_OF_MEMORY;
        if (atomic_compare_exchange_weak_explicit(&u->mem_used_bytes, &used, next,
                                                  memory_order_acq_rel, memory_order_relaxed)) {
            if (limit.bytes && next > limit.bytes)
                note_soft_excess(u, used, next, limit.bytes);
            update_peak(&u->mem_peak_bytes, next);
            atomic_fetch_add_explicit(&rec->mem_used_bytes[site->entry], size,
                                      memory_order_relaxed);
            return CUDA_SUCCESS;
        }
    }
}

static CUresult refuse(const struct alloc_site *site)
{
    atomic_fetch_add_explicit(&shim.usage->device[site->entry].mem_rejected, 1,
                              memory_order_relaxed);
    return CUDA_ERROR_OUT_OF_MEMORY;
}

/* Reserve, or refuse as hard mode does: the families that never spill. */
static CUresult charge(const struct alloc_site *site, uint64_t size)
{
    CUresult rc = reserve(site, size);
    return likely(rc == CUDA_SUCCESS) ? rc : refuse(site);
}

static void uncharge(int entry, uint64_t size)
{
    if (atomic_load_explicit(&shim.exiting, memory_order_relaxed) || !size)
        return; /* the exit path has given back everything this process held */
    struct fcsp_usage_proc *rec = shim_proc();
    saturating_sub(&rec->mem_used_bytes[entry], size);
    saturating_sub(&shim.usage->device[entry].mem_used_bytes, size);
}

/* Add `size` to counter unless that passes bound, in one compare-and-swap: the new value,
 * or 0 when it does not fit. */
static uint64_t add_within(_Atomic uint64_t *counter, uint64_t size, uint64_t bound)
{
    uint64_t value = atomic_load_explicit(counter, memory_order_relaxed);
    uint64_t next;
    do {
        next = value + size;
        if (next < value || next > bound)
            return 0;
    } while (!atomic_compare_exchange_weak_explicit(counter, &value, next, memory_order_acq_rel,
                                                    memory_order_relaxed));
    return next;
}

/* Spill mode: take `size` bytes of the bound past the quota (any, if force). */
static bool charge_spill_at(int ordinal, int entry, uint64_t size, bool force)
{
    struct fcsp_usage_device *u = &shim.usage->device[entry];
    uint64_t next = add_within(&u->mem_spilled_bytes, size,
                               force ? UINT64_MAX : shim_device_spill(ordinal));
    if (!next)
        return false;
    update_peak(&u->mem_spill_peak_bytes, next);
    atomic_fetch_add_explicit(&shim_proc()->mem_spilled_bytes[entry], size, memory_order_relaxed);
    return true;
}

static bool charge_spill(const struct alloc_site *site, uint64_t size)
{
    return charge_spill_at(site->ordinal, site->entry, size, false);
}

static void uncharge_spill(int entry, uint64_t size)
{
    if (atomic_load_explicit(&shim.exiting, memory_order_relaxed) || !size)
        return;
    struct fcsp_usage_proc *rec = shim_proc();
    saturating_sub(&rec->mem_spilled_bytes[entry], size);
    saturating_sub(&shim.usage->device[entry].mem_spilled_bytes, size);
}

/* Give back what an allocation tracked as `kind` was charged. */
static void uncharge_as(enum track_kind kind, int entry, uint64_t size)
{
    if (kind == TRACK_SPILL)
        uncharge_spill(entry, size);
    else
        uncharge(entry, size);
}

/* Where a migratable range's charge is: uvm.c's table says, until the range is forgotten. */
static enum track_kind charged_kind(uint64_t key)
{
    enum uvm_state state = UVM_RESIDENT;
    shim_uvm_forget(key, &state);
    return state == UVM_SPILLED ? TRACK_SPILL : TRACK_DEVPTR;
}

static void uncharge_hit(const struct track_hit *hit)
{
    enum track_kind kind = hit->kind == TRACK_UVM ? charged_kind(hit->key) : hit->kind;
    uncharge_as(kind, hit->entry, hit->size);
}

/* ---- spill mode: a range's charge moving with it (uvm.c) ------------------------------ */

bool shim_memory_charge_resident(int ordinal, int entry, uint64_t size, bool force)
{
    if (atomic_load_explicit(&shim.exiting, memory_order_relaxed))
        return false;
    struct fcsp_usage_device *u = &shim.usage->device[entry];
    uint64_t quota = shim_device_limit(ordinal).bytes;
    uint64_t next = add_within(&u->mem_used_bytes, size, force || !quota ? UINT64_MAX : quota);
    if (!next)
        return false;
    update_peak(&u->mem_peak_bytes, next);
    atomic_fetch_add_explicit(&shim_proc()->mem_used_bytes[entry], size, memory_order_relaxed);
    uncharge_spill(entry, size);
    return true;
}

bool shim_memory_charge_spilled(int ordinal, int entry, uint64_t size, bool force)
{
    if (atomic_load_explicit(&shim.exiting, memory_order_relaxed) ||
        !charge_spill_at(ordinal, entry, size, force))
        return false;
    uncharge(entry, size);
    return true;
}

/* Where an allocation made now lands: the current context's device. */
static bool site_current(struct alloc_site *site)
{
    if (!shim.active || atomic_load_explicit(&shim.exiting, memory_order_relaxed))
        return false;
    site->entry = shim_current_device(&site->ordinal);
    if (site->entry < 0)
        return false;
    site->ctx = NULL;
    REAL(cuCtxGetCurrent)(&site->ctx);
    return true;
}

static bool site_device(struct alloc_site *site, CUdevice dev)
{
    if (!shim.active || atomic_load_explicit(&shim.exiting, memory_order_relaxed))
        return false;
    if (!shim_devices_ready())
        shim_devices_init();
    site->ordinal = shim_device_ordinal(dev);
    site->entry = shim_device_entry(site->ordinal);
    site->ctx = NULL; /* VMM handles outlive contexts */
    return site->entry >= 0;
}

/* After the driver answered: keep the charge and remember it, or give it back. */
static void settle(const struct alloc_site *site, uint64_t size, CUresult rc, uint64_t key,
                   enum track_kind kind)
{
    if (rc != CUDA_SUCCESS) {
        uncharge_as(kind, site->entry, size);
        return;
    }
    if (shim_track_insert(key, kind, site->entry, size, site->ctx) < 0) {
        static atomic_flag warned = ATOMIC_FLAG_INIT;
        if (!atomic_flag_test_and_set(&warned))
            shim_log(LOG_WARN, "allocation table full: some charges stay until the process exits");
    }
}

/* Remove before the driver frees, so a concurrent allocation reusing the address cannot be
 * confused with this one; put it back if the driver refuses the free. */
struct pending_free {
    bool found;
    struct track_hit hit;
    uint64_t key;
    enum track_kind kind;
    CUcontext ctx;
};

static struct pending_free begin_free(uint64_t key, enum track_kind kind)
{
    struct pending_free f = {.key = key, .kind = kind};
    if (shim.active)
        f.found = shim_track_remove(key, kind, &f.hit);
    return f;
}

static CUresult end_free(const struct pending_free *f, CUresult rc)
{
    if (!f->found)
        return rc;
    if (rc == CUDA_SUCCESS)
        uncharge_hit(&f->hit);
    else
        shim_track_insert(f->key, f->kind, f->hit.entry, f->hit.size, NULL);
    return rc;
}

/* ---- spill mode ------------------------------------------------------------------ */

/* Set by the first spill: from then on a device pointer a free does not find as device
 * memory may be a spilled one. */
static _Atomic bool spilled_any;

/*
 * A migratable range: forgotten by uvm.c before the driver frees it (no migration can then
 * touch it, nor confuse it with a new allocation at its address), charged as its state
 * says.  Should the driver refuse the free, it goes back as a fixed charge of that kind.
 */
static struct pending_free begin_free_migratable(CUdeviceptr dptr)
{
    struct pending_free f = begin_free(dptr, TRACK_UVM);
    if (f.found)
        f.kind = f.hit.kind = charged_kind(dptr);
    return f;
}

static struct pending_free begin_free_ptr(CUdeviceptr dptr)
{
    if (unlikely(shim_uvm_on())) {
        struct pending_free f = begin_free_migratable(dptr);
        if (f.found)
            return f;
    }
    struct pending_free f = begin_free(dptr, TRACK_DEVPTR);
    if (!f.found && atomic_load_explicit(&spilled_any, memory_order_relaxed))
        f = begin_free(dptr, TRACK_SPILL);
    return f;
}

static CUdevice site_handle(const struct alloc_site *site)
{
    CUdevice dev = 0;
    REAL(cuDeviceGet)(&dev, site->ordinal);
    return dev;
}

static void note_spill(const struct alloc_site *site)
{
    static atomic_flag told = ATOMIC_FLAG_INIT;
    atomic_store_explicit(&spilled_any, true, memory_order_relaxed);
    if (!atomic_flag_test_and_set(&told))
        shim_log(LOG_INFO, "device %d: memory quota full; allocations past it are served from "
                           "host memory, up to %llu bytes", site->ordinal,
                 (unsigned long long)shim_device_spill(site->ordinal));
}

/* The driver would not keep spilled memory in host memory: refuse rather than let it
 * migrate onto the device past the quota. */
static CUresult refuse_unadvised(const struct alloc_site *site, CUresult advice)
{
    static atomic_flag warned = ATOMIC_FLAG_INIT;
    if (!atomic_flag_test_and_set(&warned))
        shim_log(LOG_WARN, "cuMemAdvise failed (%d): allocations past the memory quota are "
                           "refused", (int)advice);
    return refuse(site);
}

/*
 * What a tenant spills never exceeds what the GPU has free: unified memory is then never
 * more than the device could hold, whatever the driver decides to migrate, and the driver
 * is never asked to oversubscribe the device with it.
 */
static bool gpu_could_hold(const struct alloc_site *site, uint64_t size)
{
    size_t free_bytes = 0, total_bytes = 0;
    if (REAL(cuMemGetInfo_v2)(&free_bytes, &total_bytes) != CUDA_SUCCESS)
        return false;
    uint64_t spilled = atomic_load_explicit(&shim.usage->device[site->entry].mem_spilled_bytes,
                                            memory_order_relaxed);
    return spilled + size >= spilled && spilled + size <= free_bytes;
}

/*
 * Past the quota: in spill mode, managed memory kept in host memory (it never takes the
 * device's memory, and the device reads it without faulting it over), charged as spilled;
 * past the spill bound, or in hard mode, refused.
 */
static CUresult spill(const struct alloc_site *site, CUdeviceptr *dptr, uint64_t size,
                      unsigned int flags)
{
    if (shim_device_limit(site->ordinal).mode != FCSP_MEM_SPILL || !gpu_could_hold(site, size) ||
        !charge_spill(site, size))
        return refuse(site);
    CUresult rc = REAL(cuMemAllocManaged)(dptr, size, flags);
    if (rc != CUDA_SUCCESS) {
        uncharge_spill(site->entry, size);
        return rc;
    }
    CUresult advice = shim_uvm_place(*dptr, size, site->ordinal, true);
    if (advice != CUDA_SUCCESS) {
        REAL(cuMemFree_v2)(*dptr);
        uncharge_spill(site->entry, size);
        return refuse_unadvised(site, advice);
    }
    note_spill(site);
    bool migratable = shim_uvm_on() && flags == CU_MEM_ATTACH_GLOBAL &&
                      shim_uvm_add(*dptr, size, site->ordinal, site->entry, site->ctx,
                                   UVM_SPILLED);
    settle(site, size, rc, *dptr, migratable ? TRACK_UVM : TRACK_SPILL);
    return rc;
}

/*
 * Spill mode, within the quota (already reserved): managed memory that prefers the device,
 * which uvm.c may later move to the host to make room for a hotter range.  Without the
 * advice it is still managed memory charged to the quota, and placed where it is touched.
 */
static CUresult alloc_resident(const struct alloc_site *site, CUdeviceptr *dptr, uint64_t size)
{
    CUresult rc = REAL(cuMemAllocManaged)(dptr, size, CU_MEM_ATTACH_GLOBAL);
    if (rc != CUDA_SUCCESS) {
        uncharge(site->entry, size);
        return rc;
    }
    shim_uvm_place(*dptr, size, site->ordinal, false);
    bool migratable = shim_uvm_add(*dptr, size, site->ordinal, site->entry, site->ctx,
                                   UVM_RESIDENT);
    settle(site, size, rc, *dptr, migratable ? TRACK_UVM : TRACK_DEVPTR);
    return rc;
}

/* Spill mode on site's device: first shrink to a quota that was lowered. */
static bool migratable_site(const struct alloc_site *site)
{
    struct shim_limit limit = shim_device_limit(site->ordinal);
    if (limit.mode != FCSP_MEM_SPILL)
        return false;
    if (limit.bytes && atomic_load_explicit(&shim.usage->device[site->entry].mem_used_bytes,
                                            memory_order_relaxed) > limit.bytes)
        shim_uvm_fit_quota(site->ordinal, site->entry);
    return true;
}

/* ---- linear allocations ------------------------------------------------------- */

SHIM_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)
{
    struct alloc_site site;
    if (!site_current(&site))
        return REAL(cuMemAlloc_v2)(dptr, bytesize);
    bool migratable = unlikely(shim_uvm_on()) && migratable_site(&site);
    if (unlikely(reserve(&site, bytesize) != CUDA_SUCCESS))
        return spill(&site, dptr, bytesize, CU_MEM_ATTACH_GLOBAL);
    if (migratable)
        return alloc_resident(&site, dptr, bytesize);
    CUresult rc = REAL(cuMemAlloc_v2)(dptr, bytesize);
    settle(&site, bytesize, rc, rc == CUDA_SUCCESS ? *dptr : 0, TRACK_DEVPTR);
    return rc;
}

/* The CUDA 3.1-era 32-bit entry point, still exported and reachable by version. */
SHIM_EXPORT CUresult cuMemAlloc(CUdeviceptr_v1 *dptr, unsigned int bytesize)
{
    struct alloc_site site;
    if (!site_current(&site))
        return REAL(cuMemAlloc)(dptr, bytesize);
    CUresult rc = charge(&site, bytesize);
    if (rc != CUDA_SUCCESS)
        return rc;
    rc = REAL(cuMemAlloc)(dptr, bytesize);
    settle(&site, bytesize, rc, rc == CUDA_SUCCESS ? *dptr : 0, TRACK_DEVPTR);
    return rc;
}

SHIM_EXPORT CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags)
{
    struct alloc_site site;
    if (!site_current(&site))
        return REAL(cuMemAllocManaged)(dptr, bytesize, flags);
    if (unlikely(reserve(&site, bytesize) != CUDA_SUCCESS))
        return spill(&site, dptr, bytesize, flags);
    CUresult rc = REAL(cuMemAllocManaged)(dptr, bytesize, flags);
    settle(&site, bytesize, rc, rc == CUDA_SUCCESS ? *dptr : 0, TRACK_DEVPTR);
    return rc;
}

/* The driver picks the pitch; reserve a 512-byte-aligned guess, then true it up. */
static uint64_t pitch_guess(uint64_t width, uint64_t height)
{
    return ((width + 511) & ~(uint64_t)511) * height;
}

static CUresult true_up(const struct alloc_site *site, uint64_t charged, uint64_t actual)
{
    if (actual > charged)
        return charge(site, actual - charged);
    uncharge(site->entry, charged - actual);
    return CUDA_SUCCESS;
}

/* After a pitched allocation: charge what the driver really gave (pitch x height), or
 * free it again if that no longer fits the quota. */
static CUresult settle_pitch(const struct alloc_site *site, uint64_t guess, CUresult rc,
                             CUdeviceptr ptr, uint64_t actual, bool v1)
{
    if (rc == CUDA_SUCCESS && true_up(site, guess, actual) != CUDA_SUCCESS) {
        if (v1)
            REAL(cuMemFree)((CUdeviceptr_v1)ptr);
        else
            REAL(cuMemFree_v2)(ptr);
        uncharge(site->entry, guess);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    settle(site, rc == CUDA_SUCCESS ? actual : guess, rc, rc == CUDA_SUCCESS ? ptr : 0,
           TRACK_DEVPTR);
    return rc;
}

SHIM_EXPORT CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pPitch, size_t WidthInBytes,
                                        size_t Height, unsigned int ElementSizeBytes)
{
    struct alloc_site site;
    if (!site_current(&site))
        return REAL(cuMemAllocPitch_v2)(dptr, pPitch, WidthInBytes, Height, ElementSizeBytes);
    uint64_t guess = pitch_guess(WidthInBytes, Height);
    CUresult rc = charge(&site, guess);
    if (rc != CUDA_SUCCESS)
        return rc;
    rc = REAL(cuMemAllocPitch_v2)(dptr, pPitch, WidthInBytes, Height, ElementSizeBytes);
    return settle_pitch(&site, guess, rc, rc == CUDA_SUCCESS ? *dptr : 0,
                        rc == CUDA_SUCCESS ? (uint64_t)*pPitch * Height : 0, false);
}

SHIM_EXPORT CUresult cuMemAllocPitch(CUdeviceptr_v1 *dptr, unsigned int *pPitch,
                                     unsigned int WidthInBytes, unsigned int Height,
                                     unsigned int ElementSizeBytes)
{
    struct alloc_site site;
    if (!site_current(&site))
        return REAL(cuMemAllocPitch)(dptr, pPitch, WidthInBytes, Height, ElementSizeBytes);
    uint64_t guess = pitch_guess(WidthInBytes, Height);
    CUresult rc = charge(&site, guess);
    if (rc != CUDA_SUCCESS)
        return rc;
    rc = REAL(cuMemAllocPitch)(dptr, pPitch, WidthInBytes, Height, ElementSizeBytes);
    return settle_pitch(&site, guess, rc, rc == CUDA_SUCCESS ? *dptr : 0,
                        rc == CUDA_SUCCESS ? (uint64_t)*pPitch * Height : 0, true);
}

SHIM_EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr)
{
    struct pending_free f = begin_free_ptr(dptr);
    return end_free(&f, REAL(cuMemFree_v2)(dptr));
}

SHIM_EXPORT CUresult cuMemFree(CUdeviceptr_v1 dptr)
{
    struct pending_free f = begin_free_ptr(dptr);
    return end_free(&f, REAL(cuMemFree)(dptr));
}

/* ---- stream-ordered allocations and pools ------------------------------------- */

static CUresult alloc_async(__typeof__(&cuMemAllocAsync) real, CUdeviceptr *dptr, size_t bytesize,
                            CUstream hStream)
{
    struct alloc_site site;
    if (!site_current(&site))
        return real(dptr, bytesize, hStream);
    CUresult rc = charge(&site, bytesize);
    if (rc != CUDA_SUCCESS)
        return rc;
    rc = real(dptr, bytesize, hStream);
    settle(&site, bytesize, rc, rc == CUDA_SUCCESS ? *dptr : 0, TRACK_DEVPTR);
    return rc;
}

static CUresult alloc_from_pool(__typeof__(&cuMemAllocFromPoolAsync) real, CUdeviceptr *dptr,
                                size_t bytesize, CUmemoryPool pool, CUstream hStream)
{
    struct alloc_site site;
    if (!site_current(&site))
        return real(dptr, bytesize, pool, hStream);
    CUresult rc = charge(&site, bytesize);
    if (rc != CUDA_SUCCESS)
        return rc;
    rc = real(dptr, bytesize, pool, hStream);
    settle(&site, bytesize, rc, rc == CUDA_SUCCESS ? *dptr : 0, TRACK_DEVPTR);
    return rc;
}

SHIM_EXPORT CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
{
    return alloc_async(REAL(cuMemAllocAsync), dptr, bytesize, hStream);
}

SHIM_EXPORT CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
{
    return alloc_async(REAL(cuMemAllocAsync_ptsz), dptr, bytesize, hStream);
}

SHIM_EXPORT CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize,
                                             CUmemoryPool pool, CUstream hStream)
{
    return alloc_from_pool(REAL(cuMemAllocFromPoolAsync), dptr, bytesize, pool, hStream);
}

SHIM_EXPORT CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize,
                                                  CUmemoryPool pool, CUstream hStream)
{
    return alloc_from_pool(REAL(cuMemAllocFromPoolAsync_ptsz), dptr, bytesize, pool, hStream);
}

SHIM_EXPORT CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream)
{
    struct pending_free f = begin_free_ptr(dptr);
    return end_free(&f, REAL(cuMemFreeAsync)(dptr, hStream));
}

SHIM_EXPORT CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream hStream)
{
    struct pending_free f = begin_free_ptr(dptr);
    return end_free(&f, REAL(cuMemFreeAsync_ptsz)(dptr, hStream));
}

/* ---- VMM ------------------------------------------------------------------------ */

SHIM_EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                                 const CUmemAllocationProp *prop, unsigned long long flags)
{
    struct alloc_site site;
    if (!prop || prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
        !site_device(&site, prop->location.id))
        return REAL(cuMemCreate)(handle, size, prop, flags);
    CUresult rc = charge(&site, size);
    if (rc != CUDA_SUCCESS)
        return rc;
    rc = REAL(cuMemCreate)(handle, size, prop, flags);
    settle(&site, size, rc, rc == CUDA_SUCCESS ? *handle : 0, TRACK_VMM);
    return rc;
}

SHIM_EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle handle)
{
    struct pending_free f = begin_free(handle, TRACK_VMM);
    return end_free(&f, REAL(cuMemRelease)(handle));
}

/* ---- arrays --------------------------------------------------------------------- */

static uint64_t format_bytes(CUarray_format format)
{
    switch (format) {
    case CU_AD_FORMAT_UNSIGNED_INT8:
    case CU_AD_FORMAT_SIGNED_INT8:
        return 1;
    case CU_AD_FORMAT_UNSIGNED_INT16:
    case CU_AD_FORMAT_SIGNED_INT16:
    case CU_AD_FORMAT_HALF:
        return 2;
    case CU_AD_FORMAT_UNSIGNED_INT32:
    case CU_AD_FORMAT_SIGNED_INT32:
    case CU_AD_FORMAT_FLOAT:
        return 4;
    default:
        return 16; /* packed and block-compressed formats: over-estimate, trued up later */
    }
}

static uint64_t at_least_1(uint64_t v)
{
    return v ? v : 1;
}

static uint64_t array_bytes(uint64_t w, uint64_t h, uint64_t d, CUarray_format f, unsigned ch)
{
    return at_least_1(w) * at_least_1(h) * at_least_1(d) * format_bytes(f) * at_least_1(ch);
}

static uint64_t mipmap_bytes(const CUDA_ARRAY3D_DESCRIPTOR *desc, unsigned levels)
{
    uint64_t total = 0;
    for (unsigned l = 0; l < at_least_1(levels) && l < 64; l++) {
        bool layered = desc->Flags & (CUDA_ARRAY3D_LAYERED | CUDA_ARRAY3D_CUBEMAP);
        total += array_bytes(at_least_1(desc->Width >> l), at_least_1(desc->Height >> l),
                             layered ? desc->Depth : at_least_1(desc->Depth >> l), desc->Format,
                             desc->NumChannels);
    }
    return total;
}

/* The driver's own figure for an array, where it has one; else our estimate. */
static uint64_t array_actual(const struct alloc_site *site, CUarray array, uint64_t estimate)
{
    CUDA_ARRAY_MEMORY_REQUIREMENTS req;
    __typeof__(&cuArrayGetMemoryRequirements) query = REAL(cuArrayGetMemoryRequirements);
    if (query && query(&req, array, site_handle(site)) == CUDA_SUCCESS && req.size)
        return req.size;
    return estimate;
}

static CUresult settle_array(const struct alloc_site *site, uint64_t size, CUresult rc,
                             CUarray *array)
{
    if (rc != CUDA_SUCCESS) {
        uncharge(site->entry, size);
        return rc;
    }
    uint64_t actual = array_actual(site, *array, size);
    if (true_up(site, size, actual) != CUDA_SUCCESS) {
        REAL(cuArrayDestroy)(*array);
        uncharge(site->entry, size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    settle(site, actual, rc, (uint64_t)(uintptr_t)*array, TRACK_ARRAY);
    return rc;
}

SHIM_EXPORT CUresult cuArrayCreate_v2(CUarray *pHandle, const CUDA_ARRAY_DESCRIPTOR *desc)
{
    struct alloc_site site;
    if (!desc || !site_current(&site))
        return REAL(cuArrayCreate_v2)(pHandle, desc);
    uint64_t size = array_bytes(desc->Width, desc->Height, 1, desc->Format, desc->NumChannels);
    CUresult rc = charge(&site, size);
    if (rc != CUDA_SUCCESS)
        return rc;
    return settle_array(&site, size, REAL(cuArrayCreate_v2)(pHandle, desc), pHandle);
}

SHIM_EXPORT CUresult cuArrayCreate(CUarray *pHandle, const CUDA_ARRAY_DESCRIPTOR_v1 *desc)
{
    struct alloc_site site;
    if (!desc || !site_current(&site))
        return REAL(cuArrayCreate)(pHandle, desc);
    uint64_t size = array_bytes(desc->Width, desc->Height, 1, desc->Format, desc->NumChannels);
    CUresult rc = charge(&site, size);
    if (rc != CUDA_SUCCESS)
        return rc;
    return settle_array(&site, size, REAL(cuArrayCreate)(pHandle, desc), pHandle);
}

SHIM_EXPORT CUresult cuArray3DCreate_v2(CUarray *pHandle, const CUDA_ARRAY3D_DESCRIPTOR *desc)
{
    struct alloc_site site;
    if (!desc || !site_current(&site))
        return REAL(cuArray3DCreate_v2)(pHandle, desc);
    uint64_t size = array_bytes(desc->Width, desc->Height, desc->Depth, desc->Format,
                                desc->NumChannels);
    CUresult rc = charge(&site, size);
    if (rc != CUDA_SUCCESS)
        return rc;
    return settle_array(&site, size, REAL(cuArray3DCreate_v2)(pHandle, desc), pHandle);
}

SHIM_EXPORT CUresult cuArray3DCreate(CUarray *pHandle, const CUDA_ARRAY3D_DESCRIPTOR_v1 *desc)
{
    struct alloc_site site;
    if (!desc || !site_current(&site))
        return REAL(cuArray3DCreate)(pHandle, desc);
    uint64_t size = array_bytes(desc->Width, desc->Height, desc->Depth, desc->Format,
                                desc->NumChannels);
    CUresult rc = charge(&site, size);
    if (rc != CUDA_SUCCESS)
        return rc;
    return settle_array(&site, size, REAL(cuArray3DCreate)(pHandle, desc), pHandle);
}

SHIM_EXPORT CUresult cuArrayDestroy(CUarray hArray)
{
    struct pending_free f = begin_free((uint64_t)(uintptr_t)hArray, TRACK_ARRAY);
    return end_free(&f, REAL(cuArrayDestroy)(hArray));
}

SHIM_EXPORT CUresult cuMipmappedArrayCreate(CUmipmappedArray *pHandle,
                                            const CUDA_ARRAY3D_DESCRIPTOR *desc,
                                            unsigned int numMipmapLevels)
{
    struct alloc_site site;
    if (!desc || !site_current(&site))
        return REAL(cuMipmappedArrayCreate)(pHandle, desc, numMipmapLevels);
    uint64_t size = mipmap_bytes(desc, numMipmapLevels);
    CUresult rc = charge(&site, size);
    if (rc != CUDA_SUCCESS)
        return rc;
    rc = REAL(cuMipmappedArrayCreate)(pHandle, desc, numMipmapLevels);
    if (rc != CUDA_SUCCESS) {
        uncharge(site.entry, size);
        return rc;
    }
    CUDA_ARRAY_MEMORY_REQUIREMENTS req;
    __typeof__(&cuMipmappedArrayGetMemoryRequirements) query =
        REAL(cuMipmappedArrayGetMemoryRequirements);
    uint64_t actual = size;
    if (query && query(&req, *pHandle, site_handle(&site)) == CUDA_SUCCESS && req.size)
        actual = req.size;
    if (true_up(&site, size, actual) != CUDA_SUCCESS) {
        REAL(cuMipmappedArrayDestroy)(*pHandle);
        uncharge(site.entry, size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    settle(&site, actual, rc, (uint64_t)(uintptr_t)*pHandle, TRACK_MIPMAP);
    return rc;
}

SHIM_EXPORT CUresult cuMipmappedArrayDestroy(CUmipmappedArray hMipmappedArray)
{
    struct pending_free f = begin_free((uint64_t)(uintptr_t)hMipmappedArray, TRACK_MIPMAP);
    return end_free(&f, REAL(cuMipmappedArrayDestroy)(hMipmappedArray));
}

/* ---- IPC imports ----------------------------------------------------------------- */

static CUresult charge_ipc(CUdeviceptr *pdptr, CUresult rc)
{
    struct alloc_site site;
    if (rc != CUDA_SUCCESS || !site_current(&site))
        return rc;
    CUdeviceptr base = 0;
    size_t size = 0;
    if (REAL(cuMemGetAddressRange_v2)(&base, &size, *pdptr) != CUDA_SUCCESS)
        return rc; /* cannot size it: leave it uncharged rather than fail the import */
    if (charge(&site, size) != CUDA_SUCCESS) {
        REAL(cuIpcCloseMemHandle)(*pdptr);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    settle(&site, size, rc, *pdptr, TRACK_IPC);
    return rc;
}

SHIM_EXPORT CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *pdptr, CUipcMemHandle handle,
                                           unsigned int Flags)
{
    return charge_ipc(pdptr, REAL(cuIpcOpenMemHandle_v2)(pdptr, handle, Flags));
}

SHIM_EXPORT CUresult cuIpcOpenMemHandle(CUdeviceptr *pdptr, CUipcMemHandle handle,
                                        unsigned int Flags)
{
    return charge_ipc(pdptr, REAL(cuIpcOpenMemHandle)(pdptr, handle, Flags));
}

SHIM_EXPORT CUresult cuIpcCloseMemHandle(CUdeviceptr dptr)
{
    struct pending_free f = begin_free(dptr, TRACK_IPC);
    return end_free(&f, REAL(cuIpcCloseMemHandle)(dptr));
}

/* ---- contexts -------------------------------------------------------------------- */

static void release_context(CUcontext ctx)
{
    atomic_fetch_add_explicit(&shim_context_epoch, 1, memory_order_relaxed);
    shim_calib_forget_context(ctx);
    if (shim_uvm_on())
        shim_uvm_forget_context(ctx);
    if (ctx)
        shim_track_remove_ctx(ctx, uncharge_hit);
}

SHIM_EXPORT CUresult cuCtxDestroy_v2(CUcontext ctx)
{
    CUresult rc = REAL(cuCtxDestroy_v2)(ctx);
    if (rc == CUDA_SUCCESS && shim.active)
        release_context(ctx);
    return rc;
}

SHIM_EXPORT CUresult cuCtxDestroy(CUcontext ctx)
{
    CUresult rc = REAL(cuCtxDestroy)(ctx);
    if (rc == CUDA_SUCCESS && shim.active)
        release_context(ctx);
    return rc;
}

/*
 * The primary context's handle, if it is active, without creating it:
 * retaining an inactive primary context would build one just to look at it.
 */
static CUcontext active_primary(CUdevice dev)
{
    unsigned int flags = 0;
    int active = 0;
    CUcontext ctx = NULL;
    if (!shim.active || REAL(cuDevicePrimaryCtxGetState)(dev, &flags, &active) != CUDA_SUCCESS ||
        !active)
        return NULL;
    if (REAL(cuDevicePrimaryCtxRetain)(&ctx, dev) != CUDA_SUCCESS)
        return NULL;
    REAL(cuDevicePrimaryCtxRelease_v2)(dev);
    return ctx;
}

static void after_primary_release(CUdevice dev, CUcontext primary, CUresult rc)
{
    unsigned int flags = 0;
    int active = 1;
    if (rc == CUDA_SUCCESS && primary &&
        REAL(cuDevicePrimaryCtxGetState)(dev, &flags, &active) == CUDA_SUCCESS && !active)
        release_context(primary);
}

SHIM_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev)
{
    CUcontext primary = active_primary(dev);
    CUresult rc = REAL(cuDevicePrimaryCtxRelease_v2)(dev);
    after_primary_release(dev, primary, rc);
    return rc;
}

SHIM_EXPORT CUresult cuDevicePrimaryCtxRelease(CUdevice dev)
{
    CUcontext primary = active_primary(dev);
    CUresult rc = REAL(cuDevicePrimaryCtxRelease)(dev);
    after_primary_release(dev, primary, rc);
    return rc;
}

SHIM_EXPORT CUresult cuDevicePrimaryCtxReset_v2(CUdevice dev)
{
    CUcontext primary = active_primary(dev);
    CUresult rc = REAL(cuDevicePrimaryCtxReset_v2)(dev);
    if (rc == CUDA_SUCCESS && primary)
        release_context(primary);
    return rc;
}

SHIM_EXPORT CUresult cuDevicePrimaryCtxReset(CUdevice dev)
{
    CUcontext primary = active_primary(dev);
    CUresult rc = REAL(cuDevicePrimaryCtxReset)(dev);
    if (rc == CUDA_SUCCESS && primary)
        release_context(primary);
    return rc;
}

/* ---- the tenant's view -------------------------------------------------------------- */

void shim_memory_view(int entry, struct shim_limit limit, uint64_t real_free, uint64_t real_total,
                      uint64_t *free_out, uint64_t *total_out)
{
    *free_out = real_free;
    *total_out = real_total;
    if (!limit.bytes || entry < 0)
        return;
    uint64_t total = limit.bytes < real_total || !real_total ? limit.bytes : real_total;
    uint64_t used = atomic_load_explicit(&shim.usage->device[entry].mem_used_bytes,
                                         memory_order_relaxed);
    uint64_t quota_free = total > used ? total - used : 0;
    *free_out = quota_free < real_free ? quota_free : real_free;
    *total_out = total;
}

/* The quota in force for the current context's device, with dead charges reaped. */
static bool current_view(int *entry, struct shim_limit *limit)
{
    if (!shim.active)
        return false;
    int ordinal;
    *entry = shim_current_device(&ordinal);
    if (*entry < 0)
        return false;
    *limit = shim_device_limit(ordinal);
    if (!limit->bytes)
        return false;
    shim_reap_dead();
    return true;
}

SHIM_EXPORT CUresult cuMemGetInfo_v2(size_t *free, size_t *total)
{
    CUresult rc = REAL(cuMemGetInfo_v2)(free, total);
    int entry;
    struct shim_limit limit;
    if (rc != CUDA_SUCCESS || !free || !total || !current_view(&entry, &limit))
        return rc;
    uint64_t f, t;
    shim_memory_view(entry, limit, *free, *total, &f, &t);
    *free = f;
    *total = t;
    return rc;
}

SHIM_EXPORT CUresult cuMemGetInfo(unsigned int *free, unsigned int *total)
{
    CUresult rc = REAL(cuMemGetInfo)(free, total);
    int entry;
    struct shim_limit limit;
    if (rc != CUDA_SUCCESS || !free || !total || !current_view(&entry, &limit))
        return rc;
    uint64_t f, t;
    shim_memory_view(entry, limit, *free, *total, &f, &t);
    *free = (unsigned int)(f > UINT32_MAX ? UINT32_MAX : f);
    *total = (unsigned int)(t > UINT32_MAX ? UINT32_MAX : t);
    return rc;
}

static uint64_t device_quota(CUdevice dev, uint64_t real_total)
{
    if (!shim.active)
        return real_total;
    if (!shim_devices_ready())
        shim_devices_init();
    struct shim_limit limit = shim_device_limit(shim_device_ordinal(dev));
    return limit.bytes && limit.bytes < real_total ? limit.bytes : real_total;
}

SHIM_EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
    CUresult rc = REAL(cuDeviceTotalMem_v2)(bytes, dev);
    if (rc == CUDA_SUCCESS && bytes)
        *bytes = device_quota(dev, *bytes);
    return rc;
}

SHIM_EXPORT CUresult cuDeviceTotalMem(unsigned int *bytes, CUdevice dev)
{
    CUresult rc = REAL(cuDeviceTotalMem)(bytes, dev);
    if (rc == CUDA_SUCCESS && bytes)
        *bytes = (unsigned int)device_quota(dev, *bytes);
    return rc;
}

SHIM_EXPORT CUresult cuInit(unsigned int flags)
{
    shim_mps_before_init();
    CUresult rc = REAL(cuInit)(flags);
    if (rc == CUDA_SUCCESS && shim.active) {
        shim_devices_init();
        shim_proc();
    }
    return rc;
}
