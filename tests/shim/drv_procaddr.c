/*
 * Load the driver the way the CUDA 12/13 runtime does: dlopen libcuda.so.1,
 * dlsym cuGetProcAddress_v2, ask it for cuGetProcAddress, then resolve every
 * entry point through that pointer.  Nothing is linked from CUDA.
 */
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>

#include "drv.h"

#define CUDA_VERSION_ASKED 13000

int drv_load(struct api *api, cuuint64_t flags)
{
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "dlopen libcuda.so.1: %s\n", dlerror());
        return -1;
    }
    __typeof__(&cuGetProcAddress_v2) bootstrap = (__typeof__(&cuGetProcAddress_v2))dlsym(lib, "cuGetProcAddress_v2");
    CUdriverProcAddressQueryResult status;
    if (!bootstrap || bootstrap("cuGetProcAddress", (void **)&api->get_proc, CUDA_VERSION_ASKED, 0,
                                &status) != CUDA_SUCCESS)
        return -1;
    static const struct {
        const char *name;
        size_t offset;
    } wanted[] = {
        {"cuInit", offsetof(struct api, init)},
        {"cuDeviceGet", offsetof(struct api, device_get)},
        {"cuDevicePrimaryCtxRetain", offsetof(struct api, primary_retain)},
        {"cuDevicePrimaryCtxRelease", offsetof(struct api, primary_release)},
        {"cuDevicePrimaryCtxReset", offsetof(struct api, primary_reset)},
        {"cuCtxCreate", offsetof(struct api, ctx_create)},
        {"cuCtxDestroy", offsetof(struct api, ctx_destroy)},
        {"cuCtxSetCurrent", offsetof(struct api, ctx_set_current)},
        {"cuMemAlloc", offsetof(struct api, mem_alloc)},
        {"cuMemAllocPitch", offsetof(struct api, mem_alloc_pitch)},
        {"cuMemAllocManaged", offsetof(struct api, mem_alloc_managed)},
        {"cuMemFree", offsetof(struct api, mem_free)},
        {"cuMemAllocAsync", offsetof(struct api, mem_alloc_async)},
        {"cuMemFreeAsync", offsetof(struct api, mem_free_async)},
        {"cuDeviceGetDefaultMemPool", offsetof(struct api, default_pool)},
        {"cuMemAllocFromPoolAsync", offsetof(struct api, mem_alloc_pool)},
        {"cuMemPoolTrimTo", offsetof(struct api, pool_trim)},
        {"cuMemCreate", offsetof(struct api, mem_create)},
        {"cuMemRelease", offsetof(struct api, mem_release)},
        {"cuArrayCreate", offsetof(struct api, array_create)},
        {"cuArray3DCreate", offsetof(struct api, array3d_create)},
        {"cuArrayDestroy", offsetof(struct api, array_destroy)},
        {"cuMipmappedArrayCreate", offsetof(struct api, mipmap_create)},
        {"cuMipmappedArrayDestroy", offsetof(struct api, mipmap_destroy)},
        {"cuIpcGetMemHandle", offsetof(struct api, ipc_get)},
        {"cuIpcOpenMemHandle", offsetof(struct api, ipc_open)},
        {"cuIpcCloseMemHandle", offsetof(struct api, ipc_close)},
        {"cuMemGetInfo", offsetof(struct api, mem_get_info)},
        {"cuDeviceTotalMem", offsetof(struct api, device_total_mem)},
        {"cuLaunchKernel", offsetof(struct api, launch_kernel)},
        {"cuLaunchKernelEx", offsetof(struct api, launch_kernel_ex)},
        {"cuLaunchCooperativeKernel", offsetof(struct api, launch_coop)},
        {"cuGraphLaunch", offsetof(struct api, graph_launch)},
        {"cuLaunchHostFunc", offsetof(struct api, launch_host)},
        {"cuModuleLoadData", offsetof(struct api, module_load)},
        {"cuModuleGetFunction", offsetof(struct api, get_function)},
        {"cuCtxSynchronize", offsetof(struct api, ctx_sync)},
    };
    for (size_t i = 0; i < sizeof(wanted) / sizeof(wanted[0]); i++) {
        void **slot = (void **)((char *)api + wanted[i].offset);
        if (api->get_proc(wanted[i].name, slot, CUDA_VERSION_ASKED, flags, &status) != CUDA_SUCCESS) {
            fprintf(stderr, "cuGetProcAddress(%s) failed\n", wanted[i].name);
            return -1;
        }
    }
    /* The 32-bit legacy entry points, as a pre-3.2 program would get them. */
    static const struct {
        const char *name;
        size_t offset;
    } legacy[] = {
        {"cuMemAlloc", offsetof(struct api, mem_alloc_v1)},
        {"cuMemFree", offsetof(struct api, mem_free_v1)},
        {"cuMemGetInfo", offsetof(struct api, mem_get_info_v1)},
    };
    for (size_t i = 0; i < sizeof(legacy) / sizeof(legacy[0]); i++) {
        void **slot = (void **)((char *)api + legacy[i].offset);
        if (api->get_proc(legacy[i].name, slot, 3000, 0, &status) != CUDA_SUCCESS)
            return -1;
    }
    return 0;
}
