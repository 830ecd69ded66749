/*
 * Devices and limits: which slot entry a CUDA ordinal is, what its real size
 * is, and what quota is in force on it.
 *
 * Slot entry i is CUDA ordinal i, unless the entry carries a UUID
 * (FCSP_DEV_SELECTED_BY_UUID), in which case the device with that UUID is
 * meant whatever its ordinal.  The quota is the smallest of: the slot's bytes,
 * the slot's percentage of the real total, and BUD_MEMORY_LIMIT(_DEV<n>), so
 * that the environment can lower a slot's grant and never raise it.  The same
 * holds for the mode and spill mode's bound (env.c).
 */
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>

#include "shim.h"
#include "uvm.h"

struct shim_device {
    CUdevice handle;
    int entry;            /* slot / usage entry; -1: not accounted */
    uint64_t real_total;  /* the real driver's cuDeviceTotalMem */
    _Atomic uint64_t limit_bytes;
    _Atomic int limit_mode;         /* enum fcsp_mem_mode */
    _Atomic uint64_t spill_bytes;   /* spill mode: how far past limit_bytes */
};

int shim_ndevices;
static struct shim_device devices[FCSP_MAX_DEVICES];
static _Atomic bool devices_ready;
static pthread_mutex_t devices_lock = PTHREAD_MUTEX_INITIALIZER;
static _Atomic uint64_t generation_seen;

/* ---- reading the limits file (host-written, seqlock) ----------------------- */

struct slot_entry_view {
    char uuid[FCSP_UUID_LEN];
    uint32_t flags;
    uint64_t mem_limit_bytes;
    uint32_t mem_limit_basis_points;
    uint64_t mem_spill_bytes;
    uint32_t mem_spill_centi;
};

struct slot_view {
    uint32_t mem_mode;
    uint32_t device_count;
    struct shim_uvm uvm;
};

static void copy_uvm(const struct fcsp_limits *l, struct shim_uvm *uvm)
{
    uvm->profile = l->uvm_profile;
    for (unsigned level = 0; level < 3; level++)
        uvm->pressure_pct[level] = (uint8_t)(l->pressure_pct >> (level * FCSP_PRESSURE_BITS));
    uvm->prefetch_bytes = l->prefetch_bytes;
    uvm->evict_policy = l->evict_policy;
}

/*
 * Copy what we need under the seqlock.  A host that died mid-write would
 * leave seq odd for ever: after a bounded wait we take what is there, since
 * a stuck tenant is worse than one stale read.
 */
static void read_limits(int entry, struct slot_entry_view *view, struct slot_view *slot)
{
    const struct fcsp_limits *l = shim.limits;
    for (unsigned attempt = 0;; attempt++) {
        uint32_t seq = atomic_load_explicit(&((struct fcsp_limits *)l)->seq, memory_order_acquire);
        if ((seq & 1) && attempt < 1000) {
            sched_yield();
            continue;
        }
        slot->mem_mode = l->mem_mode;
        slot->device_count = l->device_count < FCSP_MAX_DEVICES ? l->device_count : FCSP_MAX_DEVICES;
        copy_uvm(l, &slot->uvm);
        if (view && entry >= 0 && entry < (int)FCSP_MAX_DEVICES) {
            const struct fcsp_limits_device *d = &l->device[entry];
            memcpy(view->uuid, d->uuid, sizeof(view->uuid));
            view->uuid[sizeof(view->uuid) - 1] = '\0';
            view->flags = d->flags;
            view->mem_limit_bytes = d->mem_limit_bytes;
            view->mem_limit_basis_points = d->mem_limit_basis_points;
            view->mem_spill_bytes = d->mem_spill_bytes;
            view->mem_spill_centi = d->mem_spill_centi;
        }
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&((struct fcsp_limits *)l)->seq, memory_order_relaxed) == seq ||
            attempt >= 1000)
            return;
    }
}

bool shim_slot_uvm(uint32_t *mem_mode, struct shim_uvm *granted)
{
    if (!shim.limits)
        return false;
    struct slot_view slot;
    read_limits(-1, NULL, &slot);
    *mem_mode = slot.mem_mode;
    *granted = slot.uvm;
    return true;
}

/*
 * Spill mode's bound past `quota`: a spill slot's, which BUD_UVM_MAX may only lower;
 * without one (a bare process, a soft slot moved to spill) BUD_UVM_MAX, else 1x the quota.
 */
static uint64_t spill_bound(const struct slot_entry_view *view, bool spill_slot, uint64_t quota)
{
    const struct shim_env_spill *env = &shim_env.uvm_max;
    uint64_t own = env->bytes || env->centi ? fcsp_mem_spill(env->bytes, env->centi, quota) : 0;
    if (!spill_slot)
        return own ? own : fcsp_mem_spill(0, FCSP_WHOLE_GPU_CENTI, quota);
    uint64_t granted = fcsp_mem_spill(view->mem_spill_bytes, view->mem_spill_centi, quota);
    return own && own < granted ? own : granted;
}

