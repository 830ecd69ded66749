/*
 * MPS backend: make this process a client of FCSP's MPS daemon for its GPU.
 *
 * The slot decides (fcsp_limits_device.backend); the tenant's own environment may only
 * lower what the slot grants:
 *   CUDA_MPS_PIPE_DIRECTORY             always the slot's mps directory: another one
 *                                       would run the process outside FCSP's daemon;
 *   CUDA_MPS_ACTIVE_THREAD_PERCENTAGE   strict or latency priority: the share (the SMs
 *                                       the hardware lets the client use); other modes:
 *                                       what latency tenants left free (else 100), the
 *                                       SMs are lent to whoever is busy and FCSP's
 *                                       limiter holds shares;
 *   CUDA_MPS_PINNED_DEVICE_MEM_LIMIT    the memory quota, a second fence behind FCSP's.
 * Only single-GPU tenants get MPS: one process reaches one MPS daemon, and FCSP runs
 * one daemon per GPU (a fault stays on its GPU).
 *
 * libcuda reads these when CUDA initialises (cuInit connects to the daemon) and applies
 * the thread percentage to the contexts it creates.  The tenant's code runs between the
 * library's constructor and then, and may setenv() anything, so the variables are set
 * in the constructor (for a driver initialised behind the shim's back) and set again
 * right before the driver reads them: in cuInit and in every call that creates a
 * context.  Whether the thread percentage holds the tenant's share ("capped in
 * hardware", which spares it the launch limiter) is decided there too, from the values
 * in force: a process whose driver was already initialised when the shim first saw
 * cuInit, that could not reach the daemon then, or whose variables could not be set,
 * is throttled like a time-sliced tenant.
 */
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "shim.h"

#define MPS_CONTROL_SOCKET "control"

_Atomic uint32_t shim_mps_capped_centi;

/* What the slot grants this process, fixed in the constructor. */
static struct {
    bool on;                /* a single-GPU tenant of an MPS GPU */
    bool share_in_hardware; /* strict or latency: the thread percentage is the share */
    uint32_t share;         /* the requested share, 1/100 % */
    uint32_t centi;         /* the thread percentage granted, 1/100 % */
    uint64_t quota;         /* the byte quota for the pinned-memory fence; 0: none */
    char pipe[PATH_MAX];
    char control[PATH_MAX];
} plan;

static pthread_mutex_t mps_lock = PTHREAD_MUTEX_INITIALIZER;
static bool decided;      /* CUDA has initialised since the constructor (under mps_lock) */
static bool warned_socket;

static bool is_socket(const char *path)
{
    struct stat st;
    return shim_stat(path, &st) == 0 && S_ISSOCK(st.st_mode);
}

/* A percentage the tenant set for itself, or -1 when unset or malformed. */
static double own_percentage(void)
{
    const char *text = getenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE");
    if (!text || !*text)
        return -1;
    char *end;
    double v = strtod(text, &end);
    return (*end == '\0' && v > 0 && v <= 100) ? v : -1;
}

/* The tenant's pinned limit for device 0 ("0=4G,1=..." or a bare "4G"), 0 if none. */
static uint64_t own_pinned_limit(void)
{
    const char *text = getenv("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT");
    if (!text)
        return 0;
    const char *value = strncmp(text, "0=", 2) == 0 ? text + 2 : strchr(text, '=') ? NULL : text;
    if (!value)
        return 0;
    char first[32];
    size_t n = strcspn(value, ",");
    if (n == 0 || n >= sizeof(first))
        return 0;
    memcpy(first, value, n);
    first[n] = '\0';
    struct shim_env_limit limit = {0};
    return shim_parse_size(first, &limit) == 0 ? limit.bytes : 0;
}

/* The percentage in force, 1/100 %, if it holds the tenant's share; else 0. */
static uint32_t holding_share(uint32_t centi)
{
    return plan.share_in_hardware && centi <= plan.share ? centi : 0;
}

/*
 * The thread percentage: the tenant's own if it is lower, else the slot's.  Returns
 * the percentage now in force, 1/100 %, if it holds the tenant's share; else 0.
 */
