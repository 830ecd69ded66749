/*
 * Call the driver's exported symbols directly, like a program linked with
 * -lcuda: the dynamic linker binds them to libvgpu.so's exports first.
 */
#include "drv.h"

int drv_load(struct api *api, cuuint64_t flags)
{
    int ptsz = (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) != 0;
    api->init = cuInit;
    api->device_get = cuDeviceGet;
    api->primary_retain = cuDevicePrimaryCtxRetain;
    api->primary_release = cuDevicePrimaryCtxRelease_v2;
    api->primary_reset = cuDevicePrimaryCtxReset_v2;
    api->ctx_create = cuCtxCreate_v4;
    api->ctx_destroy = cuCtxDestroy_v2;
    api->ctx_set_current = cuCtxSetCurrent;
    api->mem_alloc = cuMemAlloc_v2;
    api->mem_alloc_v1 = cuMemAlloc;
    api->mem_free_v1 = cuMemFree;
    api->mem_alloc_pitch = cuMemAllocPitch_v2;
    api->mem_alloc_managed = cuMemAllocManaged;
    api->mem_free = cuMemFree_v2;
    api->mem_alloc_async = ptsz ? cuMemAllocAsync_ptsz : cuMemAllocAsync;
    api->mem_free_async = ptsz ? cuMemFreeAsync_ptsz : cuMemFreeAsync;
    api->default_pool = cuDeviceGetDefaultMemPool;
    api->mem_alloc_pool = ptsz ? cuMemAllocFromPoolAsync_ptsz : cuMemAllocFromPoolAsync;
    api->pool_trim = cuMemPoolTrimTo;
    api->mem_create = cuMemCreate;
    api->mem_release = cuMemRelease;
    api->array_create = cuArrayCreate_v2;
    api->array3d_create = cuArray3DCreate_v2;
    api->array_destroy = cuArrayDestroy;
    api->mipmap_create = cuMipmappedArrayCreate;
    api->mipmap_destroy = cuMipmappedArrayDestroy;
    api->ipc_get = cuIpcGetMemHandle;
    api->ipc_open = cuIpcOpenMemHandle_v2;
    api->ipc_close = cuIpcCloseMemHandle;
    api->mem_get_info = cuMemGetInfo_v2;
    api->mem_get_info_v1 = cuMemGetInfo;
    api->device_total_mem = cuDeviceTotalMem_v2;
    api->launch_kernel = ptsz ? cuLaunchKernel_ptsz : cuLaunchKernel;
    api->launch_kernel_ex = ptsz ? cuLaunchKernelEx_ptsz : cuLaunchKernelEx;
    api->launch_coop = ptsz ? cuLaunchCooperativeKernel_ptsz : cuLaunchCooperativeKernel;
    api->graph_launch = ptsz ? cuGraphLaunch_ptsz : cuGraphLaunch;
    api->launch_host = ptsz ? cuLaunchHostFunc_ptsz : cuLaunchHostFunc;
    api->get_proc = cuGetProcAddress_v2;
    api->module_load = cuModuleLoadData;
    api->get_function = cuModuleGetFunction;
    api->ctx_sync = cuCtxSynchronize;
    return 0;
}