struct shim_limit shim_limit_resolve(int entry, int index, uint64_t real_total, uint64_t *spill)
{
    struct shim_limit limit = {0, FCSP_MEM_HARD};
    struct slot_entry_view view = {0};
    bool spill_slot = false;
    if (shim.limits) {
        struct slot_view slot;
        read_limits(entry, &view, &slot);
        if (entry >= 0 && entry < (int)slot.device_count)
            limit.bytes = fcsp_mem_quota(view.mem_limit_bytes, view.mem_limit_basis_points,
                                         real_total);
        limit.mode = shim_env_mem_mode(true, slot.mem_mode);
        spill_slot = slot.mem_mode == FCSP_MEM_SPILL;
    } else {
        limit.mode = shim_env_mem_mode(false, FCSP_MEM_HARD);
    }
    if (index >= 0 && index < (int)FCSP_MAX_DEVICES) {
        const struct shim_env_limit *env = &shim_env.dev[index];
        uint64_t own = fcsp_mem_quota(env->bytes, env->basis_points, real_total);
        if (own && (!limit.bytes || own < limit.bytes)) /* lowers the slot's, never raises it */
            limit.bytes = own;
    }
    if (spill)
        *spill = limit.mode == FCSP_MEM_SPILL ? spill_bound(&view, spill_slot, limit.bytes) : 0;
    return limit;
}

int shim_slot_entry_for(const char *uuid, int index)
{
    if (!shim.limits)
        return index >= 0 && index < (int)FCSP_MAX_DEVICES ? index : -1;
    struct slot_view slot;
    read_limits(-1, NULL, &slot);
    for (int e = 0; uuid && *uuid && e < (int)slot.device_count; e++) {
        struct slot_entry_view view;
        read_limits(e, &view, &slot);
        if ((view.flags & FCSP_DEV_SELECTED_BY_UUID) && strcmp(view.uuid, uuid) == 0)
            return e;
    }
    return index >= 0 && index < (int)slot.device_count ? index : -1;
}

/* ---- the launch word ------------------------------------------------------------ */

_Atomic int shim_launch_entry = LAUNCH_SLOW;

void shim_launch_uvm(bool on)
{
    int seen = atomic_load_explicit(&shim_launch_entry, memory_order_relaxed);
    int want;
    do {
        if (seen == LAUNCH_OFF)
            return;
        want = on ? LAUNCH_UVM : seen == LAUNCH_UVM ? LAUNCH_SLOW : seen;
        if (want == seen)
            return;
    } while (!atomic_compare_exchange_weak_explicit(&shim_launch_entry, &seen, want,
                                                    memory_order_relaxed, memory_order_relaxed));
}

/* ---- CUDA devices ------------------------------------------------------------ */

static void format_uuid(const CUuuid *u, char *out, size_t len)
{
    const unsigned char *b = (const unsigned char *)u->bytes;
    snprintf(out, len,
             "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
             b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
             b[14], b[15]);
}

static void reload_limits(uint64_t generation)
{
    bool spill_mode = false;
    for (int ord = 0; ord < shim_ndevices; ord++) {
        struct shim_device *d = &devices[ord];
        uint64_t spill = 0;
        struct shim_limit limit = d->entry >= 0
                                      ? shim_limit_resolve(d->entry, ord, d->real_total, &spill)
                                      : (struct shim_limit){0, FCSP_MEM_HARD};
        atomic_store_explicit(&d->limit_bytes, limit.bytes, memory_order_relaxed);
        atomic_store_explicit(&d->limit_mode, (int)limit.mode, memory_order_relaxed);
        atomic_store_explicit(&d->spill_bytes, spill, memory_order_relaxed);
        spill_mode |= limit.mode == FCSP_MEM_SPILL && limit.bytes;
    }
    /* Allocations and launches look at uvm.c only while some device is in spill mode. */
    atomic_store_explicit(&shim_uvm_live, spill_mode, memory_order_relaxed);
    shim_launch_uvm(spill_mode);
    atomic_store_explicit(&generation_seen, generation, memory_order_release);
}

static uint64_t limits_generation(void)
{
    return shim.limits ? __atomic_load_n(&shim.limits->generation, __ATOMIC_ACQUIRE) : 0;
}

bool shim_devices_ready(void)
{
    return atomic_load_explicit(&devices_ready, memory_order_acquire);
}