static uint32_t set_thread_percentage(void)
{
    uint32_t pct = (plan.centi + 99) / 100;
    double own = own_percentage();
    if (own > 0 && own <= pct) /* the tenant asked for less */
        return holding_share(own * 100 >= 1 ? (uint32_t)(own * 100) : 1);
    char text[16];
    snprintf(text, sizeof(text), "%u", pct);
    if (setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", text, 1) != 0)
        return 0;
    return holding_share(plan.centi);
}

/* The pinned-memory fence: the tenant's own if it is lower, else the quota. */
static void set_pinned_limit(void)
{
    if (plan.quota < (1u << 20))
        return; /* no byte quota (or a percentage, resolved only after cuInit) */
    uint64_t own = own_pinned_limit();
    if (own && own <= plan.quota)
        return;
    char text[48];
    snprintf(text, sizeof(text), "0=%lluM", (unsigned long long)(plan.quota >> 20));
    setenv("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", text, 1);
}

/*
 * Put the slot's values in force; returns the thread percentage the driver will read,
 * 1/100 %, if it holds the share, else 0.  Without the daemon's socket the driver runs
 * the process time-sliced, outside any MPS limit.
 */
static uint32_t apply(void)
{
    if (!is_socket(plan.control)) {
        if (!warned_socket) /* the daemon is down or restarting */
            shim_log(LOG_WARN, "MPS backend, but %s is not a socket: this process is time-sliced",
                     plan.control);
        warned_socket = true;
        return 0;
    }
    const char *pipe = getenv("CUDA_MPS_PIPE_DIRECTORY");
    bool ok = (pipe && strcmp(pipe, plan.pipe) == 0) ||
              setenv("CUDA_MPS_PIPE_DIRECTORY", plan.pipe, 1) == 0;
    uint32_t capped = set_thread_percentage();
    set_pinned_limit();
    return ok ? capped : 0;
}

void shim_mps_init(const struct fcsp_limits *limits, const char *slot_dir)
{
    const struct fcsp_limits_device *d = &limits->device[0];
    if (limits->device_count != 1 || d->backend != FCSP_BACKEND_MPS)
        return;
    int n = snprintf(plan.pipe, sizeof(plan.pipe), "%s/%s", slot_dir, FCSP_MPS_DIR);
    int m = snprintf(plan.control, sizeof(plan.control), "%s/" MPS_CONTROL_SOCKET, plan.pipe);
    if (n < 0 || (size_t)n >= sizeof(plan.pipe) || m < 0 || (size_t)m >= sizeof(plan.control))
        return;
    /*
     * A latency tenant gets exactly its share, kept free for it by the percentages the
     * hook gave the GPU's other tenants; it is then not time-throttled as well: under
     * MPS its kernels run beside the others', so the time between a kernel's events is
     * mostly waiting, not use of the GPU.  Strict: the share.  Otherwise: what the host
     * granted (what latency tenants left), else 100 %.
     */
    plan.share = d->sm_requested_centi ? d->sm_requested_centi : FCSP_WHOLE_GPU_CENTI;
    plan.share_in_hardware = limits->isolation_mode == FCSP_MODE_STRICT ||
                             (limits->priority == FCSP_PRIORITY_LATENCY &&
                              limits->isolation_mode != FCSP_MODE_NONE);
    plan.centi = plan.share_in_hardware ? plan.share : FCSP_WHOLE_GPU_CENTI;
    if (d->mps_threads_centi && d->mps_threads_centi < plan.centi)
        plan.centi = d->mps_threads_centi;
    plan.quota = d->mem_limit_bytes;
    plan.on = true;
    if (apply())
        shim_log(LOG_DEBUG, "MPS client of %s, active threads %s%%", plan.pipe,
                 getenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"));
}

/* Did the driver initialise before this cuInit?  Then it read variables the shim never saw. */
static bool driver_initialised(void)
{
    int count = 0;
    __typeof__(&cuDeviceGetCount) get_count = shim_real(SYM_cuDeviceGetCount);
    return get_count && get_count(&count) == CUDA_SUCCESS;
}

void shim_mps_before_init(void)
{
    if (!plan.on)
        return;
    pthread_mutex_lock(&mps_lock);
    uint32_t capped = apply();
    if (!decided) {
        decided = true;
        capped = driver_initialised() ? 0 : capped;
    } else if (!atomic_load_explicit(&shim_mps_capped_centi, memory_order_relaxed)) {
        capped = 0;
    }
    atomic_store_explicit(&shim_mps_capped_centi, capped, memory_order_relaxed);
    pthread_mutex_unlock(&mps_lock);
}

void shim_mps_before_context(void)
{
    if (!plan.on)
        return;
    pthread_mutex_lock(&mps_lock);
    /* A context made before the shim saw cuInit: the driver was initialised around it. */
    uint32_t capped = apply();
    if (!decided || !atomic_load_explicit(&shim_mps_capped_centi, memory_order_relaxed))
        capped = 0;
    decided = true;
    atomic_store_explicit(&shim_mps_capped_centi, capped, memory_order_relaxed);
    pthread_mutex_unlock(&mps_lock);
}

/* ---- the calls that create a context ------------------------------------------------ */

/* Exported for programs linked against libcuda: the driver in use may lack a variant. */
#define CREATE(sym, ...)                                                                      \
    do {                                                                                      \
        shim_mps_before_context();                                                            \
        __typeof__(&sym) real = REAL(sym);                                                    \
        return real ? real(__VA_ARGS__) : CUDA_ERROR_NOT_FOUND;                               \
    } while (0)

SHIM_EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)
{
    CREATE(cuDevicePrimaryCtxRetain, pctx, dev);
}

SHIM_EXPORT CUresult cuCtxCreate(CUcontext *pctx, unsigned int flags, CUdevice dev)
{
    CREATE(cuCtxCreate, pctx, flags, dev);
}

SHIM_EXPORT CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev)
{
    CREATE(cuCtxCreate_v2, pctx, flags, dev);
}

SHIM_EXPORT CUresult cuCtxCreate_v3(CUcontext *pctx, CUexecAffinityParam *paramsArray,
                                    int numParams, unsigned int flags, CUdevice dev)
{
    CREATE(cuCtxCreate_v3, pctx, paramsArray, numParams, flags, dev);
}

SHIM_EXPORT CUresult cuCtxCreate_v4(CUcontext *pctx, CUctxCreateParams *ctxCreateParams,
                                    unsigned int flags, CUdevice dev)
{
    CREATE(cuCtxCreate_v4, pctx, ctxCreateParams, flags, dev);
}

SHIM_EXPORT CUresult cuGreenCtxCreate(CUgreenCtx *phCtx, CUdevResourceDesc desc, CUdevice dev,
                                      unsigned int flags)
{
    CREATE(cuGreenCtxCreate, phCtx, desc, dev, flags);
}
