/*
 * A tiny interpreter over the driver API, driven by tests/test_shim_*.py:
 *
 *   drv_procaddr [--ptsz] CMD ARGS... CMD ARGS...
 *
 * Each command prints one line the test parses.  Objects (allocations,
 * contexts) are numbered in creation order from 0.  Commands:
 *   init | device D | ctx D | destroyctx ID | releaseprimary D | resetprimary D
 *   alloc FAMILY SIZE      FAMILY: mem mem1 managed pitch async pool vmm array
 *                          array3d mipmap; SIZE: bytes or 512K/64M/1G
 *   free ID | ipcget ID | ipcopen HEX | trim
 *   meminfo | meminfo1 | totalmem D | launch KIND N | count NAME
 *   resolve NAME VERSION FLAGS | usage | wait | fork | exec | sleep MS
 *   advice ID              where the sim's driver keeps allocation ID: prints
 *                          "advice managed=0|1 preferred=none|host|deviceN
 *                          accessed_by=MASK resident=BYTES in=N out=N" (bit d: device d;
 *                          in, out: how many times it moved to the device and back)
 *   use FUNC KIND N ID...  launch KIND (kernel kernelex coop packed extra) of function FUNC
 *                          once with the sim's parameters: the count N, then the addresses of
 *                          allocations ID... (at most 8); prints "use RC".  extra: the same
 *                          bytes in one buffer (CU_LAUNCH_PARAM_BUFFER_POINTER), no kernelParams
 *   usethreads N LAUNCHES FUNC ID...  N threads at once, each launching FUNC LAUNCHES times
 *                          with one pointer, allocation ID[(k * N + t) % count] at its k-th
 *                          launch (thread t); prints "usethreads JOINED FAILED"
 *   allocs FAMILY SIZE N   N allocations as "alloc"; prints "allocs OK FIRST_ID"
 *   frees FIRST N          free objects FIRST..FIRST+N-1; prints "frees FAILED"
 *   func NAME              a function; in the sim "k_200us" runs 200 us
 *   graph US               a sim executable graph whose replay runs US us
 *   batch N                later runs synchronize after every N launches
 *   run KIND ID SECONDS    launch KIND (kernel kernelex coop graph) on object ID
 *                          (-1: none) for SECONDS, then synchronize; prints
 *                          "run RC launched N wall_ns W cpu_ns C"
 *   launches KIND ID N     launch KIND on object ID N times, without synchronizing;
 *                          prints "launches RC N" | sync: cuCtxSynchronize
 *   capture 0|1            the sim's legacy stream (with --ptsz: the thread's per-thread
 *                          stream) reports (not) capturing
 *   threads ID N LAUNCHES  N threads in turn, each launching function ID LAUNCHES
 *                          times and exiting; prints "threads JOINED"
 *   setenv NAME VALUE      the process's own setenv(), e.g. before init
 */
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "drv.h"
#include "fcsp_slot.h"

enum obj_kind { OBJ_LINEAR, OBJ_LINEAR_V1, OBJ_ASYNC, OBJ_VMM, OBJ_ARRAY, OBJ_MIPMAP, OBJ_IPC, OBJ_CTX, OBJ_FUNC };

struct object {
    enum obj_kind kind;
    unsigned long long value;
};

static struct api api;
static struct object objects[8192];
static cuuint64_t proc_flags = CU_GET_PROC_ADDRESS_DEFAULT; /* --ptsz: the per-thread stream */
static int nobjects;

static unsigned long long parse_size(const char *s)
{
    char *end;
    double v = strtod(s, &end);
    switch (*end) {
    case 'K': return (unsigned long long)(v * 1024);
    case 'M': return (unsigned long long)(v * 1024 * 1024);
    case 'G': return (unsigned long long)(v * 1024 * 1024 * 1024);
    default: return (unsigned long long)v;
    }
}

static int quiet; /* "allocs": no line per allocation */
static CUresult last_rc;

static void add_object(enum obj_kind kind, unsigned long long value)
{
    if (nobjects >= (int)(sizeof(objects) / sizeof(objects[0]))) {
        fprintf(stderr, "too many objects\n");
        exit(2);
    }
    objects[nobjects] = (struct object){kind, value};
    if (!quiet)
        printf("ok %d\n", nobjects);
    nobjects++;
}

