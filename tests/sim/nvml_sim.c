/*
 * A simulated NVML (libnvidia-ml.so.1): the devices of sim_state.c, with the
 * memory every process holds on them, as nvidia-smi and pynvml would read it.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nvml_api.h"
#include "sim_state.h"

#define SIM_EXPORT __attribute__((visibility("default")))
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7

struct nvmlDevice_st {
    unsigned int index;
};

static struct nvmlDevice_st devices[SIM_MAX_DEVICES];
static int initialized;

SIM_EXPORT nvmlReturn_t nvmlInit_v2(void)
{
    for (unsigned i = 0; i < SIM_MAX_DEVICES; i++)
        devices[i].index = i;
    initialized = 1;
    return NVML_SUCCESS;
}

SIM_EXPORT nvmlReturn_t nvmlInit(void)
{
    return nvmlInit_v2();
}

SIM_EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    return nvmlInit_v2();
}

SIM_EXPORT nvmlReturn_t nvmlShutdown(void)
{
    initialized = 0;
    return NVML_SUCCESS;
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    *count = (unsigned int)sim_config()->devices;
    return NVML_SUCCESS;
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    if (index >= (unsigned int)sim_config()->devices)
        return NVML_ERROR_INVALID_ARGUMENT;
    *device = &devices[index];
    return NVML_SUCCESS;
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    if (!device || !index)
        return NVML_ERROR_INVALID_ARGUMENT;
    *index = device->index;
    return NVML_SUCCESS;
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    if (!device || !uuid)
        return NVML_ERROR_INVALID_ARGUMENT;
    const char *text = sim_config()->uuid_text[device->index];
    if (strlen(text) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(uuid, text);
    return NVML_SUCCESS;
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    if (!device || !memory)
        return NVML_ERROR_INVALID_ARGUMENT;
    uint64_t total = sim_config()->mem_bytes, used = sim_used((int)device->index);
    memory->total = total;
    memory->used = used < total ? used : total;
    memory->free = total - memory->used;
    return NVML_SUCCESS;
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    if (!device || !memory)
        return NVML_ERROR_INVALID_ARGUMENT;
    /* A real driver reserves a little for itself; show some so that the shim must hide it. */
    uint64_t total = sim_config()->mem_bytes, used = sim_used((int)device->index);
    uint64_t reserved = total / 100;
    memory->total = total;
    memory->reserved = reserved;
    memory->used = used + reserved < total ? used : total - reserved;
    memory->free = total - reserved - memory->used;
    return NVML_SUCCESS;
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor)
{
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    if (!device || !minor)
        return NVML_ERROR_INVALID_ARGUMENT;
    *minor = device->index; /* the simulator's /dev/nvidia<N> would be its index */
    return NVML_SUCCESS;
}

/* nvmlProcessInfo_v2_t / _v3_t as the driver lays them out (pynvml reads this one). */
struct sim_process_info {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
};

static nvmlReturn_t running_processes(nvmlDevice_t device, unsigned int *count,
                                      struct sim_process_info *infos, int mps_only)
{
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    if (!device || !count)
        return NVML_ERROR_INVALID_ARGUMENT;
    uint32_t pids[256];
    uint64_t used[256];
    int n = sim_processes((int)device->index, pids, used, 256, mps_only);
    if (n > 256)
        n = 256;
    if (!infos || *count < (unsigned)n) {
        *count = (unsigned)n;
        return n ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
    }
    for (int i = 0; i < n; i++)
        infos[i] = (struct sim_process_info){pids[i], used[i], 0xFFFFFFFFu, 0xFFFFFFFFu};
    *count = (unsigned)n;
    return NVML_SUCCESS;
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device,
                                                                unsigned int *count,
                                                                struct sim_process_info *infos)
{
    return running_processes(device, count, infos, 0);
}

/* Processes that are clients of an MPS server (they are in the list above too). */
SIM_EXPORT nvmlReturn_t nvmlDeviceGetMPSComputeRunningProcesses_v3(nvmlDevice_t device,
                                                                   unsigned int *count,
                                                                   struct sim_process_info *infos)
{
    return running_processes(device, count, infos, 1);
}

