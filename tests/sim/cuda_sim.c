/*
 * A simulated CUDA driver (libcuda.so.1) for the GPU-less test tier.
 *
 * It models what the shim depends on: devices with memory shared across
 * processes (sim_state.c), contexts and primary contexts, every allocation
 * family with its free, unified memory's advice and prefetches (where a
 * managed allocation lives), cuGetProcAddress with versions and the
 * per-thread-default-stream flag, and launches as counters.  Each exported
 * variant counts its own calls (fcspSimCount("cuLaunchKernel_ptsz")), so a
 * test can see which variant a call really reached.
 *
 * Launches go through sim_launch(), the one place where a later model of
 * execution time on a per-device timeline will go.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cuda.h>

#include "sim_state.h"

#define SIM_EXPORT __attribute__((visibility("default")))
#define SIM_DRIVER_VERSION 13000
#define SIM_QUEUE_NS 10000000ull /* work a stream may hold before a launch blocks */

/* ---- call counters ---------------------------------------------------------------- */

struct counter {
    const char *name;
    _Atomic uint64_t calls;
};

static struct counter counters[] = {
    {"cuLaunch", 0}, {"cuLaunchGrid", 0}, {"cuLaunchGridAsync", 0},
    {"cuLaunchKernel", 0}, {"cuLaunchKernel_ptsz", 0},
    {"cuLaunchKernelEx", 0}, {"cuLaunchKernelEx_ptsz", 0},
    {"cuLaunchCooperativeKernel", 0}, {"cuLaunchCooperativeKernel_ptsz", 0},
    {"cuLaunchCooperativeKernelMultiDevice", 0},
    {"cuLaunchHostFunc", 0}, {"cuLaunchHostFunc_ptsz", 0},
    {"cuGraphLaunch", 0}, {"cuGraphLaunch_ptsz", 0},
    {"cuMemAllocAsync", 0}, {"cuMemAllocAsync_ptsz", 0},
    {"cuEventRecord", 0}, {"cuEventRecord_ptsz", 0},
    {"cuMemAllocFromPoolAsync", 0}, {"cuMemAllocFromPoolAsync_ptsz", 0},
    {"cuMemFreeAsync", 0}, {"cuMemFreeAsync_ptsz", 0},
    {"cuMemAdvise_v2", 0}, {"cuMemPrefetchAsync_v2", 0},
    {"cuFuncGetParamInfo", 0}, {"cuKernelGetParamInfo", 0}, {"cuStreamWaitEvent", 0},
    {"cuStreamCreate", 0}, {"cuStreamIsCapturing", 0}, {"cuStreamIsCapturing_ptsz", 0},
};

static void count(const char *name)
{
    for (size_t i = 0; i < sizeof(counters) / sizeof(counters[0]); i++)
        if (strcmp(counters[i].name, name) == 0)
            atomic_fetch_add(&counters[i].calls, 1);
}

/* Test hook: how many times the named variant was called in this process. */
SIM_EXPORT uint64_t fcspSimCount(const char *name)
{
    for (size_t i = 0; i < sizeof(counters) / sizeof(counters[0]); i++)
        if (strcmp(counters[i].name, name) == 0)
            return atomic_load(&counters[i].calls);
    return 0;
}

/* ---- devices and contexts ---------------------------------------------------------- */

struct CUctx_st {
    int device;
    int alive;
};

struct CUmemPoolHandle_st {
    int device;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int initialized;
static struct CUctx_st contexts[256];
static struct CUctx_st primary[SIM_MAX_DEVICES];
static int primary_refs[SIM_MAX_DEVICES];
static struct CUmemPoolHandle_st default_pools[SIM_MAX_DEVICES];
static __thread CUcontext current;

static int ndevices(void)
{
    return sim_config()->devices;
}

static int valid_device(CUdevice dev)
{
    return dev >= 0 && dev < ndevices();
}

/*
 * MPS: like the real driver, a process whose CUDA_MPS_PIPE_DIRECTORY holds a
 * control socket becomes a client of that daemon at cuInit.  The simulated
 * daemon (mps_control.c) logs the client with the limits it asked for and
 * answers the thread percentage it granted: the client's kernels then run on
 * that part of the SMs (sim_launch), beside the other clients'.
 */
static _Atomic int mps_threads_pct = 100;

static void mps_announce(void)
{
    const char *dir = getenv("CUDA_MPS_PIPE_DIRECTORY");
    if (!dir || !*dir)
        return;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof(addr.sun_path), "%s/control", dir);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0) {
        const char *threads = getenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE");
        const char *pinned = getenv("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT");
        char line[200];
        int n = snprintf(line, sizeof(line), "client %d threads=%s pinned=%s\n", (int)getpid(),
                         threads ? threads : "-", pinned ? pinned : "-");
        if (n > 0 && write(fd, line, (size_t)n) > 0) {
            char reply[16] = {0};
            int pct = 0;
            if (read(fd, reply, sizeof(reply) - 1) > 0) {
                sim_mark_mps_client();
                if (sscanf(reply, "ok %d", &pct) == 1 && pct > 0 && pct < 100)
                    atomic_store(&mps_threads_pct, pct);
            }
        }
    }
    close(fd);
}

SIM_EXPORT CUresult cuInit(unsigned int flags)
{
    if (!initialized)
        mps_announce();
    initialized = 1;
    return ndevices() > 0 ? CUDA_SUCCESS : CUDA_ERROR_NO_DEVICE;
}

SIM_EXPORT CUresult cuDriverGetVersion(int *version)
{
    *version = SIM_DRIVER_VERSION;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDeviceGetCount(int *n)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    *n = ndevices();
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDeviceGet(CUdevice *dev, int ordinal)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!valid_device(ordinal))
        return CUDA_ERROR_INVALID_DEVICE;
    *dev = ordinal;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDeviceGetName(char *name, int len, CUdevice dev)
{
    if (!valid_device(dev) || len <= 0)
        return CUDA_ERROR_INVALID_VALUE;
    strncpy(name, "FCSP Simulated GPU", (size_t)len - 1);
    name[len - 1] = '\0';
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev)
{
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    memcpy(uuid->bytes, sim_config()->uuid[dev], 16);
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev)
{
    return cuDeviceGetUuid_v2(uuid, dev);
}

SIM_EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    *bytes = sim_config()->mem_bytes;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDeviceTotalMem(unsigned int *bytes, CUdevice dev)
{
    size_t total;
    CUresult rc = cuDeviceTotalMem_v2(&total, dev);
    if (rc == CUDA_SUCCESS)
        *bytes = total > 0xffffffffu ? 0xffffffffu : (unsigned int)total;
    return rc;
}

static CUresult new_context(CUcontext *pctx, CUdevice dev)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < sizeof(contexts) / sizeof(contexts[0]); i++) {
        if (!contexts[i].alive) {
            contexts[i].alive = 1;
            contexts[i].device = dev;
            pthread_mutex_unlock(&lock);
            sim_context(dev);
            *pctx = &contexts[i];
            current = *pctx;
            return CUDA_SUCCESS;
        }
    }
    pthread_mutex_unlock(&lock);
    return CUDA_ERROR_OUT_OF_MEMORY;
}

SIM_EXPORT CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev)
{
    return new_context(pctx, dev);
}

SIM_EXPORT CUresult cuCtxCreate_v4(CUcontext *pctx, CUctxCreateParams *params, unsigned int flags,
                                   CUdevice dev)
{
    return new_context(pctx, dev);
}

static void free_context_allocations(CUcontext ctx);