static void report(CUresult rc, enum obj_kind kind, unsigned long long value)
{
    last_rc = rc;
    if (rc == CUDA_SUCCESS)
        add_object(kind, value);
    else if (!quiet)
        printf("err %d\n", (int)rc);
}

static CUresult use_device(int ordinal)
{
    CUdevice dev;
    CUcontext ctx;
    CUresult rc = api.device_get(&dev, ordinal);
    if (rc == CUDA_SUCCESS)
        rc = api.primary_retain(&ctx, dev);
    if (rc == CUDA_SUCCESS)
        rc = api.ctx_set_current(ctx);
    return rc;
}

static void alloc(const char *family, unsigned long long size)
{
    CUresult rc;
    if (strcmp(family, "mem") == 0) {
        CUdeviceptr p = 0;
        rc = api.mem_alloc(&p, size);
        report(rc, OBJ_LINEAR, p);
    } else if (strcmp(family, "mem1") == 0) {
        CUdeviceptr_v1 p = 0;
        rc = api.mem_alloc_v1(&p, (unsigned int)size);
        report(rc, OBJ_LINEAR_V1, p);
    } else if (strcmp(family, "managed") == 0) {
        CUdeviceptr p = 0;
        rc = api.mem_alloc_managed(&p, size, CU_MEM_ATTACH_GLOBAL);
        report(rc, OBJ_LINEAR, p);
    } else if (strcmp(family, "pitch") == 0) { /* SIZE bytes wide, 4 rows */
        CUdeviceptr p = 0;
        size_t pitch = 0;
        rc = api.mem_alloc_pitch(&p, &pitch, size, 4, 4);
        report(rc, OBJ_LINEAR, p);
    } else if (strcmp(family, "async") == 0) {
        CUdeviceptr p = 0;
        rc = api.mem_alloc_async(&p, size, NULL);
        report(rc, OBJ_ASYNC, p);
    } else if (strcmp(family, "pool") == 0) {
        CUmemoryPool pool;
        CUdeviceptr p = 0;
        rc = api.default_pool(&pool, 0);
        if (rc == CUDA_SUCCESS)
            rc = api.mem_alloc_pool(&p, size, pool, NULL);
        report(rc, OBJ_ASYNC, p);
    } else if (strcmp(family, "vmm") == 0) {
        CUmemAllocationProp prop;
        memset(&prop, 0, sizeof(prop));
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
        prop.location.id = 0;
        CUmemGenericAllocationHandle h = 0;
        rc = api.mem_create(&h, size, &prop, 0);
        report(rc, OBJ_VMM, h);
    } else if (strcmp(family, "array") == 0) { /* SIZE bytes of uint8, one row */
        CUDA_ARRAY_DESCRIPTOR d = {.Width = size, .Height = 1,
                                   .Format = CU_AD_FORMAT_UNSIGNED_INT8, .NumChannels = 1};
        CUarray a = NULL;
        rc = api.array_create(&a, &d);
        report(rc, OBJ_ARRAY, (unsigned long long)(uintptr_t)a);
    } else if (strcmp(family, "array3d") == 0) { /* SIZE/4 floats, one row, one slice */
        CUDA_ARRAY3D_DESCRIPTOR d = {.Width = size / 4, .Height = 1, .Depth = 1,
                                     .Format = CU_AD_FORMAT_FLOAT, .NumChannels = 1};
        CUarray a = NULL;
        rc = api.array3d_create(&a, &d);
        report(rc, OBJ_ARRAY, (unsigned long long)(uintptr_t)a);
    } else if (strcmp(family, "mipmap") == 0) { /* SIZE bytes at level 0, two levels */
        CUDA_ARRAY3D_DESCRIPTOR d = {.Width = size, .Height = 0, .Depth = 0,
                                     .Format = CU_AD_FORMAT_UNSIGNED_INT8, .NumChannels = 1};
        CUmipmappedArray m = NULL;
        rc = api.mipmap_create(&m, &d, 2);
        report(rc, OBJ_MIPMAP, (unsigned long long)(uintptr_t)m);
    } else {
        fprintf(stderr, "unknown family %s\n", family);
        exit(2);
    }
}

