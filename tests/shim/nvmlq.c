/* Ask NVML for every device's memory, as pynvml or nvidia-smi would (dlopen + dlsym). */
#include <dlfcn.h>
#include <stdio.h>

#include "nvml_api.h"

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
    unsigned int n = 0;
    if (!init || !count || !handle || !info || !info2 || init() || count(&n))
        return 4;
    for (unsigned int i = 0; i < n; i++) {
        nvmlDevice_t dev;
        nvmlMemory_t m;
        nvmlMemory_v2_t m2 = {.version = (unsigned int)sizeof(nvmlMemory_v2_t) | (2u << 24)};
        if (handle(i, &dev) || info(dev, &m) || info2(dev, &m2))
            return 5;
        printf("nvml %u %llu %llu %llu\n", i, m.total, m.free, m.used);
        printf("nvml2 %u %llu %llu %llu %llu\n", i, m2.total, m2.free, m2.used, m2.reserved);
    }
    return 0;
}
