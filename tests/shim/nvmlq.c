/*
 * Ask NVML for every device's memory and the processes using it, as pynvml or nvidia-smi
 * would (dlopen + dlsym).  Prints "nvml I TOTAL FREE USED", "nvml2 I TOTAL FREE USED
 * RESERVED" and "proc I PID USED" per process (the host's per-process cross-check).
 */
#include <dlfcn.h>
#include <stdio.h>

#include "nvml_api.h"

/* nvmlProcessInfo_t (v2/v3) as the driver lays it out; nvml.h is not among our headers. */
struct process_info {
    unsigned int pid;
    unsigned long long used_gpu_memory;
    unsigned int gpu_instance_id;
    unsigned int compute_instance_id;
};

int main(void)
{
    void *lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        printf("load failed\n");
        return 3;
    }
    nvmlReturn_t (*init)(void) = (nvmlReturn_t(*)(void))dlsym(lib, "nvmlInit_v2");
    nvmlReturn_t (*count)(unsigned int *) =
        (nvmlReturn_t(*)(unsigned int *))dlsym(lib, "nvmlDeviceGetCount_v2");
    nvmlReturn_t (*handle)(unsigned int, nvmlDevice_t *) =
        (nvmlReturn_t(*)(unsigned int, nvmlDevice_t *))dlsym(lib, "nvmlDeviceGetHandleByIndex_v2");
    __typeof__(&nvmlDeviceGetMemoryInfo) info =
        (__typeof__(&nvmlDeviceGetMemoryInfo))dlsym(lib, "nvmlDeviceGetMemoryInfo");
    __typeof__(&nvmlDeviceGetMemoryInfo_v2) info2 =
        (__typeof__(&nvmlDeviceGetMemoryInfo_v2))dlsym(lib, "nvmlDeviceGetMemoryInfo_v2");
    nvmlReturn_t (*processes)(nvmlDevice_t, unsigned int *, struct process_info *) =
        (nvmlReturn_t(*)(nvmlDevice_t, unsigned int *, struct process_info *))dlsym(
            lib, "nvmlDeviceGetComputeRunningProcesses_v3");
    unsigned int n = 0;
    if (!init || !count || !handle || !info || !info2 || !processes || init() || count(&n))
        return 4;
    for (unsigned int i = 0; i < n; i++) {
        nvmlDevice_t dev;
        nvmlMemory_t m;
        nvmlMemory_v2_t m2 = {.version = (unsigned int)sizeof(nvmlMemory_v2_t) | (2u << 24)};
        if (handle(i, &dev) || info(dev, &m) || info2(dev, &m2))
            return 5;
        printf("nvml %u %llu %llu %llu\n", i, m.total, m.free, m.used);
        printf("nvml2 %u %llu %llu %llu %llu\n", i, m2.total, m2.free, m2.used, m2.reserved);
        struct process_info procs[64];
        unsigned int nprocs = sizeof(procs) / sizeof(procs[0]);
        if (processes(dev, &nprocs, procs))
            return 6;
        for (unsigned int p = 0; p < nprocs; p++)
            printf("proc %u %u %llu\n", i, procs[p].pid, procs[p].used_gpu_memory);
    }
    return 0;
}