static CUresult free_object(int id)
{
    struct object *o = &objects[id];
    switch (o->kind) {
    case OBJ_LINEAR: return api.mem_free(o->value);
    case OBJ_LINEAR_V1: return api.mem_free_v1((CUdeviceptr_v1)o->value);
    case OBJ_ASYNC: return api.mem_free_async(o->value, NULL);
    case OBJ_VMM: return api.mem_release(o->value);
    case OBJ_ARRAY: return api.array_destroy((CUarray)(uintptr_t)o->value);
    case OBJ_MIPMAP: return api.mipmap_destroy((CUmipmappedArray)(uintptr_t)o->value);
    case OBJ_IPC: return api.ipc_close(o->value);
    case OBJ_CTX: return api.ctx_destroy((CUcontext)(uintptr_t)o->value);
    case OBJ_FUNC: return CUDA_SUCCESS;
    }
    return CUDA_ERROR_INVALID_VALUE;
}

static void host_fn(void *data)
{
    (*(int *)data)++;
}

/* One launch of function func with params by `kind` ("kernel", "kernelex", "coop") into
 * *rc; false for another kind. */
static bool launch_params(const char *kind, void *func, void **params, CUresult *rc)
{
    if (strcmp(kind, "kernel") == 0) {
        *rc = api.launch_kernel(func, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL);
    } else if (strcmp(kind, "kernelex") == 0) {
        CUlaunchConfig config;
        memset(&config, 0, sizeof(config));
        config.gridDimX = config.gridDimY = config.gridDimZ = 1;
        config.blockDimX = config.blockDimY = config.blockDimZ = 1;
        *rc = api.launch_kernel_ex(&config, func, params, NULL);
    } else if (strcmp(kind, "coop") == 0) {
        *rc = api.launch_coop(func, 1, 1, 1, 1, 1, 1, 0, NULL, params);
    } else {
        return false;
    }
    return true;
}

/* One launch of `kind`; obj is a function (or a graph for "graph"), NULL for none. */
static CUresult launch_obj(const char *kind, void *obj)
{
    CUresult rc;
    if (launch_params(kind, obj, NULL, &rc))
        return rc;
    if (strcmp(kind, "graph") == 0)
        return api.graph_launch(obj, NULL);
    if (strcmp(kind, "host") == 0) {
        static int calls;
        return api.launch_host(NULL, host_fn, &calls);
    }
    fprintf(stderr, "unknown launch kind %s\n", kind);
    exit(2);
}

/* "use": one launch of function `func` whose pointer arguments are `ptrs`. */
static CUresult launch_using(const char *kind, void *func, uint32_t n, const CUdeviceptr *ptrs)
{
    enum { POINTERS = 8 }; /* the sim's functions: a 4-byte count, then 8 pointers */
    uint32_t count = n;
    CUdeviceptr args[POINTERS] = {0};
    void *params[1 + POINTERS] = {&count};
    for (uint32_t k = 0; k < POINTERS; k++) {
        if (k < n)
            args[k] = ptrs[k];
        params[1 + k] = &args[k];
    }
    CUresult rc;
    if (launch_params(kind, func, params, &rc))
        return rc;
    if (strcmp(kind, "extra") == 0) { /* the same bytes in one buffer, no kernelParams */
        struct {
            uint32_t n;
            uint32_t pad;
            CUdeviceptr ptrs[POINTERS];
        } buffer = {.n = n};
        memcpy(buffer.ptrs, args, sizeof(args));
        size_t size = sizeof(buffer);
        void *extra[] = {CU_LAUNCH_PARAM_BUFFER_POINTER, &buffer, CU_LAUNCH_PARAM_BUFFER_SIZE,
                         &size, CU_LAUNCH_PARAM_END};
        return api.launch_kernel(func, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, extra);
    }
    if (strcmp(kind, "packed") == 0) { /* a p_ function: the pointers in one structure */
        struct {
            uint64_t n;
            CUdeviceptr ptrs[POINTERS];
        } packed = {.n = n};
        memcpy(packed.ptrs, args, sizeof(args));
        void *packed_params[] = {&count, &packed};
        return api.launch_kernel(func, 1, 1, 1, 1, 1, 1, 0, NULL, packed_params, NULL);
    }
    fprintf(stderr, "unknown launch kind %s\n", kind);
    exit(2);
}