void shim_devices_init(void)
{
    if (shim_devices_ready() || !shim.active)
        return;
    pthread_mutex_lock(&devices_lock);
    int count = 0;
    if (!shim_devices_ready() && REAL(cuDeviceGetCount) &&
        REAL(cuDeviceGetCount)(&count) == CUDA_SUCCESS) {
        if (count > (int)FCSP_MAX_DEVICES) {
            shim_log(LOG_WARN, "%d devices; only the first %u are accounted", count,
                     FCSP_MAX_DEVICES);
            count = FCSP_MAX_DEVICES;
        }
        for (int ord = 0; ord < count; ord++) {
            struct shim_device *d = &devices[ord];
            char uuid[64] = "";
            CUuuid raw;
            d->entry = -1;
            if (REAL(cuDeviceGet)(&d->handle, ord) != CUDA_SUCCESS)
                continue;
            size_t total = 0;
            if (REAL(cuDeviceTotalMem_v2)(&total, d->handle) == CUDA_SUCCESS)
                d->real_total = total;
            if (REAL(cuDeviceGetUuid_v2) && REAL(cuDeviceGetUuid_v2)(&raw, d->handle) == CUDA_SUCCESS)
                format_uuid(&raw, uuid, sizeof(uuid));
            else if (REAL(cuDeviceGetUuid) && REAL(cuDeviceGetUuid)(&raw, d->handle) == CUDA_SUCCESS)
                format_uuid(&raw, uuid, sizeof(uuid));
            d->entry = shim_slot_entry_for(uuid, ord);
        }
        shim_ndevices = count;
        reload_limits(limits_generation());
        for (int ord = 0; ord < count; ord++)
            shim_log(LOG_INFO, "device %d: slot entry %d, quota %llu bytes (%s, %llu past it) of "
                     "%llu", ord, devices[ord].entry, (unsigned long long)devices[ord].limit_bytes,
                     shim_mem_mode_name((enum fcsp_mem_mode)devices[ord].limit_mode),
                     (unsigned long long)devices[ord].spill_bytes,
                     (unsigned long long)devices[ord].real_total);
        atomic_store_explicit(&devices_ready, true, memory_order_release);
    }
    pthread_mutex_unlock(&devices_lock);
}

int shim_device_entry(int ordinal)
{
    return ordinal >= 0 && ordinal < shim_ndevices ? devices[ordinal].entry : -1;
}

uint64_t shim_device_real_total(int ordinal)
{
    return ordinal >= 0 && ordinal < shim_ndevices ? devices[ordinal].real_total : 0;
}

int shim_device_ordinal(CUdevice dev)
{
    if (dev >= 0 && dev < shim_ndevices && devices[dev].handle == dev)
        return dev;
    for (int ord = 0; ord < shim_ndevices; ord++)
        if (devices[ord].handle == dev)
            return ord;
    return -1;
}

/*
 * Bumped whenever a context is destroyed: its handle may come back for
 * another device, so per-thread caches keyed by context start over.
 */
_Atomic uint32_t shim_context_epoch;

int shim_current_device(int *ordinal)
{
    *ordinal = -1;
    if (unlikely(!shim_devices_ready())) {
        shim_devices_init();
        if (!shim_devices_ready())
            return -1;
    }
    if (likely(shim_ndevices == 1)) {
        *ordinal = 0;
        return devices[0].entry;
    }
    static __thread CUcontext cached_ctx;
    static __thread int cached_ordinal = -1;
    static __thread uint32_t cached_epoch;
    CUcontext ctx = NULL;
    if (REAL(cuCtxGetCurrent)(&ctx) != CUDA_SUCCESS || !ctx)
        return -1;
    uint32_t epoch = atomic_load_explicit(&shim_context_epoch, memory_order_relaxed);
    if (ctx != cached_ctx || epoch != cached_epoch || cached_ordinal < 0) {
        CUdevice dev;
        if (REAL(cuCtxGetDevice)(&dev) != CUDA_SUCCESS)
            return -1;
        cached_ctx = ctx;
        cached_epoch = epoch;
        cached_ordinal = shim_device_ordinal(dev);
    }
    *ordinal = cached_ordinal;
    return shim_device_entry(cached_ordinal);
}

struct shim_limit shim_device_limit(int ordinal)
{
    if (ordinal < 0 || ordinal >= shim_ndevices)
        return (struct shim_limit){0, FCSP_MEM_HARD};
    /* One relaxed load in the common case: the host bumps generation on resize. */
    uint64_t generation = limits_generation();
    if (unlikely(generation != atomic_load_explicit(&generation_seen, memory_order_relaxed)))
        reload_limits(generation);
    const struct shim_device *d = &devices[ordinal];
    return (struct shim_limit){
        atomic_load_explicit(&d->limit_bytes, memory_order_relaxed),
        (enum fcsp_mem_mode)atomic_load_explicit(&d->limit_mode, memory_order_relaxed)};
}

/* Read after shim_device_limit, which keeps it current. */
uint64_t shim_device_spill(int ordinal)
{
    if (ordinal < 0 || ordinal >= shim_ndevices)
        return 0;
    return atomic_load_explicit(&devices[ordinal].spill_bytes, memory_order_relaxed);
}