static CUresult destroy_context(CUcontext ctx)
{
    if (!ctx || !ctx->alive || (ctx >= primary && ctx < primary + SIM_MAX_DEVICES))
        return CUDA_ERROR_INVALID_CONTEXT;
    free_context_allocations(ctx);
    ctx->alive = 0;
    if (current == ctx)
        current = NULL;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuCtxDestroy_v2(CUcontext ctx)
{
    return destroy_context(ctx);
}

SIM_EXPORT CUresult cuCtxDestroy(CUcontext ctx)
{
    return destroy_context(ctx);
}

SIM_EXPORT CUresult cuCtxGetCurrent(CUcontext *pctx)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    *pctx = current;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuCtxSetCurrent(CUcontext ctx)
{
    current = ctx;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuCtxPushCurrent_v2(CUcontext ctx)
{
    current = ctx;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuCtxPopCurrent_v2(CUcontext *pctx)
{
    if (pctx)
        *pctx = current;
    current = NULL;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuCtxGetDevice(CUdevice *dev)
{
    if (!current || !current->alive)
        return CUDA_ERROR_INVALID_CONTEXT;
    *dev = current->device;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)
{
    if (!initialized)
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&lock);
    primary[dev].device = dev;
    primary[dev].alive = 1;
    primary_refs[dev]++;
    pthread_mutex_unlock(&lock);
    sim_context(dev);
    *pctx = &primary[dev];
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int *flags, int *active)
{
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    *flags = 0;
    *active = primary[dev].alive;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev)
{
    if (!valid_device(dev) || primary_refs[dev] <= 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    pthread_mutex_lock(&lock);
    int last = --primary_refs[dev] == 0;
    pthread_mutex_unlock(&lock);
    if (last) {
        free_context_allocations(&primary[dev]);
        primary[dev].alive = 0;
    }
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDevicePrimaryCtxRelease(CUdevice dev)
{
    return cuDevicePrimaryCtxRelease_v2(dev);
}

SIM_EXPORT CUresult cuDevicePrimaryCtxReset_v2(CUdevice dev)
{
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    free_context_allocations(&primary[dev]);
    primary[dev].alive = 0;
    primary_refs[dev] = 0;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuDevicePrimaryCtxReset(CUdevice dev)
{
    return cuDevicePrimaryCtxReset_v2(dev);
}

static int current_device(void)
{
    return current && current->alive ? current->device : -1;
}

/* ---- allocations ------------------------------------------------------------------ */

enum alloc_kind { A_LINEAR = 1, A_VMM, A_ARRAY, A_MIPMAP, A_IPC };

struct allocation {
    enum alloc_kind kind;
    uint64_t key, size;
    int device;
    CUcontext ctx; /* NULL for VMM handles, which outlive contexts */
    int counted;   /* holds device memory (an IPC mapping, host-resident managed memory do not) */
    /* Managed memory only: cuMemAdvise's preferred location (type 0: none) and the devices
     * it is accessed by (bit d: device d). */
    int managed;
    CUmemLocation preferred;
    uint32_t accessed_by;
    /* Managed memory only: how many times it moved from the host to a device, and back. */
    uint32_t moved_in, moved_out;
};

static struct allocation *allocs;
static size_t nallocs, capacity;
static uint64_t next_linear = 0x7f0000000000ull; /* a UVA-looking range */
static uint64_t next_v1 = 0x10000000ull;           /* 32-bit range for the legacy entry points */
static uint64_t next_handle = 0x1000;

static uint64_t new_address(uint64_t size, int v1)
{
    uint64_t *next = v1 ? &next_v1 : &next_linear;
    uint64_t addr = *next;
    *next += (size + 0xfffff) & ~0xfffffull; /* 1 MiB steps, and a gap for the next one */
    *next += 0x100000;
    return addr;
}

/* Record an allocation of size on dev; CUDA_ERROR_OUT_OF_MEMORY when the device is full. */
static CUresult record(enum alloc_kind kind, uint64_t size, int dev, CUcontext ctx, int counted,
                       int v1, uint64_t *key_out)
{
    if (dev < 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    if (size == 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (counted && sim_take(dev, size) < 0)
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&lock);
    if (nallocs == capacity) {
        capacity = capacity ? capacity * 2 : 256;
        allocs = realloc(allocs, capacity * sizeof(*allocs));
    }
    uint64_t key = kind == A_LINEAR || kind == A_IPC ? new_address(size, v1)
                                                      : (next_handle += 0x40);
    allocs[nallocs++] = (struct allocation){.kind = kind, .key = key, .size = size,
                                            .device = dev, .ctx = ctx, .counted = counted};
    pthread_mutex_unlock(&lock);
    *key_out = key;
    return CUDA_SUCCESS;
}

static CUresult forget(enum alloc_kind kind, uint64_t key)
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < nallocs; i++) {
        if (allocs[i].kind == kind && allocs[i].key == key) {
            struct allocation a = allocs[i];
            allocs[i] = allocs[--nallocs];
            pthread_mutex_unlock(&lock);
            if (a.counted)
                sim_give(a.device, a.size);
            return CUDA_SUCCESS;
        }
    }
    pthread_mutex_unlock(&lock);
    return CUDA_ERROR_INVALID_VALUE;
}

static void free_context_allocations(CUcontext ctx)
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < nallocs;) {
        if (allocs[i].ctx == ctx) {
            if (allocs[i].counted)
                sim_give(allocs[i].device, allocs[i].size);
            allocs[i] = allocs[--nallocs];
        } else {
            i++;
        }
    }
    pthread_mutex_unlock(&lock);
}

static struct allocation *find_containing(uint64_t addr)
{
    for (size_t i = 0; i < nallocs; i++)
        if ((allocs[i].kind == A_LINEAR || allocs[i].kind == A_IPC) && addr >= allocs[i].key &&
            addr < allocs[i].key + allocs[i].size)
            return &allocs[i];
    return NULL;
}

static CUresult alloc_linear(CUdeviceptr *dptr, uint64_t size, int dev)
{
    uint64_t key;
    CUresult rc = record(A_LINEAR, size, dev, current, 1, 0, &key);
    if (rc == CUDA_SUCCESS)
        *dptr = key;
    return rc;
}

SIM_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)
{
    return alloc_linear(dptr, bytesize, current_device());
}

SIM_EXPORT CUresult cuMemAlloc(CUdeviceptr_v1 *dptr, unsigned int bytesize)
{
    uint64_t key;
    CUresult rc = record(A_LINEAR, bytesize, current_device(), current, 1, 1, &key);
    if (rc == CUDA_SUCCESS)
        *dptr = (CUdeviceptr_v1)key;
    return rc;
}

/* Managed memory starts on the device that allocated it, until advice or a prefetch moves it. */
SIM_EXPORT CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags)
{
    if (flags != CU_MEM_ATTACH_GLOBAL && flags != CU_MEM_ATTACH_HOST)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = alloc_linear(dptr, bytesize, current_device());
    if (rc != CUDA_SUCCESS)
        return rc;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < nallocs; i++)
        if (allocs[i].kind == A_LINEAR && allocs[i].key == *dptr)
            allocs[i].managed = 1;
    pthread_mutex_unlock(&lock);
    return rc;
}

static uint64_t sim_pitch(uint64_t width)
{
    return (width + 511) & ~(uint64_t)511;
}

SIM_EXPORT CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width,
                                       size_t height, unsigned int elem)
{
    *pitch = sim_pitch(width);
    return alloc_linear(dptr, *pitch * height, current_device());
}

SIM_EXPORT CUresult cuMemAllocPitch(CUdeviceptr_v1 *dptr, unsigned int *pitch, unsigned int width,
                                    unsigned int height, unsigned int elem)
{
    *pitch = (unsigned int)sim_pitch(width);
    uint64_t key;
    CUresult rc = record(A_LINEAR, (uint64_t)*pitch * height, current_device(), current, 1, 1,
                         &key);
    if (rc == CUDA_SUCCESS)
        *dptr = (CUdeviceptr_v1)key;
    return rc;
}

SIM_EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr)
{
    return forget(A_LINEAR, dptr);
}

SIM_EXPORT CUresult cuMemFree(CUdeviceptr_v1 dptr)
{
    return forget(A_LINEAR, dptr);
}