static CUresult launch(const char *kind)
{
    return launch_obj(kind, NULL);
}

static unsigned long long clock_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}

/*
 * Launch `kind` on object `id` (-1: none) for `seconds` of wall time, then
 * wait for the device: every kernel launched has then completed.  Reports the
 * launches, the wall time up to completion and the CPU time the process used.
 */
static long sync_every; /* "batch N": synchronize after every N launches of a run */

/* A sim-only entry point of the simulated driver (fcspSimCount, fcspSimGraphExec, ...). */
static void *sim_entry(const char *name)
{
    void *p = dlsym(RTLD_DEFAULT, name);
    if (!p) {
        void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
        p = lib ? dlsym(lib, name) : NULL;
    }
    return p;
}

/* "phase US": the simulated driver counts the kernel time of later runs by the tenth of a
 * US-long cycle of CLOCK_MONOTONIC it ran in on the device ("ran", us; turns: inside the
 * window). */
static int report_ran; /* "phase" was given */

static void run_loop(const char *kind, int id, double seconds)
{
    void *obj = id >= 0 ? (void *)(uintptr_t)objects[id].value : NULL;
    unsigned long long cpu0 = clock_ns(CLOCK_PROCESS_CPUTIME_ID), t0 = clock_ns(CLOCK_MONOTONIC);
    unsigned long long deadline = t0 + (unsigned long long)(seconds * 1e9);
    long n = 0;
    CUresult rc = CUDA_SUCCESS;
    while (rc == CUDA_SUCCESS && clock_ns(CLOCK_MONOTONIC) < deadline) {
        rc = launch_obj(kind, obj);
        n += rc == CUDA_SUCCESS;
        if (sync_every && n % sync_every == 0 && rc == CUDA_SUCCESS)
            rc = api.ctx_sync();
    }
    if (rc == CUDA_SUCCESS)
        rc = api.ctx_sync();
    unsigned long long wall = clock_ns(CLOCK_MONOTONIC) - t0;
    unsigned long long cpu = clock_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu0;
    printf("run %d launched %ld wall_ns %llu cpu_ns %llu\n", (int)rc, n, wall, cpu);
    uint64_t (*ran)(int) = (uint64_t(*)(int))sim_entry("fcspSimPhaseNs");
    if (report_ran && ran) {
        printf("ran");
        for (int b = 0; b < 10; b++)
            printf(" %llu", (unsigned long long)(ran(b) / 1000));
        printf("\n");
    }
}

/* "threads ID N LAUNCHES": N threads one after another, each launching object ID (a
 * function) LAUNCHES times and exiting, 11 ms apart (each gets the calibration sample that
 * is due every 10 ms). */
struct thread_job {
    void *obj;
    long launches;
};

static void *thread_launches(void *arg)
{
    const struct thread_job *job = arg;
    if (use_device(0) == CUDA_SUCCESS)
        for (long k = 0; k < job->launches; k++)
            launch_obj("kernel", job->obj);
    return NULL;
}

static void run_threads(int id, int n, long launches)
{
    struct thread_job job = {id >= 0 ? (void *)(uintptr_t)objects[id].value : NULL, launches};
    int joined = 0;
    for (int t = 0; t < n; t++) {
        pthread_t thread;
        if (pthread_create(&thread, NULL, thread_launches, &job) == 0 &&
            pthread_join(thread, NULL) == 0)
            joined++;
        usleep(11000);
    }
    printf("threads %d\n", joined);
}

/* "usethreads N LAUNCHES FUNC ID...": N threads launching at once over the allocations. */
struct use_job {
    void *func;
    int thread, threads, count;
    long launches;
    const CUdeviceptr *ptrs;
    pthread_barrier_t *start;
    long failed;
};

static void *thread_uses(void *arg)
{
    struct use_job *job = arg;
    if (use_device(0) != CUDA_SUCCESS) {
        job->failed = job->launches;
        pthread_barrier_wait(job->start);
        return NULL;
    }
    pthread_barrier_wait(job->start);
    for (long k = 0; k < job->launches; k++) {
        CUdeviceptr p = job->ptrs[(k * job->threads + job->thread) % job->count];
        job->failed += launch_using("kernel", job->func, 1, &p) != CUDA_SUCCESS;
    }
    return NULL;
}