/*
 * SM clock, utilisation and power: every device reads "<MHz> <percent> [<W> <limit W>]"
 * from the file named by FCSP_SIM_CLOCK_FILE, on each call, so a test can change them
 * while the observer runs.  Without the file: 1500 MHz, idle; without the power fields
 * the GPU reports no power (NVML_ERROR_NOT_SUPPORTED).
 */
struct sim_clock {
    unsigned int mhz, util, watts, limit_watts; /* watts 0: not reported */
};

static struct sim_clock read_clock(void)
{
    struct sim_clock c = {1500, 0, 0, 0};
    const char *path = getenv("FCSP_SIM_CLOCK_FILE");
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f)
        return c;
    unsigned int v[4];
    int n = fscanf(f, "%u %u %u %u", &v[0], &v[1], &v[2], &v[3]);
    if (n >= 2) {
        c.mhz = v[0];
        c.util = v[1];
    }
    if (n == 4) {
        c.watts = v[2];
        c.limit_watts = v[3];
    }
    fclose(f);
    return c;
}

/* Power in mW, as NVML reports it. */
static nvmlReturn_t power(nvmlDevice_t device, unsigned int *mw, int limit)
{
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    if (!device || !mw)
        return NVML_ERROR_INVALID_ARGUMENT;
    struct sim_clock c = read_clock();
    if (!c.watts)
        return NVML_ERROR_NOT_SUPPORTED;
    *mw = (limit ? c.limit_watts : c.watts) * 1000;
    return NVML_SUCCESS;
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *mw)
{
    return power(device, mw, 0);
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *mw)
{
    return power(device, mw, 1);
}

SIM_EXPORT nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, unsigned int type,
                                               unsigned int *clock)
{
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    if (!device || !clock || type != 1 /* NVML_CLOCK_SM */)
        return NVML_ERROR_INVALID_ARGUMENT;
    *clock = read_clock().mhz;
    return NVML_SUCCESS;
}

struct sim_utilization {
    unsigned int gpu;
    unsigned int memory;
};

SIM_EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device,
                                                      struct sim_utilization *rates)
{
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    if (!device || !rates)
        return NVML_ERROR_INVALID_ARGUMENT;
    rates->gpu = read_clock().util;
    rates->memory = 0;
    return NVML_SUCCESS;
}

/* nvmlProcessUtilizationSample_t as the driver lays it out. */
struct sim_process_sample {
    unsigned int pid;
    unsigned long long timeStamp; /* us: the sample's end, for the caller's next lastSeen */
    unsigned int smUtil, memUtil, encUtil, decUtil;
};

/* Whether a line of the file at path is text (a cgroup file's). */
static int reads(const char *path, const char *text)
{
    char line[64] = "";
    FILE *f = fopen(path, "re");
    int match = 0;
    while (f && !match && fgets(line, sizeof(line), f))
        match = strcmp(line, text) == 0;
    if (f)
        fclose(f);
    return match;
}

/* Whether pid's cgroup is frozen now: the v2 hierarchy's or the v1 freezer's. */
static int frozen(int pid)
{
    char path[4200], line[4096];
    snprintf(path, sizeof(path), "/proc/%d/cgroup", pid);
    FILE *f = fopen(path, "re");
    int is_frozen = 0;
    while (f && !is_frozen && fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\n")] = '\0';
        char *group = strchr(line, ':') ? strchr(strchr(line, ':') + 1, ':') : NULL;
        if (!group)
            continue;
        if (strncmp(line, "0::", 3) == 0) {
            snprintf(path, sizeof(path), "/sys/fs/cgroup%s/cgroup.events", group + 1);
            is_frozen = reads(path, "frozen 1\n");
            snprintf(path, sizeof(path), "/sys/fs/cgroup/unified%s/cgroup.events", group + 1);
            is_frozen |= reads(path, "frozen 1\n");
        } else if (strstr(line, ":freezer:") == strchr(line, ':')) {
            snprintf(path, sizeof(path), "/sys/fs/cgroup/freezer%s/freezer.state", group + 1);
            is_frozen = reads(path, "FROZEN\n");
        }
    }
    if (f)
        fclose(f);
    return is_frozen;
}