SIM_EXPORT CUresult cuMemGetAddressRange_v2(CUdeviceptr *base, size_t *size, CUdeviceptr dptr)
{
    pthread_mutex_lock(&lock);
    const struct allocation *a = find_containing(dptr);
    if (a) {
        if (base)
            *base = a->key;
        if (size)
            *size = a->size;
    }
    pthread_mutex_unlock(&lock);
    return a ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}

/* ---- unified memory ------------------------------------------------------------------- */

/* The managed allocation holding [ptr, ptr + bytes), with the lock held; NULL if none. */
static struct allocation *managed_range(CUdeviceptr ptr, size_t bytes)
{
    struct allocation *a = find_containing(ptr);
    if (!a || !a->managed || !bytes || bytes > a->key + a->size - ptr)
        return NULL;
    return a;
}

static int valid_location(CUmemLocation where)
{
    switch (where.type) {
    case CU_MEM_LOCATION_TYPE_DEVICE:
        return valid_device(where.id);
    case CU_MEM_LOCATION_TYPE_HOST:
    case CU_MEM_LOCATION_TYPE_HOST_NUMA:
    case CU_MEM_LOCATION_TYPE_HOST_NUMA_CURRENT:
        return 1;
    default:
        return 0;
    }
}

/*
 * Move a managed allocation (whole: the sim has no pages) to `where`.  In host memory it
 * holds none of a device's, so NVML and cuMemGetInfo do not count it; a device it does
 * not fit leaves it where it is, as the real driver does under pressure.
 */
static void place(struct allocation *a, CUmemLocation where)
{
    int on_device = where.type == CU_MEM_LOCATION_TYPE_DEVICE;
    if (a->counted && on_device && a->device == where.id)
        return;
    if (on_device && sim_take(where.id, a->size) < 0)
        return;
    if (a->counted)
        sim_give(a->device, a->size);
    if (on_device && !a->counted)
        a->moved_in++;
    if (!on_device && a->counted)
        a->moved_out++;
    a->counted = on_device;
    if (on_device)
        a->device = where.id;
}

static CUresult advise(struct allocation *a, CUmem_advise advice, CUmemLocation location)
{
    uint32_t bit = location.type == CU_MEM_LOCATION_TYPE_DEVICE ? 1u << location.id : 0;
    switch (advice) {
    case CU_MEM_ADVISE_SET_READ_MOSTLY:
    case CU_MEM_ADVISE_UNSET_READ_MOSTLY:
        return CUDA_SUCCESS;
    case CU_MEM_ADVISE_SET_PREFERRED_LOCATION:
        a->preferred = location;
        place(a, location);
        return CUDA_SUCCESS;
    case CU_MEM_ADVISE_UNSET_PREFERRED_LOCATION:
        memset(&a->preferred, 0, sizeof(a->preferred));
        return CUDA_SUCCESS;
    case CU_MEM_ADVISE_SET_ACCESSED_BY:
        a->accessed_by |= bit;
        return CUDA_SUCCESS;
    case CU_MEM_ADVISE_UNSET_ACCESSED_BY:
        a->accessed_by &= ~bit;
        return CUDA_SUCCESS;
    default:
        return CUDA_ERROR_INVALID_VALUE;
    }
}

SIM_EXPORT CUresult cuMemAdvise_v2(CUdeviceptr ptr, size_t bytes, CUmem_advise advice,
                                   CUmemLocation location)
{
    count("cuMemAdvise_v2");
    pthread_mutex_lock(&lock);
    struct allocation *a = managed_range(ptr, bytes);
    CUresult rc = a && valid_location(location) ? advise(a, advice, location)
                                                : CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_unlock(&lock);
    return rc;
}

SIM_EXPORT CUresult cuMemPrefetchAsync_v2(CUdeviceptr ptr, size_t bytes, CUmemLocation location,
                                          unsigned int flags, CUstream hStream)
{
    count("cuMemPrefetchAsync_v2");
    pthread_mutex_lock(&lock);
    struct allocation *a = managed_range(ptr, bytes);
    CUresult rc = a && valid_location(location) && !flags ? CUDA_SUCCESS
                                                          : CUDA_ERROR_INVALID_VALUE;
    if (rc == CUDA_SUCCESS)
        place(a, location);
    pthread_mutex_unlock(&lock);
    return rc;
}

/*
 * Test hook: what the driver knows of the allocation holding ptr: whether it is managed,
 * its preferred location (type 0: none), the devices that access it (bit d: device d) and
 * the device memory it holds.
 */
