/*
 * NVML's view of device memory, virtualised like cuMemGetInfo: nvidia-smi
 * and pynvml inside the container show the quota as the total and the
 * tenant's charge as used.  The charge is read from the slot's usage file, so
 * a process that never touched CUDA (nvidia-smi) sees all of its tenant's
 * processes.  NVML device i is slot entry i unless the entry names a UUID.
 */
#include <string.h>

#include "shim.h"

/* Usage entry and quota for an NVML device; false: leave the answer alone. */
static bool nvml_view(nvmlDevice_t device, uint64_t real_total, int *entry,
                      struct shim_limit *limit)
{
    if (!shim.active)
        return false;
    unsigned int index = 0;
    char uuid[NVML_DEVICE_UUID_V2_BUFFER_SIZE] = "";
    __typeof__(&nvmlDeviceGetIndex) get_index = REAL(nvmlDeviceGetIndex);
    __typeof__(&nvmlDeviceGetUUID) get_uuid = REAL(nvmlDeviceGetUUID);
    if (!get_index || get_index(device, &index) != NVML_SUCCESS)
        return false;
    if (get_uuid && get_uuid(device, uuid, sizeof(uuid)) != NVML_SUCCESS)
        uuid[0] = '\0';
    *entry = shim_slot_entry_for(uuid, (int)index);
    if (*entry < 0)
        return false;
    *limit = shim_limit_resolve(*entry, (int)index, real_total, NULL);
    if (!limit->bytes)
        return false;
    shim_reap_dead();
    return true;
}

static uint64_t charged(int entry, uint64_t total)
{
    uint64_t used = atomic_load_explicit(&shim.usage->device[entry].mem_used_bytes,
                                         memory_order_relaxed);
    return used < total ? used : total;
}

/* Put the tenant's view in place of the device's; false for a device not accounted. */
static bool virtualise(nvmlDevice_t device, unsigned long long *total, unsigned long long *free,
                       unsigned long long *used)
{
    int entry;
    struct shim_limit limit;
    if (!nvml_view(device, *total, &entry, &limit))
        return false;
    uint64_t view_free, view_total;
    shim_memory_view(entry, limit, *free, *total, &view_free, &view_total);
    *total = view_total;
    *free = view_free;
    *used = charged(entry, view_total);
    return true;
}

SHIM_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    __typeof__(&nvmlDeviceGetMemoryInfo) real = REAL(nvmlDeviceGetMemoryInfo);
    if (!real)
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    nvmlReturn_t rc = real(device, memory);
    if (rc == NVML_SUCCESS && memory)
        virtualise(device, &memory->total, &memory->free, &memory->used);
    return rc;
}

SHIM_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    __typeof__(&nvmlDeviceGetMemoryInfo_v2) real = REAL(nvmlDeviceGetMemoryInfo_v2);
    if (!real)
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    nvmlReturn_t rc = real(device, memory);
    /* The driver's reservation is not the tenant's to see; keep used + free <= total. */
    if (rc == NVML_SUCCESS && memory &&
        virtualise(device, &memory->total, &memory->free, &memory->used))
        memory->reserved = 0;
    return rc;
}