/*
 * As the driver answers (H100, driver 580): it samples every SIM_SAMPLE_NS, and tells of
 * its latest sample if that ends after lastSeenTimeStamp (us on the sim's clock), one
 * entry per process that ran kernels on the device in it: the percentage of the sample's
 * time the device ran its kernels.  A process frozen when the sample ends (here: when
 * asked) has no entry, unless FCSP_SIM_NVML_SEES_FROZEN is set (a test's own view of what
 * ran).  With samples NULL, or too few, the count needed and INSUFFICIENT_SIZE.
 */
#define SIM_SAMPLE_NS 200000000ull
SIM_EXPORT nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device,
                                                        struct sim_process_sample *samples,
                                                        unsigned int *count,
                                                        unsigned long long lastSeenTimeStamp)
{
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    if (!device || !count)
        return NVML_ERROR_INVALID_ARGUMENT;
    uint64_t end = sim_now_ns() / SIM_SAMPLE_NS * SIM_SAMPLE_NS;
    uint32_t pids[256], pct[256];
    int n = 0;
    if (end / 1000u > lastSeenTimeStamp)
        n = sim_process_busy((int)device->index, end - SIM_SAMPLE_NS, end, pids, pct, 256);
    if (n > 256)
        n = 256;
    int kept = 0, sees_frozen = getenv("FCSP_SIM_NVML_SEES_FROZEN") != NULL;
    for (int i = 0; i < n; i++) {
        if (sees_frozen || !frozen((int)pids[i])) {
            pids[kept] = pids[i];
            pct[kept++] = pct[i];
        }
    }
    n = kept;
    if (!samples || *count < (unsigned)n) {
        *count = (unsigned)n;
        return n ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_ERROR_NOT_FOUND;
    }
    for (int i = 0; i < n; i++)
        samples[i] = (struct sim_process_sample){pids[i], end / 1000u, pct[i], 0, 0, 0};
    *count = (unsigned)n;
    return NVML_SUCCESS;
}

/* nvmlSample_t: a sample's end (us) and its value (an unsigned int for utilisation). */
struct sim_sample {
    unsigned long long timeStamp;
    union {
        double dVal;
        unsigned int uiVal;
        unsigned long long ullVal;
    } sampleValue;
};

#define NVML_GPU_UTILIZATION_SAMPLES 1
#define NVML_VALUE_TYPE_UNSIGNED_INT 1
#define SIM_SAMPLES_KEPT 20

/*
 * The whole device's utilisation samples, as the driver keeps them: one every
 * SIM_SAMPLE_NS, the last SIM_SAMPLES_KEPT, each the percentage of its time in which any
 * process's kernels ran, those that end after lastSeenTimeStamp, oldest first.  With
 * samples NULL, the count; with too few, the oldest that fit.
 */
SIM_EXPORT nvmlReturn_t nvmlDeviceGetSamples(nvmlDevice_t device, unsigned int type,
                                             unsigned long long lastSeenTimeStamp,
                                             unsigned int *valueType, unsigned int *count,
                                             struct sim_sample *samples)
{
    if (!initialized)
        return NVML_ERROR_UNINITIALIZED;
    if (!device || !count || !valueType)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (type != NVML_GPU_UTILIZATION_SAMPLES)
        return NVML_ERROR_NOT_SUPPORTED;
    uint64_t newest = sim_now_ns() / SIM_SAMPLE_NS * SIM_SAMPLE_NS;
    unsigned int n = 0;
    for (uint64_t k = SIM_SAMPLES_KEPT; k-- > 0;) {
        if (newest <= k * SIM_SAMPLE_NS)
            continue; /* before the clock's start */
        uint64_t end = newest - k * SIM_SAMPLE_NS;
        if (end / 1000u <= lastSeenTimeStamp)
            continue;
        if (samples && n < *count) {
            samples[n].timeStamp = end / 1000u;
            samples[n].sampleValue.ullVal = 0;
            samples[n].sampleValue.uiVal =
                (unsigned int)sim_device_busy((int)device->index, end - SIM_SAMPLE_NS, end);
        }
        n++;
    }
    *valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
    if (!n)
        return NVML_ERROR_NOT_FOUND;
    if (samples && n > *count)
        n = *count;
    *count = n;
    return NVML_SUCCESS;
}