SIM_EXPORT CUresult fcspSimAdvice(CUdeviceptr ptr, int *managed, CUmemLocation *preferred,
                                  uint32_t *accessed_by, uint64_t *device_bytes)
{
    pthread_mutex_lock(&lock);
    const struct allocation *a = find_containing(ptr);
    if (a) {
        *managed = a->managed;
        *preferred = a->preferred;
        *accessed_by = a->accessed_by;
        *device_bytes = a->counted ? a->size : 0;
    }
    pthread_mutex_unlock(&lock);
    return a ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* Test hook: how many times the managed allocation holding ptr moved to a device and back. */
SIM_EXPORT CUresult fcspSimMigrations(CUdeviceptr ptr, uint32_t *moved_in, uint32_t *moved_out)
{
    pthread_mutex_lock(&lock);
    const struct allocation *a = find_containing(ptr);
    if (a) {
        *moved_in = a->moved_in;
        *moved_out = a->moved_out;
    }
    pthread_mutex_unlock(&lock);
    return a ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

SIM_EXPORT CUresult cuMemGetInfo_v2(size_t *free, size_t *total)
{
    int dev = current_device();
    if (dev < 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    uint64_t t = sim_config()->mem_bytes, used = sim_used(dev);
    *total = t;
    *free = used < t ? t - used : 0;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuMemGetInfo(unsigned int *free, unsigned int *total)
{
    size_t f, t;
    CUresult rc = cuMemGetInfo_v2(&f, &t);
    if (rc == CUDA_SUCCESS) {
        *free = f > 0xffffffffu ? 0xffffffffu : (unsigned int)f;
        *total = t > 0xffffffffu ? 0xffffffffu : (unsigned int)t;
    }
    return rc;
}

/* Stream-ordered allocations: the sim has no streams to order against. */
SIM_EXPORT CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
{
    count("cuMemAllocAsync");
    return alloc_linear(dptr, bytesize, current_device());
}

SIM_EXPORT CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
{
    count("cuMemAllocAsync_ptsz");
    return alloc_linear(dptr, bytesize, current_device());
}

SIM_EXPORT CUresult cuDeviceGetDefaultMemPool(CUmemoryPool *pool, CUdevice dev)
{
    if (!valid_device(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    default_pools[dev].device = dev;
    *pool = &default_pools[dev];
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuMemPoolCreate(CUmemoryPool *pool, const CUmemPoolProps *props)
{
    if (!props || props->location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
        !valid_device(props->location.id))
        return CUDA_ERROR_INVALID_VALUE;
    struct CUmemPoolHandle_st *p = calloc(1, sizeof(*p));
    p->device = props->location.id;
    *pool = p;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuMemPoolDestroy(CUmemoryPool pool)
{
    if (pool < default_pools || pool >= default_pools + SIM_MAX_DEVICES)
        free(pool);
    return CUDA_SUCCESS;
}

/* The sim's pools cache nothing, so there is nothing to trim. */
SIM_EXPORT CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t minBytesToKeep)
{
    return pool ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

SIM_EXPORT CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                            CUstream hStream)
{
    count("cuMemAllocFromPoolAsync");
    return pool ? alloc_linear(dptr, bytesize, pool->device) : CUDA_ERROR_INVALID_VALUE;
}

SIM_EXPORT CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize,
                                                 CUmemoryPool pool, CUstream hStream)
{
    count("cuMemAllocFromPoolAsync_ptsz");
    return pool ? alloc_linear(dptr, bytesize, pool->device) : CUDA_ERROR_INVALID_VALUE;
}

SIM_EXPORT CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream)
{
    count("cuMemFreeAsync");
    return forget(A_LINEAR, dptr);
}

SIM_EXPORT CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream hStream)
{
    count("cuMemFreeAsync_ptsz");
    return forget(A_LINEAR, dptr);
}

SIM_EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                                const CUmemAllocationProp *prop, unsigned long long flags)
{
    if (!prop)
        return CUDA_ERROR_INVALID_VALUE;
    int on_device = prop->location.type == CU_MEM_LOCATION_TYPE_DEVICE;
    if (on_device && !valid_device(prop->location.id))
        return CUDA_ERROR_INVALID_DEVICE;
    uint64_t key;
    CUresult rc = record(A_VMM, size, on_device ? prop->location.id : 0, NULL, on_device, 0, &key);
    if (rc == CUDA_SUCCESS)
        *handle = key;
    return rc;
}

SIM_EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle handle)
{
    return forget(A_VMM, handle);
}

SIM_EXPORT CUresult cuMemGetAllocationGranularity(size_t *granularity,
                                                  const CUmemAllocationProp *prop,
                                                  CUmemAllocationGranularity_flags option)
{
    *granularity = 2u << 20;
    return CUDA_SUCCESS;
}

/* ---- arrays ------------------------------------------------------------------------- */

static uint64_t format_bytes(CUarray_format f)
{
    switch (f) {
    case CU_AD_FORMAT_UNSIGNED_INT8:
    case CU_AD_FORMAT_SIGNED_INT8:
        return 1;
    case CU_AD_FORMAT_UNSIGNED_INT16:
    case CU_AD_FORMAT_SIGNED_INT16:
    case CU_AD_FORMAT_HALF:
        return 2;
    default:
        return 4;
    }
}

static uint64_t nz(uint64_t v)
{
    return v ? v : 1;
}

/* Arrays are laid out in 64 KiB tiles: more than the shim's estimate, as on real GPUs. */
static uint64_t tiled(uint64_t bytes)
{
    return (bytes + 0xffff) & ~(uint64_t)0xffff;
}

static CUresult new_array(CUarray *handle, uint64_t bytes)
{
    uint64_t key;
    CUresult rc = record(A_ARRAY, tiled(bytes), current_device(), current, 1, 0, &key);
    if (rc == CUDA_SUCCESS)
        *handle = (CUarray)(uintptr_t)key;
    return rc;
}

SIM_EXPORT CUresult cuArrayCreate_v2(CUarray *handle, const CUDA_ARRAY_DESCRIPTOR *d)
{
    return new_array(handle, nz(d->Width) * nz(d->Height) * format_bytes(d->Format) *
                                 nz(d->NumChannels));
}

SIM_EXPORT CUresult cuArrayCreate(CUarray *handle, const CUDA_ARRAY_DESCRIPTOR_v1 *d)
{
    return new_array(handle, nz(d->Width) * nz(d->Height) * format_bytes(d->Format) *
                                 nz(d->NumChannels));
}

SIM_EXPORT CUresult cuArray3DCreate_v2(CUarray *handle, const CUDA_ARRAY3D_DESCRIPTOR *d)
{
    return new_array(handle, nz(d->Width) * nz(d->Height) * nz(d->Depth) *
                                 format_bytes(d->Format) * nz(d->NumChannels));
}

SIM_EXPORT CUresult cuArray3DCreate(CUarray *handle, const CUDA_ARRAY3D_DESCRIPTOR_v1 *d)
{
    return new_array(handle, nz(d->Width) * nz(d->Height) * nz(d->Depth) *
                                 format_bytes(d->Format) * nz(d->NumChannels));
}

SIM_EXPORT CUresult cuArrayDestroy(CUarray handle)
{
    return forget(A_ARRAY, (uint64_t)(uintptr_t)handle);
}

static CUresult requirements(enum alloc_kind kind, uint64_t key,
                             CUDA_ARRAY_MEMORY_REQUIREMENTS *req)
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < nallocs; i++) {
        if (allocs[i].kind == kind && allocs[i].key == key) {
            memset(req, 0, sizeof(*req));
            req->size = allocs[i].size;
            req->alignment = 0x10000;
            pthread_mutex_unlock(&lock);
            return CUDA_SUCCESS;
        }
    }
    pthread_mutex_unlock(&lock);
    return CUDA_ERROR_INVALID_HANDLE;
}

SIM_EXPORT CUresult cuArrayGetMemoryRequirements(CUDA_ARRAY_MEMORY_REQUIREMENTS *req,
                                                 CUarray array, CUdevice dev)
{
    return requirements(A_ARRAY, (uint64_t)(uintptr_t)array, req);
}

SIM_EXPORT CUresult cuMipmappedArrayCreate(CUmipmappedArray *handle,
                                           const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned int levels)
{
    uint64_t bytes = 0;
    for (unsigned l = 0; l < nz(levels) && l < 64; l++)
        bytes += nz(d->Width >> l) * nz(d->Height >> l) * nz(d->Depth >> l) *
                 format_bytes(d->Format) * nz(d->NumChannels);
    uint64_t key;
    CUresult rc = record(A_MIPMAP, tiled(bytes), current_device(), current, 1, 0, &key);
    if (rc == CUDA_SUCCESS)
        *handle = (CUmipmappedArray)(uintptr_t)key;
    return rc;
}

SIM_EXPORT CUresult cuMipmappedArrayDestroy(CUmipmappedArray handle)
{
    return forget(A_MIPMAP, (uint64_t)(uintptr_t)handle);
}

SIM_EXPORT CUresult cuMipmappedArrayGetMemoryRequirements(CUDA_ARRAY_MEMORY_REQUIREMENTS *req,
                                                          CUmipmappedArray mipmap, CUdevice dev)
{
    return requirements(A_MIPMAP, (uint64_t)(uintptr_t)mipmap, req);
}

/* ---- IPC ------------------------------------------------------------------------------ */

struct ipc_payload {
    uint32_t magic;
    int32_t device;
    uint64_t size;
};
_Static_assert(sizeof(struct ipc_payload) <= CU_IPC_HANDLE_SIZE, "payload fits the handle");
#define IPC_MAGIC 0x4d495346u