static void run_use_threads(int n, long launches, void *func, int count, const CUdeviceptr *ptrs)
{
    enum { MAX_THREADS = 16 };
    struct use_job jobs[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    pthread_barrier_t start;
    n = n < MAX_THREADS ? n : MAX_THREADS;
    if (n < 1 || count < 1) {
        fprintf(stderr, "usethreads: no threads or no allocations\n");
        exit(2);
    }
    pthread_barrier_init(&start, NULL, (unsigned)n);
    int started = 0, joined = 0;
    long failed = 0;
    for (int t = 0; t < n; t++) {
        jobs[t] = (struct use_job){func, t, n, count, launches, ptrs, &start, 0};
        if (pthread_create(&threads[t], NULL, thread_uses, &jobs[t]) != 0)
            break;
        started++;
    }
    for (int t = 0; t < started; t++)
        if (pthread_join(threads[t], NULL) == 0) {
            joined++;
            failed += jobs[t].failed;
        }
    pthread_barrier_destroy(&start);
    printf("usethreads %d %ld\n", joined, failed);
}

static void print_usage(void)
{
    const char *dir = getenv("FCSP_SLOT_DIR");
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir ? dir : FCSP_SLOT_DIR, FCSP_USAGE_FILE);
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        printf("usage none\n");
        return;
    }
    const struct fcsp_usage *u = mmap(NULL, sizeof(*u), PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (u == MAP_FAILED) {
        printf("usage none\n");
        return;
    }
    for (unsigned d = 0; d < FCSP_MAX_DEVICES; d++) {
        const struct fcsp_usage_device *dev = &u->device[d];
        if (dev->mem_used_bytes || dev->launches)
            printf("used %u %llu launches %llu\n", d, (unsigned long long)dev->mem_used_bytes,
                   (unsigned long long)dev->launches);
        if (dev->mem_spilled_bytes || dev->mem_spill_peak_bytes)
            printf("spill %u %llu peak %llu\n", d, (unsigned long long)dev->mem_spilled_bytes,
                   (unsigned long long)dev->mem_spill_peak_bytes);
        if (dev->mem_migrated_in_bytes || dev->mem_migrated_out_bytes)
            printf("migrated %u in %llu out %llu\n", d,
                   (unsigned long long)dev->mem_migrated_in_bytes,
                   (unsigned long long)dev->mem_migrated_out_bytes);
    }
    for (unsigned i = 0; i < FCSP_MAX_PROCS; i++)
        if (u->proc[i].state == FCSP_PROC_LIVE)
            printf("proc %d %llu\n", (int)u->proc[i].pid,
                   (unsigned long long)u->proc[i].mem_used_bytes[0]);
    printf("usage end\n");
    munmap((void *)u, sizeof(*u));
}

static void print_advice(int id)
{
    CUresult (*query)(CUdeviceptr, int *, CUmemLocation *, uint32_t *, uint64_t *) =
        (CUresult(*)(CUdeviceptr, int *, CUmemLocation *, uint32_t *, uint64_t *))sim_entry(
            "fcspSimAdvice");
    int managed = 0;
    CUmemLocation where = {0};
    uint32_t accessed_by = 0;
    uint64_t resident = 0;
    if (!query || query(objects[id].value, &managed, &where, &accessed_by, &resident)) {
        printf("advice none\n");
        return;
    }
    char preferred[32] = "none";
    if (where.type == CU_MEM_LOCATION_TYPE_HOST)
        snprintf(preferred, sizeof(preferred), "host");
    else if (where.type == CU_MEM_LOCATION_TYPE_DEVICE)
        snprintf(preferred, sizeof(preferred), "device%d", where.id);
    CUresult (*moves)(CUdeviceptr, uint32_t *, uint32_t *) =
        (CUresult(*)(CUdeviceptr, uint32_t *, uint32_t *))sim_entry("fcspSimMigrations");
    uint32_t moved_in = 0, moved_out = 0;
    if (moves)
        moves(objects[id].value, &moved_in, &moved_out);
    printf("advice managed=%d preferred=%s accessed_by=%u resident=%llu in=%u out=%u\n", managed,
           preferred, accessed_by, (unsigned long long)resident, moved_in, moved_out);
}

