/*
 * Driver-API test client: the entry points it uses, filled either through
 * cuGetProcAddress as the CUDA runtime does (drv_procaddr.c) or by direct
 * linking (drv_direct.c).
 */
#ifndef FCSP_TEST_DRV_H
#define FCSP_TEST_DRV_H

#include <cuda.h>

struct api {
    __typeof__(&cuInit) init;
    __typeof__(&cuDeviceGet) device_get;
    __typeof__(&cuDevicePrimaryCtxRetain) primary_retain;
    __typeof__(&cuDevicePrimaryCtxRelease_v2) primary_release;
    __typeof__(&cuDevicePrimaryCtxReset_v2) primary_reset;
    __typeof__(&cuCtxCreate_v4) ctx_create;
    __typeof__(&cuCtxDestroy_v2) ctx_destroy;
    __typeof__(&cuCtxSetCurrent) ctx_set_current;
    __typeof__(&cuMemAlloc_v2) mem_alloc;
    __typeof__(&cuMemAlloc) mem_alloc_v1;
    __typeof__(&cuMemFree) mem_free_v1;
    __typeof__(&cuMemAllocPitch_v2) mem_alloc_pitch;
    __typeof__(&cuMemAllocManaged) mem_alloc_managed;
    __typeof__(&cuMemFree_v2) mem_free;
    __typeof__(&cuMemAllocAsync) mem_alloc_async;
    __typeof__(&cuMemFreeAsync) mem_free_async;
    __typeof__(&cuDeviceGetDefaultMemPool) default_pool;
    __typeof__(&cuMemAllocFromPoolAsync) mem_alloc_pool;
    __typeof__(&cuMemPoolTrimTo) pool_trim;
    __typeof__(&cuMemCreate) mem_create;
    __typeof__(&cuMemRelease) mem_release;
    __typeof__(&cuArrayCreate_v2) array_create;
    __typeof__(&cuArray3DCreate_v2) array3d_create;
    __typeof__(&cuArrayDestroy) array_destroy;
    __typeof__(&cuMipmappedArrayCreate) mipmap_create;
    __typeof__(&cuMipmappedArrayDestroy) mipmap_destroy;
    __typeof__(&cuIpcGetMemHandle) ipc_get;
    __typeof__(&cuIpcOpenMemHandle_v2) ipc_open;
    __typeof__(&cuIpcCloseMemHandle) ipc_close;
    __typeof__(&cuMemGetInfo_v2) mem_get_info;
    __typeof__(&cuMemGetInfo) mem_get_info_v1;
    __typeof__(&cuDeviceTotalMem_v2) device_total_mem;
    __typeof__(&cuLaunchKernel) launch_kernel; /* the _ptsz variant under --ptsz */
    __typeof__(&cuLaunchKernelEx) launch_kernel_ex;
    __typeof__(&cuLaunchCooperativeKernel) launch_coop;
    __typeof__(&cuGraphLaunch) graph_launch;
    __typeof__(&cuLaunchHostFunc) launch_host;
    __typeof__(&cuGetProcAddress_v2) get_proc; /* for the resolve command */
    __typeof__(&cuModuleLoadData) module_load;
    __typeof__(&cuModuleGetFunction) get_function;
    __typeof__(&cuCtxSynchronize) ctx_sync;
};

/* Fill api; flags are the cuGetProcAddress flags (per-thread default stream or not). */
int drv_load(struct api *api, cuuint64_t flags);

#endif