SIM_EXPORT CUresult cuIpcGetMemHandle(CUipcMemHandle *handle, CUdeviceptr dptr)
{
    pthread_mutex_lock(&lock);
    const struct allocation *a = find_containing(dptr);
    struct ipc_payload payload = {IPC_MAGIC, a ? a->device : 0, a ? a->size : 0};
    pthread_mutex_unlock(&lock);
    if (!a)
        return CUDA_ERROR_INVALID_VALUE;
    memset(handle, 0, sizeof(*handle));
    memcpy(handle->reserved, &payload, sizeof(payload));
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuIpcOpenMemHandle_v2(CUdeviceptr *dptr, CUipcMemHandle handle,
                                          unsigned int flags)
{
    struct ipc_payload payload;
    memcpy(&payload, handle.reserved, sizeof(payload));
    if (payload.magic != IPC_MAGIC)
        return CUDA_ERROR_INVALID_VALUE;
    uint64_t key;
    /* The exporter holds the memory: the mapping takes none of the device's. */
    CUresult rc = record(A_IPC, payload.size, payload.device, current, 0, 0, &key);
    if (rc == CUDA_SUCCESS)
        *dptr = key;
    return rc;
}

SIM_EXPORT CUresult cuIpcOpenMemHandle(CUdeviceptr *dptr, CUipcMemHandle handle,
                                       unsigned int flags)
{
    return cuIpcOpenMemHandle_v2(dptr, handle, flags);
}

SIM_EXPORT CUresult cuIpcCloseMemHandle(CUdeviceptr dptr)
{
    return forget(A_IPC, dptr);
}

/* ---- execution model: functions, graphs, streams, events ------------------------------- */

/*
 * A function's duration comes from its name: "k_200us" runs 200 us, "k_5ms"
 * 5 ms, "k_100us_500us" 100 and 500 us in turn; any other name, and a NULL
 * function, takes no time.  A graph made with fcspSimGraphExec(ns) runs ns as
 * one unit.
 */
struct CUfunc_st {
    int packed; /* named p_...: its pointers come in one structure (see cuFuncGetParamInfo) */
    int hidden; /* named n_...: cuFuncGetParamInfo does not give its layout */
    int library; /* named l_...: a library's kernel, whose layout cuKernelGetParamInfo gives */
    uint64_t dur_ns;
    uint64_t other_ns;          /* if not 0: every other launch takes this long instead */
    _Atomic uint64_t launches;
};

struct CUgraphExec_st {
    uint64_t dur_ns;
};

struct CUmod_st {
    int loaded;
};

struct CUstream_st {
    _Atomic uint64_t ready_ns; /* when the work queued on it so far is done */
    _Atomic int capturing;     /* set by fcspSimSetCapturing */
    _Atomic int after_event;   /* an event was recorded after its last kernel */
};

struct CUevent_st {
    _Atomic uint64_t at_ns; /* when the stream reaches it; 0: never recorded */
};

static struct CUstream_st legacy_stream;
static __thread struct CUstream_st thread_stream;
static _Atomic uint64_t all_ready_ns; /* the latest end of anything this process queued */
static __thread CUstreamCaptureMode capture_mode = CU_STREAM_CAPTURE_MODE_GLOBAL;

static uint64_t parse_one(const char *text, char **end)
{
    double v = strtod(text, end);
    if (strncmp(*end, "us", 2) == 0) {
        *end += 2;
        return (uint64_t)(v * 1e3);
    }
    if (strncmp(*end, "ms", 2) == 0) {
        *end += 2;
        return (uint64_t)(v * 1e6);
    }
    return 0;
}

/* "k_200us": 200 us; "k_100us_500us": 100 and 500 us in turn (a data-dependent kernel). */
static void parse_duration(const char *name, struct CUfunc_st *f)
{
    if (strncmp(name, "k_", 2) != 0)
        return;
    char *end;
    f->dur_ns = parse_one(name + 2, &end);
    if (*end == '_')
        f->other_ns = parse_one(end + 1, &end);
    if (*end != '\0')
        f->dur_ns = f->other_ns = 0;
}

SIM_EXPORT CUresult cuModuleLoadData(CUmodule *module, const void *image)
{
    static struct CUmod_st the_module = {1};
    *module = &the_module;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name)
{
    if (!hmod || !name)
        return CUDA_ERROR_INVALID_VALUE;
    struct CUfunc_st *f = calloc(1, sizeof(*f));
    f->packed = strncmp(name, "p_", 2) == 0;
    f->hidden = strncmp(name, "n_", 2) == 0;
    f->library = strncmp(name, "l_", 2) == 0;
    parse_duration(f->packed || f->hidden || f->library ? name + 2 : name, f);
    *hfunc = f;
    return CUDA_SUCCESS;
}

/*
 * Every sim function takes a 4-byte count, then SIM_POINTER_PARAMS device pointers (drv's
 * "use" command fills them with allocations); a packed one (p_...), as frameworks' kernels
 * do, one structure of an 8-byte count and the pointers.  Of a function named n_... the
 * driver gives no layout (CUDA_ERROR_NOT_SUPPORTED), as of one loaded without it; of one
 * named l_... (a CUkernel of the runtime's libraries, launched as a function) only
 * cuKernelGetParamInfo does.
 */
#define SIM_POINTER_PARAMS 8

static CUresult param_info(CUfunction f, size_t index, size_t *offset, size_t *size)
{
    if (f && f->hidden)
        return CUDA_ERROR_NOT_SUPPORTED;
    size_t params = f && f->packed ? 1 : SIM_POINTER_PARAMS;
    if (!f || !offset || !size || index > params)
        return CUDA_ERROR_INVALID_VALUE;
    *offset = index ? 8 * index : 0;
    if (!index)
        *size = sizeof(uint32_t);
    else
        *size = f->packed ? 8 + SIM_POINTER_PARAMS * sizeof(CUdeviceptr) : sizeof(CUdeviceptr);
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuFuncGetParamInfo(CUfunction f, size_t index, size_t *offset, size_t *size)
{
    count("cuFuncGetParamInfo");
    return f && f->library ? CUDA_ERROR_INVALID_HANDLE : param_info(f, index, offset, size);
}

SIM_EXPORT CUresult cuKernelGetParamInfo(CUkernel k, size_t index, size_t *offset, size_t *size)
{
    count("cuKernelGetParamInfo");
    CUfunction f = (CUfunction)k;
    return f && f->library ? param_info(f, index, offset, size) : CUDA_ERROR_INVALID_HANDLE;
}

/* Test hook: an executable graph whose replay runs ns on the device. */
SIM_EXPORT CUgraphExec fcspSimGraphExec(uint64_t ns)
{
    struct CUgraphExec_st *g = calloc(1, sizeof(*g));
    g->dur_ns = ns;
    return g;
}

static struct CUstream_st *stream_of(CUstream s, int ptsz)
{
    if (s == CU_STREAM_PER_THREAD || (!s && ptsz))
        return &thread_stream;
    if (!s || s == CU_STREAM_LEGACY)
        return &legacy_stream;
    return s;
}

/* Test hook: make a stream report itself as capturing (cuStreamIsCapturing). */
SIM_EXPORT void fcspSimSetCapturing(CUstream s, int capturing)
{
    atomic_store(&stream_of(s, 0)->capturing, capturing);
}

static void sleep_until_ns(uint64_t t)
{
    struct timespec ts = {(time_t)(t / 1000000000u), (long)(t % 1000000000u)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) != 0)
        ;
}

static void raise_to(_Atomic uint64_t *v, uint64_t t)
{
    uint64_t old = atomic_load(v);
    while (old < t && !atomic_compare_exchange_weak(v, &old, t))
        ;
}

SIM_EXPORT CUresult cuStreamCreate(CUstream *phStream, unsigned int flags)
{
    count("cuStreamCreate");
    *phStream = calloc(1, sizeof(struct CUstream_st));
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuStreamDestroy_v2(CUstream s)
{
    if (s && s != CU_STREAM_LEGACY && s != CU_STREAM_PER_THREAD)
        free(s);
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuStreamDestroy(CUstream s)
{
    return cuStreamDestroy_v2(s);
}

static CUresult stream_query(CUstream s, int ptsz)
{
    return atomic_load(&stream_of(s, ptsz)->ready_ns) <= sim_now_ns() ? CUDA_SUCCESS
                                                                      : CUDA_ERROR_NOT_READY;
}

SIM_EXPORT CUresult cuStreamQuery(CUstream s)
{
    return stream_query(s, 0);
}

SIM_EXPORT CUresult cuStreamQuery_ptsz(CUstream s)
{
    return stream_query(s, 1);
}

SIM_EXPORT CUresult cuStreamSynchronize(CUstream s)
{
    sleep_until_ns(atomic_load(&stream_of(s, 0)->ready_ns));
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuStreamSynchronize_ptsz(CUstream s)
{
    sleep_until_ns(atomic_load(&stream_of(s, 1)->ready_ns));
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuCtxSynchronize(void)
{
    if (!current)
        return CUDA_ERROR_INVALID_CONTEXT;
    sleep_until_ns(atomic_load(&all_ready_ns));
    return CUDA_SUCCESS;
}

static CUresult is_capturing(CUstream s, int ptsz, CUstreamCaptureStatus *status)
{
    *status = atomic_load(&stream_of(s, ptsz)->capturing) ? CU_STREAM_CAPTURE_STATUS_ACTIVE
                                                            : CU_STREAM_CAPTURE_STATUS_NONE;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuStreamIsCapturing(CUstream s, CUstreamCaptureStatus *status)
{
    count("cuStreamIsCapturing");
    return is_capturing(s, 0, status);
}

SIM_EXPORT CUresult cuStreamIsCapturing_ptsz(CUstream s, CUstreamCaptureStatus *status)
{
    count("cuStreamIsCapturing_ptsz");
    return is_capturing(s, 1, status);
}

SIM_EXPORT CUresult cuThreadExchangeStreamCaptureMode(CUstreamCaptureMode *mode)
{
    CUstreamCaptureMode old = capture_mode;
    capture_mode = *mode;
    *mode = old;
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuEventCreate(CUevent *ev, unsigned int flags)
{
    if (!current)
        return CUDA_ERROR_INVALID_CONTEXT;
    *ev = calloc(1, sizeof(struct CUevent_st));
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuEventDestroy_v2(CUevent ev)
{
    free(ev);
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuEventDestroy(CUevent ev)
{
    return cuEventDestroy_v2(ev);
}

/*
 * An event is reached when everything queued on its stream before it is
 * done and the device gets to it: like a kernel, it waits for the device,
 * as a time-sliced GPU processes a context's event records only in that
 * context's slice.  It takes no time itself.
 */
static CUresult event_record(CUevent ev, CUstream s, int ptsz, const char *variant)
{
    int dev = current_device();
    if (!ev)
        return CUDA_ERROR_INVALID_HANDLE;
    if (dev < 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    count(variant);
    struct CUstream_st *st = stream_of(s, ptsz);
    atomic_store(&ev->at_ns, sim_timeline_run(dev, atomic_load(&st->ready_ns), 0));
    atomic_store(&st->after_event, 1);
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuEventRecord(CUevent ev, CUstream s)
{
    return event_record(ev, s, 0, "cuEventRecord");
}

SIM_EXPORT CUresult cuEventRecord_ptsz(CUevent ev, CUstream s)
{
    return event_record(ev, s, 1, "cuEventRecord_ptsz");
}

/* The stream's later work starts once the event is reached. */
SIM_EXPORT CUresult cuStreamWaitEvent(CUstream s, CUevent ev, unsigned int flags)
{
    uint64_t at = ev ? atomic_load(&ev->at_ns) : 0;
    if (!ev)
        return CUDA_ERROR_INVALID_HANDLE;
    count("cuStreamWaitEvent");
    raise_to(&stream_of(s, 0)->ready_ns, at);
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuEventQuery(CUevent ev)
{
    uint64_t at = ev ? atomic_load(&ev->at_ns) : 0;
    if (!at)
        return CUDA_ERROR_INVALID_HANDLE;
    return sim_now_ns() >= at ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

SIM_EXPORT CUresult cuEventSynchronize(CUevent ev)
{
    uint64_t at = ev ? atomic_load(&ev->at_ns) : 0;
    if (!at)
        return CUDA_ERROR_INVALID_HANDLE;
    sleep_until_ns(at);
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuEventElapsedTime_v2(float *ms, CUevent a, CUevent b)
{
    CUresult rc = cuEventQuery(a);
    if (rc == CUDA_SUCCESS)
        rc = cuEventQuery(b);
    if (rc != CUDA_SUCCESS)
        return rc;
    *ms = (float)(((double)atomic_load(&b->at_ns) - (double)atomic_load(&a->at_ns)) / 1e6);
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuEventElapsedTime(float *ms, CUevent a, CUevent b)
{
    return cuEventElapsedTime_v2(ms, a, b);
}

/* ---- launches --------------------------------------------------------------------------- */

/* A duration from the environment, read once; 0 if unset. */
static uint64_t env_ns(const char *name, _Atomic int64_t *cached)
{
    int64_t v = atomic_load(cached);
    if (v < 0) {
        const char *env = getenv(name);
        v = env ? strtoll(env, NULL, 10) : 0;
        atomic_store(cached, v > 0 ? v : 0);
    }
    return (uint64_t)v;
}

/*
 * FCSP_SIM_LAUNCH_NS: the time a launch call spends before its kernel reaches
 * the device (the real driver's submission latency; default 0).  An event
 * recorded just before the launch on an idle stream is reached at once, the
 * kernel only this much later: what makes a "cold" span longer than its kernel.
 */
static uint64_t launch_latency_ns(void)
{
    static _Atomic int64_t cached = -1;
    return env_ns("FCSP_SIM_LAUNCH_NS", &cached);
}

/*
 * FCSP_SIM_EVENT_GAP_NS: how much longer a kernel takes right after an event on its
 * stream (default 0).  On a real GPU the span of one short kernel between two events
 * reads longer than the kernel takes back to back with others, even after taking off
 * what two events back to back take: a cost that only the kernel after an event pays.
 */
static uint64_t event_gap_ns(void)
{
    static _Atomic int64_t cached = -1;
    return env_ns("FCSP_SIM_EVENT_GAP_NS", &cached);
}

/*
 * Test hook: where on the device timeline this process's kernels ran, by the tenth of a
 * cycle of CLOCK_MONOTONIC (turns: a tenant's kernels must run inside its window, not
 * only be launched there).  fcspSimPhase(cycle_ns) starts counting, fcspSimPhaseNs(b)
 * is the kernel time that fell in tenth b.
 */
static _Atomic uint64_t phase_cycle_ns;
static _Atomic uint64_t phase_ns[10];

SIM_EXPORT void fcspSimPhase(uint64_t cycle_ns)
{
    atomic_store(&phase_cycle_ns, cycle_ns);
}

SIM_EXPORT uint64_t fcspSimPhaseNs(int tenth)
{
    return tenth >= 0 && tenth < 10 ? atomic_load(&phase_ns[tenth]) : 0;
}

static void count_phases(uint64_t start, uint64_t end)
{
    uint64_t cycle = atomic_load(&phase_cycle_ns);
    if (!cycle)
        return;
    uint64_t tenth = cycle / 10;
    while (start < end) {
        uint64_t into = start % cycle, b = into / tenth;
        uint64_t upto = start - into + (b + 1) * tenth;
        uint64_t stop = end < upto ? end : upto;
        atomic_fetch_add(&phase_ns[b < 10 ? b : 9], stop - start);
        start = stop;
    }
}

/*
 * Every launch ends here.  Work that takes time goes on the device timeline
 * after whatever its stream already holds; the call itself returns once it is
 * submitted, as an asynchronous launch does.  An MPS client held to part of the
 * SMs takes the GPU's time its kernel needs, but the kernel ends no sooner than
 * it would on that part alone: each client runs at most its percentage, and
 * several clients together more.
 */
static CUresult sim_launch(const char *variant, CUstream stream, int ptsz, uint64_t dur_ns)
{
    int dev = current_device();
    if (dev < 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    count(variant);
    if (dur_ns) {
        struct CUstream_st *st = stream_of(stream, ptsz);
        /* A full launch queue blocks the caller, as the real driver's push buffer does. */
        uint64_t backlog = atomic_load(&st->ready_ns);
        if (backlog > sim_now_ns() + SIM_QUEUE_NS)
            sleep_until_ns(backlog - SIM_QUEUE_NS);
        uint64_t submitted = sim_now_ns() + launch_latency_ns();
        while (sim_now_ns() < submitted) /* spun, not slept: timer slack is as long */
            ;
        if (atomic_exchange(&st->after_event, 0))
            dur_ns += event_gap_ns();
        uint64_t end = sim_timeline_run(dev, atomic_load(&st->ready_ns), dur_ns);
        count_phases(end - dur_ns, end);
        int pct = atomic_load(&mps_threads_pct);
        if (pct < 100 && end - dur_ns + dur_ns * 100 / (uint64_t)pct > end)
            end = end - dur_ns + dur_ns * 100 / (uint64_t)pct;
        raise_to(&st->ready_ns, end);
        raise_to(&all_ready_ns, end);
    }
    return CUDA_SUCCESS;
}

static uint64_t dur(CUfunction f)
{
    if (!f)
        return 0;
    if (f->other_ns && atomic_fetch_add(&f->launches, 1) % 2)
        return f->other_ns;
    return f->dur_ns;
}

SIM_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                                   unsigned int bx, unsigned int by, unsigned int bz,
                                   unsigned int shmem, CUstream s, void **params, void **extra)
{
    return sim_launch("cuLaunchKernel", s, 0, dur(f));
}

SIM_EXPORT CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gx, unsigned int gy,
                                        unsigned int gz, unsigned int bx, unsigned int by,
                                        unsigned int bz, unsigned int shmem, CUstream s,
                                        void **params, void **extra)
{
    return sim_launch("cuLaunchKernel_ptsz", s, 1, dur(f));
}

SIM_EXPORT CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params,
                                     void **extra)
{
    return sim_launch("cuLaunchKernelEx", config ? config->hStream : NULL, 0, dur(f));
}

SIM_EXPORT CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f,
                                          void **params, void **extra)
{
    return sim_launch("cuLaunchKernelEx_ptsz", config ? config->hStream : NULL, 1, dur(f));
}

SIM_EXPORT CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gx, unsigned int gy,
                                              unsigned int gz, unsigned int bx, unsigned int by,
                                              unsigned int bz, unsigned int shmem, CUstream s,
                                              void **params)
{
    return sim_launch("cuLaunchCooperativeKernel", s, 0, dur(f));
}

SIM_EXPORT CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gx, unsigned int gy,
                                                   unsigned int gz, unsigned int bx,
                                                   unsigned int by, unsigned int bz,
                                                   unsigned int shmem, CUstream s, void **params)
{
    return sim_launch("cuLaunchCooperativeKernel_ptsz", s, 1, dur(f));
}

SIM_EXPORT CUresult cuLaunchCooperativeKernelMultiDevice(CUDA_LAUNCH_PARAMS *list,
                                                         unsigned int n, unsigned int flags)
{
    return sim_launch("cuLaunchCooperativeKernelMultiDevice", NULL, 0, 0);
}

SIM_EXPORT CUresult cuLaunch(CUfunction f)
{
    return sim_launch("cuLaunch", NULL, 0, dur(f));
}

SIM_EXPORT CUresult cuLaunchGrid(CUfunction f, int w, int h)
{
    return sim_launch("cuLaunchGrid", NULL, 0, dur(f));
}

SIM_EXPORT CUresult cuLaunchGridAsync(CUfunction f, int w, int h, CUstream s)
{
    return sim_launch("cuLaunchGridAsync", s, 0, dur(f));
}

SIM_EXPORT CUresult cuGraphLaunch(CUgraphExec exec, CUstream s)
{
    return sim_launch("cuGraphLaunch", s, 0, exec ? exec->dur_ns : 0);
}

SIM_EXPORT CUresult cuGraphLaunch_ptsz(CUgraphExec exec, CUstream s)
{
    return sim_launch("cuGraphLaunch_ptsz", s, 1, exec ? exec->dur_ns : 0);
}

SIM_EXPORT CUresult cuLaunchHostFunc(CUstream s, CUhostFn fn, void *data)
{
    count("cuLaunchHostFunc");
    if (fn)
        fn(data);
    return CUDA_SUCCESS;
}

SIM_EXPORT CUresult cuLaunchHostFunc_ptsz(CUstream s, CUhostFn fn, void *data)
{
    count("cuLaunchHostFunc_ptsz");
    if (fn)
        fn(data);
    return CUDA_SUCCESS;
}

/* ---- cuGetProcAddress ------------------------------------------------------------------ */

enum flavor { ANY, PER_THREAD };

struct proc_entry {
    const char *api;   /* the name asked for, without variant suffix */
    int version;       /* first CUDA version in which this variant is the answer */
    enum flavor flavor;
    void *fn;
};

static const struct proc_entry procs[] = {
    {"cuInit", 2000, ANY, (void *)cuInit},
    {"cuDriverGetVersion", 2020, ANY, (void *)cuDriverGetVersion},
    {"cuDeviceGet", 2000, ANY, (void *)cuDeviceGet},
    {"cuDeviceGetCount", 2000, ANY, (void *)cuDeviceGetCount},
    {"cuDeviceGetName", 2000, ANY, (void *)cuDeviceGetName},
    {"cuDeviceGetUuid", 9020, ANY, (void *)cuDeviceGetUuid},
    {"cuDeviceGetUuid", 11040, ANY, (void *)cuDeviceGetUuid_v2},
    {"cuDeviceTotalMem", 2000, ANY, (void *)cuDeviceTotalMem},
    {"cuDeviceTotalMem", 3020, ANY, (void *)cuDeviceTotalMem_v2},
    {"cuCtxCreate", 3020, ANY, (void *)cuCtxCreate_v2},
    {"cuCtxCreate", 12050, ANY, (void *)cuCtxCreate_v4},
    {"cuCtxDestroy", 2000, ANY, (void *)cuCtxDestroy},
    {"cuCtxDestroy", 4000, ANY, (void *)cuCtxDestroy_v2},
    {"cuCtxGetCurrent", 4000, ANY, (void *)cuCtxGetCurrent},
    {"cuCtxSetCurrent", 4000, ANY, (void *)cuCtxSetCurrent},
    {"cuCtxPushCurrent", 4000, ANY, (void *)cuCtxPushCurrent_v2},
    {"cuCtxPopCurrent", 4000, ANY, (void *)cuCtxPopCurrent_v2},
    {"cuCtxGetDevice", 2000, ANY, (void *)cuCtxGetDevice},
    {"cuCtxSynchronize", 2000, ANY, (void *)cuCtxSynchronize},
    {"cuDevicePrimaryCtxRetain", 7000, ANY, (void *)cuDevicePrimaryCtxRetain},
    {"cuDevicePrimaryCtxGetState", 7000, ANY, (void *)cuDevicePrimaryCtxGetState},
    {"cuDevicePrimaryCtxRelease", 7000, ANY, (void *)cuDevicePrimaryCtxRelease},
    {"cuDevicePrimaryCtxRelease", 11000, ANY, (void *)cuDevicePrimaryCtxRelease_v2},
    {"cuDevicePrimaryCtxReset", 7000, ANY, (void *)cuDevicePrimaryCtxReset},
    {"cuDevicePrimaryCtxReset", 11000, ANY, (void *)cuDevicePrimaryCtxReset_v2},
    {"cuMemAlloc", 2000, ANY, (void *)cuMemAlloc},
    {"cuMemAlloc", 3020, ANY, (void *)cuMemAlloc_v2},
    {"cuMemAllocPitch", 2000, ANY, (void *)cuMemAllocPitch},
    {"cuMemAllocPitch", 3020, ANY, (void *)cuMemAllocPitch_v2},
    {"cuMemAllocManaged", 6000, ANY, (void *)cuMemAllocManaged},
    {"cuMemFree", 2000, ANY, (void *)cuMemFree},
    {"cuMemFree", 3020, ANY, (void *)cuMemFree_v2},
    {"cuMemGetInfo", 2000, ANY, (void *)cuMemGetInfo},
    {"cuMemGetInfo", 3020, ANY, (void *)cuMemGetInfo_v2},
    {"cuMemGetAddressRange", 3020, ANY, (void *)cuMemGetAddressRange_v2},
    {"cuMemAdvise", 12020, ANY, (void *)cuMemAdvise_v2},
    {"cuMemPrefetchAsync", 12020, ANY, (void *)cuMemPrefetchAsync_v2},
    {"cuMemAllocAsync", 11020, ANY, (void *)cuMemAllocAsync},
    {"cuMemAllocAsync", 11020, PER_THREAD, (void *)cuMemAllocAsync_ptsz},
    {"cuMemAllocFromPoolAsync", 11020, ANY, (void *)cuMemAllocFromPoolAsync},
    {"cuMemAllocFromPoolAsync", 11020, PER_THREAD, (void *)cuMemAllocFromPoolAsync_ptsz},
    {"cuMemFreeAsync", 11020, ANY, (void *)cuMemFreeAsync},
    {"cuMemFreeAsync", 11020, PER_THREAD, (void *)cuMemFreeAsync_ptsz},
    {"cuDeviceGetDefaultMemPool", 11020, ANY, (void *)cuDeviceGetDefaultMemPool},
    {"cuMemPoolCreate", 11020, ANY, (void *)cuMemPoolCreate},
    {"cuMemPoolDestroy", 11020, ANY, (void *)cuMemPoolDestroy},
    {"cuMemPoolTrimTo", 11020, ANY, (void *)cuMemPoolTrimTo},
    {"cuMemCreate", 10020, ANY, (void *)cuMemCreate},
    {"cuMemRelease", 10020, ANY, (void *)cuMemRelease},
    {"cuMemGetAllocationGranularity", 10020, ANY, (void *)cuMemGetAllocationGranularity},
    {"cuArrayCreate", 2000, ANY, (void *)cuArrayCreate},
    {"cuArrayCreate", 3020, ANY, (void *)cuArrayCreate_v2},
    {"cuArray3DCreate", 2000, ANY, (void *)cuArray3DCreate},
    {"cuArray3DCreate", 3020, ANY, (void *)cuArray3DCreate_v2},
    {"cuArrayDestroy", 2000, ANY, (void *)cuArrayDestroy},
    {"cuArrayGetMemoryRequirements", 11060, ANY, (void *)cuArrayGetMemoryRequirements},
    {"cuMipmappedArrayCreate", 5000, ANY, (void *)cuMipmappedArrayCreate},
    {"cuMipmappedArrayDestroy", 5000, ANY, (void *)cuMipmappedArrayDestroy},
    {"cuMipmappedArrayGetMemoryRequirements", 11060, ANY,
     (void *)cuMipmappedArrayGetMemoryRequirements},
    {"cuIpcGetMemHandle", 4010, ANY, (void *)cuIpcGetMemHandle},
    {"cuIpcOpenMemHandle", 4010, ANY, (void *)cuIpcOpenMemHandle},
    {"cuIpcOpenMemHandle", 11000, ANY, (void *)cuIpcOpenMemHandle_v2},
    {"cuIpcCloseMemHandle", 4010, ANY, (void *)cuIpcCloseMemHandle},
    {"cuLaunch", 2000, ANY, (void *)cuLaunch},
    {"cuLaunchGrid", 2000, ANY, (void *)cuLaunchGrid},
    {"cuLaunchGridAsync", 2000, ANY, (void *)cuLaunchGridAsync},
    {"cuLaunchKernel", 4000, ANY, (void *)cuLaunchKernel},
    {"cuLaunchKernel", 7000, PER_THREAD, (void *)cuLaunchKernel_ptsz},
    {"cuLaunchKernelEx", 11060, ANY, (void *)cuLaunchKernelEx},
    {"cuLaunchKernelEx", 11060, PER_THREAD, (void *)cuLaunchKernelEx_ptsz},
    {"cuLaunchCooperativeKernel", 9000, ANY, (void *)cuLaunchCooperativeKernel},
    {"cuLaunchCooperativeKernel", 9000, PER_THREAD, (void *)cuLaunchCooperativeKernel_ptsz},
    {"cuLaunchCooperativeKernelMultiDevice", 9000, ANY,
     (void *)cuLaunchCooperativeKernelMultiDevice},
    {"cuLaunchHostFunc", 10000, ANY, (void *)cuLaunchHostFunc},
    {"cuLaunchHostFunc", 10000, PER_THREAD, (void *)cuLaunchHostFunc_ptsz},
    {"cuGraphLaunch", 10000, ANY, (void *)cuGraphLaunch},
    {"cuGraphLaunch", 10000, PER_THREAD, (void *)cuGraphLaunch_ptsz},
    {"cuModuleLoadData", 2000, ANY, (void *)cuModuleLoadData},
    {"cuModuleGetFunction", 2000, ANY, (void *)cuModuleGetFunction},
    {"cuFuncGetParamInfo", 12040, ANY, (void *)cuFuncGetParamInfo},
    {"cuKernelGetParamInfo", 12040, ANY, (void *)cuKernelGetParamInfo},
    {"cuStreamWaitEvent", 2000, ANY, (void *)cuStreamWaitEvent},
    {"cuStreamCreate", 2000, ANY, (void *)cuStreamCreate},
    {"cuStreamDestroy", 2000, ANY, (void *)cuStreamDestroy},
    {"cuStreamDestroy", 4000, ANY, (void *)cuStreamDestroy_v2},
    {"cuStreamQuery", 2000, ANY, (void *)cuStreamQuery},
    {"cuStreamQuery", 7000, PER_THREAD, (void *)cuStreamQuery_ptsz},
    {"cuStreamSynchronize", 2000, ANY, (void *)cuStreamSynchronize},
    {"cuStreamSynchronize", 7000, PER_THREAD, (void *)cuStreamSynchronize_ptsz},
    {"cuStreamIsCapturing", 10000, ANY, (void *)cuStreamIsCapturing},
    {"cuStreamIsCapturing", 10000, PER_THREAD, (void *)cuStreamIsCapturing_ptsz},
    {"cuThreadExchangeStreamCaptureMode", 10010, ANY, (void *)cuThreadExchangeStreamCaptureMode},
    {"cuEventCreate", 2000, ANY, (void *)cuEventCreate},
    {"cuEventDestroy", 2000, ANY, (void *)cuEventDestroy},
    {"cuEventDestroy", 4000, ANY, (void *)cuEventDestroy_v2},
    {"cuEventRecord", 2000, ANY, (void *)cuEventRecord},
    {"cuEventRecord", 7000, PER_THREAD, (void *)cuEventRecord_ptsz},
    {"cuEventQuery", 2000, ANY, (void *)cuEventQuery},
    {"cuEventSynchronize", 2000, ANY, (void *)cuEventSynchronize},
    {"cuEventElapsedTime", 2000, ANY, (void *)cuEventElapsedTime},
    {"cuEventElapsedTime", 12080, ANY, (void *)cuEventElapsedTime_v2},
    {"cuGetProcAddress", 11030, ANY, (void *)cuGetProcAddress},
    {"cuGetProcAddress", 12000, ANY, (void *)cuGetProcAddress_v2},
};

/*
 * The newest variant of `symbol` no newer than `version`; with the
 * per-thread flag a _ptsz variant wins over the legacy-stream one.
 */
static CUresult resolve(const char *symbol, void **pfn, int version, cuuint64_t flags,
                        CUdriverProcAddressQueryResult *status)
{
    const struct proc_entry *best = NULL;
    int known = 0;
    int per_thread = (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) != 0;
    for (size_t i = 0; i < sizeof(procs) / sizeof(procs[0]); i++) {
        const struct proc_entry *e = &procs[i];
        if (strcmp(e->api, symbol) != 0)
            continue;
        known = 1;
        if (e->version > version || (e->flavor == PER_THREAD && !per_thread))
            continue;
        if (!best || e->version > best->version ||
            (e->version == best->version && e->flavor == PER_THREAD))
            best = e;
    }
    if (status)
        *status = best ? CU_GET_PROC_ADDRESS_SUCCESS
                       : known ? CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT
                               : CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    *pfn = best ? best->fn : NULL;
    return best ? CUDA_SUCCESS : CUDA_ERROR_NOT_FOUND;
}

SIM_EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version,
                                        cuuint64_t flags, CUdriverProcAddressQueryResult *status)
{
    if (!symbol || !pfn)
        return CUDA_ERROR_INVALID_VALUE;
    return resolve(symbol, pfn, version, flags, status);
}

SIM_EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, cuuint64_t flags)
{
    if (!symbol || !pfn)
        return CUDA_ERROR_INVALID_VALUE;
    return resolve(symbol, pfn, version, flags, NULL);
}