static void resolve(const char *name, int version, unsigned long long flags)
{
    void *p = NULL;
    CUdriverProcAddressQueryResult status = 0;
    CUresult rc = api.get_proc(name, &p, version, flags, &status);
    Dl_info info;
    memset(&info, 0, sizeof(info));
    const char *lib = "-", *sym = "-";
    if (p && dladdr(p, &info)) {
        lib = info.dli_fname ? strrchr(info.dli_fname, '/') ? strrchr(info.dli_fname, '/') + 1
                                                            : info.dli_fname
                             : "-";
        sym = info.dli_sname ? info.dli_sname : "-";
    }
    printf("resolve %s rc=%d status=%d lib=%s sym=%s\n", name, (int)rc, (int)status, lib, sym);
}

int main(int argc, char **argv)
{
    int i = 1;
    if (i < argc && strcmp(argv[i], "--ptsz") == 0) {
        proc_flags = CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM;
        i++;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (drv_load(&api, proc_flags) < 0) {
        printf("load failed\n");
        return 3;
    }
#define ARG(n) (i + (n) < argc ? argv[i + (n)] : (fprintf(stderr, "missing argument\n"), exit(2), ""))
    while (i < argc) {
        const char *cmd = argv[i];
        if (strcmp(cmd, "init") == 0) {
            CUresult rc = api.init(0);
            if (rc == CUDA_SUCCESS)
                rc = use_device(0);
            printf("init %d\n", (int)rc);
            i += 1;
        } else if (strcmp(cmd, "device") == 0) {
            printf("device %d\n", (int)use_device(atoi(ARG(1))));
            i += 2;
        } else if (strcmp(cmd, "ctx") == 0) {
            CUcontext ctx = NULL;
            CUdevice dev;
            CUresult rc = api.device_get(&dev, atoi(ARG(1)));
            if (rc == CUDA_SUCCESS)
                rc = api.ctx_create(&ctx, NULL, 0, dev);
            report(rc, OBJ_CTX, (unsigned long long)(uintptr_t)ctx);
            i += 2;
        } else if (strcmp(cmd, "releaseprimary") == 0 || strcmp(cmd, "resetprimary") == 0) {
            CUdevice dev;
            CUresult rc = api.device_get(&dev, atoi(ARG(1)));
            if (rc == CUDA_SUCCESS)
                rc = cmd[1] == 'e' && cmd[2] == 'l' ? api.primary_release(dev)
                                                    : api.primary_reset(dev);
            printf("%s %d\n", cmd, (int)rc);
            i += 2;
        } else if (strcmp(cmd, "alloc") == 0) {
            alloc(ARG(1), parse_size(ARG(2)));
            i += 3;
        } else if (strcmp(cmd, "free") == 0 || strcmp(cmd, "destroyctx") == 0) {
            printf("free %d\n", (int)free_object(atoi(ARG(1))));
            i += 2;
        } else if (strcmp(cmd, "ipcget") == 0) {
            CUipcMemHandle h;
            CUresult rc = api.ipc_get(&h, objects[atoi(ARG(1))].value);
            printf("ipc ");
            for (size_t b = 0; b < sizeof(h.reserved); b++)
                printf("%02x", (unsigned char)h.reserved[b]);
            printf(" %d\n", (int)rc);
            i += 2;
        } else if (strcmp(cmd, "ipcopen") == 0) {
            CUipcMemHandle h;
            const char *hex = ARG(1);
            for (size_t b = 0; b < sizeof(h.reserved); b++) {
                unsigned v = 0;
                sscanf(hex + 2 * b, "%2x", &v);
                h.reserved[b] = (char)v;
            }
            CUdeviceptr p = 0;
            CUresult rc = api.ipc_open(&p, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
            report(rc, OBJ_IPC, p);
            i += 2;
        } else if (strcmp(cmd, "trim") == 0) {
            CUmemoryPool pool;
            CUresult rc = api.default_pool(&pool, 0);
            if (rc == CUDA_SUCCESS)
                rc = api.pool_trim(pool, 0);
            printf("trim %d\n", (int)rc);
            i += 1;
        } else if (strcmp(cmd, "meminfo") == 0) {
            size_t f = 0, t = 0;
            CUresult rc = api.mem_get_info(&f, &t);
            printf("meminfo %zu %zu %d\n", f, t, (int)rc);
            i += 1;
        } else if (strcmp(cmd, "meminfo1") == 0) {
            unsigned int f = 0, t = 0;
            CUresult rc = api.mem_get_info_v1(&f, &t);
            printf("meminfo1 %u %u %d\n", f, t, (int)rc);
            i += 1;
        } else if (strcmp(cmd, "totalmem") == 0) {
            CUdevice dev;
            size_t bytes = 0;
            CUresult rc = api.device_get(&dev, atoi(ARG(1)));
            if (rc == CUDA_SUCCESS)
                rc = api.device_total_mem(&bytes, dev);
            printf("totalmem %zu %d\n", bytes, (int)rc);
            i += 2;
        } else if (strcmp(cmd, "launch") == 0) {
            int n = atoi(ARG(2));
            CUresult rc = CUDA_SUCCESS;
            for (int k = 0; k < n && rc == CUDA_SUCCESS; k++)
                rc = launch(ARG(1));
            printf("launch %d\n", (int)rc);
            i += 3;
        } else if (strcmp(cmd, "func") == 0) { /* NAME: k_200us runs 200 us in the sim */
            CUmodule mod = NULL;
            CUfunction f = NULL;
            CUresult rc = api.module_load(&mod, "");
            if (rc == CUDA_SUCCESS)
                rc = api.get_function(&f, mod, ARG(1));
            report(rc, OBJ_FUNC, (unsigned long long)(uintptr_t)f);
            i += 2;
        } else if (strcmp(cmd, "graph") == 0) { /* US: a sim graph whose replay runs US us */
            CUgraphExec (*make)(uint64_t) = (CUgraphExec(*)(uint64_t))sim_entry("fcspSimGraphExec");
            CUgraphExec g = make ? make((uint64_t)(atof(ARG(1)) * 1000)) : NULL;
            report(g ? CUDA_SUCCESS : CUDA_ERROR_NOT_SUPPORTED, OBJ_FUNC,
                   (unsigned long long)(uintptr_t)g);
            i += 2;
        } else if (strcmp(cmd, "capture") == 0) { /* 0|1: the launches' stream reports capturing */
            void (*set)(CUstream, int) = (void (*)(CUstream, int))sim_entry("fcspSimSetCapturing");
            int per_thread = proc_flags == CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM;
            if (set)
                set(per_thread ? CU_STREAM_PER_THREAD : NULL, atoi(ARG(1)));
            printf("capture %d\n", set ? 0 : 1);
            i += 2;
        } else if (strcmp(cmd, "run") == 0) { /* KIND ID SECONDS */
            run_loop(ARG(1), atoi(ARG(2)), atof(ARG(3)));
            i += 4;
        } else if (strcmp(cmd, "launches") == 0) { /* KIND ID N, no synchronize */
            int id = atoi(ARG(2));
            long n = atol(ARG(3)), k = 0;
            CUresult rc = CUDA_SUCCESS;
            for (; k < n && rc == CUDA_SUCCESS; k++)
                rc = launch_obj(ARG(1), id >= 0 ? (void *)(uintptr_t)objects[id].value : NULL);
            printf("launches %d %ld\n", (int)rc, k);
            i += 4;
        } else if (strcmp(cmd, "use") == 0) { /* FUNC KIND N ID... */
            int n = atoi(ARG(3));
            CUdeviceptr ptrs[8] = {0};
            for (int k = 0; k < n && k < 8; k++)
                ptrs[k] = objects[atoi(ARG(4 + k))].value;
            void *func = (void *)(uintptr_t)objects[atoi(ARG(1))].value;
            printf("use %d\n", (int)launch_using(ARG(2), func, (uint32_t)(n < 8 ? n : 8), ptrs));
            i += 4 + n;
        } else if (strcmp(cmd, "usethreads") == 0) { /* N LAUNCHES FUNC ID... */
            static CUdeviceptr ptrs[64];
            int count = 0;
            while (i + 4 + count < argc && count < 64 && argv[i + 4 + count][0] >= '0' &&
                   argv[i + 4 + count][0] <= '9')
                count++;
            for (int k = 0; k < count; k++)
                ptrs[k] = objects[atoi(argv[i + 4 + k])].value;
            run_use_threads(atoi(ARG(1)), atol(ARG(2)),
                            (void *)(uintptr_t)objects[atoi(ARG(3))].value, count, ptrs);
            i += 4 + count;
        } else if (strcmp(cmd, "allocs") == 0) { /* FAMILY SIZE N */
            int n = atoi(ARG(3)), first = nobjects, ok = 0;
            quiet = 1;
            for (int k = 0; k < n; k++) {
                alloc(ARG(1), parse_size(ARG(2)));
                ok += last_rc == CUDA_SUCCESS;
            }
            quiet = 0;
            printf("allocs %d %d\n", ok, first);
            i += 4;
        } else if (strcmp(cmd, "frees") == 0) { /* FIRST N */
            int first = atoi(ARG(1)), n = atoi(ARG(2)), failed = 0;
            for (int k = first; k < first + n; k++)
                failed += free_object(k) != CUDA_SUCCESS;
            printf("frees %d\n", failed);
            i += 3;
        } else if (strcmp(cmd, "sync") == 0) {
            printf("sync %d\n", (int)api.ctx_sync());
            i += 1;
        } else if (strcmp(cmd, "threads") == 0) { /* ID N LAUNCHES */
            run_threads(atoi(ARG(1)), atoi(ARG(2)), atol(ARG(3)));
            i += 4;
        } else if (strcmp(cmd, "batch") == 0) { /* N: later runs synchronize every N launches */
            sync_every = atol(ARG(1));
            i += 2;
        } else if (strcmp(cmd, "phase") == 0) { /* US: kernel time by tenth of cycle (sim) */
            void (*count_ran)(uint64_t) = (void (*)(uint64_t))sim_entry("fcspSimPhase");
            if (count_ran)
                count_ran((uint64_t)atoll(ARG(1)) * 1000u);
            report_ran = 1;
            i += 2;
        } else if (strcmp(cmd, "count") == 0) {
            uint64_t (*counter)(const char *) = (uint64_t(*)(const char *))sim_entry("fcspSimCount");
            printf("count %s %llu\n", ARG(1),
                   counter ? (unsigned long long)counter(ARG(1)) : 0ull);
            i += 2;
        } else if (strcmp(cmd, "resolve") == 0) {
            resolve(ARG(1), atoi(ARG(2)), strtoull(ARG(3), NULL, 0));
            i += 4;
        } else if (strcmp(cmd, "advice") == 0) {
            print_advice(atoi(ARG(1)));
            i += 2;
        } else if (strcmp(cmd, "usage") == 0) {
            print_usage();
            i += 1;
        } else if (strcmp(cmd, "wait") == 0) { /* block until the test writes a line */
            printf("ready\n");
            char line[64];
            if (!fgets(line, sizeof(line), stdin))
                line[0] = '\0';
            i += 1;
        } else if (strcmp(cmd, "fork") == 0) { /* the child runs the rest; the parent waits */
            fflush(stdout);
            pid_t pid = fork();
            if (pid < 0)
                return 4;
            i += 1;
            if (pid > 0) {
                int status = 0;
                waitpid(pid, &status, 0);
                printf("child %d %d\n", (int)pid, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
                return 0;
            }
            printf("forked %d\n", (int)getpid());
        } else if (strcmp(cmd, "exec") == 0) { /* the rest runs in a new image, same pid */
            fflush(stdout);
            argv[i] = argv[0];
            execv(argv[0], argv + i);
            return 4;
        } else if (strcmp(cmd, "setenv") == 0) { /* NAME VALUE */
            printf("setenv %d\n", setenv(ARG(1), ARG(2), 1));
            i += 3;
        } else if (strcmp(cmd, "sleep") == 0) {
            struct timespec ts = {0, atol(ARG(1)) * 1000000L};
            nanosleep(&ts, NULL);
            i += 2;
        } else {
            fprintf(stderr, "unknown command %s\n", cmd);
            return 2;
        }
    }
    return 0;
}
