/*
 * MPS backend: make this process a client of FCSP's MPS daemon for its GPU.
 *
 * libcuda reads CUDA_MPS_* once, at cuInit, so this runs from the library's
 * constructor, before main().  The slot decides (fcsp_limits_device.backend);
 * the tenant's own environment may only lower what the slot grants:
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
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "shim.h"

#define MPS_CONTROL_SOCKET "control"

bool shim_mps_thread_capped;

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

/*
 * The SMs this client may use.  A latency tenant gets exactly its share, kept free
 * for it by the percentages the hook gave the GPU's other tenants; it is then not
 * time-throttled as well: under MPS its kernels run beside the others', so the time
 * between a kernel's events is mostly waiting, not use of the GPU.  Strict: the
 * share.  Otherwise: what the host granted (what latency tenants left), else 100 %.
 */
static void set_thread_percentage(const struct fcsp_limits *limits)
{
    const struct fcsp_limits_device *d = &limits->device[0];
    uint32_t share = d->sm_requested_centi ? d->sm_requested_centi : FCSP_WHOLE_GPU_CENTI;
    bool share_in_hardware = limits->isolation_mode == FCSP_MODE_STRICT ||
                             (limits->priority == FCSP_PRIORITY_LATENCY &&
                              limits->isolation_mode != FCSP_MODE_NONE);
    uint32_t centi = share_in_hardware ? share : FCSP_WHOLE_GPU_CENTI;
    if (d->mps_threads_centi && d->mps_threads_centi < centi)
        centi = d->mps_threads_centi;
    uint32_t pct = (centi + 99) / 100;
    double own = own_percentage();
    if (own > 0 && own <= pct) {
        shim_mps_thread_capped = share_in_hardware && own * 100 <= share;
        return; /* the tenant asked for less: keep it */
    }
    char text[16];
    snprintf(text, sizeof(text), "%u", pct);
    setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", text, 1);
    shim_mps_thread_capped = share_in_hardware && centi <= share;
}

static void set_pinned_limit(const struct fcsp_limits *limits)
{
    uint64_t quota = limits->device[0].mem_limit_bytes;
    if (quota < (1u << 20))
        return; /* no byte quota (or a percentage, resolved only after cuInit) */
    uint64_t own = own_pinned_limit();
    if (own && own <= quota)
        return;
    char text[48];
    snprintf(text, sizeof(text), "0=%lluM", (unsigned long long)(quota >> 20));
    setenv("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", text, 1);
}

void shim_mps_init(const struct fcsp_limits *limits, const char *slot_dir)
{
    if (limits->device_count != 1 || limits->device[0].backend != FCSP_BACKEND_MPS)
        return;
    char pipe[PATH_MAX], control[PATH_MAX];
    int n = snprintf(pipe, sizeof(pipe), "%s/%s", slot_dir, FCSP_MPS_DIR);
    int m = snprintf(control, sizeof(control), "%s/" MPS_CONTROL_SOCKET, pipe);
    if (n < 0 || (size_t)n >= sizeof(pipe) || m < 0 || (size_t)m >= sizeof(control))
        return;
    if (!is_socket(control)) {
        /* The daemon is down or restarting: the driver would silently run direct. */
        shim_log(LOG_WARN, "MPS backend, but %s is not a socket: this process is time-sliced",
                 control);
        return;
    }
    setenv("CUDA_MPS_PIPE_DIRECTORY", pipe, 1);
    set_thread_percentage(limits);
    set_pinned_limit(limits);
    shim_log(LOG_DEBUG, "MPS client of %s, active threads %s%%", pipe,
             getenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"));
}
