/*
 * Launches.  Every launch family is hooked (PyTorch and cuBLAS launch through
 * cuLaunchKernelEx, graphs through cuGraphLaunch), each variant separately so
 * that a _ptsz launch stays on the per-thread default stream.  Today a hook
 * counts the launch in the tenant's usage; the compute limiter (token bucket)
 * will sit at the same spot.
 *
 * Hot path: one relaxed load (which usage entry, if any) and one relaxed
 * atomic add; no lock, no getenv, no logging.
 */
#include "shim.h"

/*
 * >= 0: the usage entry every launch of this process counts against (one
 * device); LAUNCH_SLOW: look the device up (several devices, or not yet
 * known); LAUNCH_OFF: inactive, count nothing.
 */
#define LAUNCH_SLOW (-1)
#define LAUNCH_OFF (-2)
static _Atomic int launch_entry = LAUNCH_SLOW;

void shim_launch_init(void)
{
    atomic_store_explicit(&launch_entry, shim.active ? LAUNCH_SLOW : LAUNCH_OFF,
                          memory_order_relaxed);
}

static void count_launch_slow(void)
{
    int ordinal;
    int entry = shim_current_device(&ordinal);
    if (entry < 0)
        return;
    if (shim_ndevices == 1)
        atomic_store_explicit(&launch_entry, entry, memory_order_relaxed);
    atomic_fetch_add_explicit(&shim.usage->device[entry].launches, 1, memory_order_relaxed);
}

static inline void count_launch(void)
{
    int entry = atomic_load_explicit(&launch_entry, memory_order_relaxed);
    if (likely(entry >= 0))
        atomic_fetch_add_explicit(&shim.usage->device[entry].launches, 1, memory_order_relaxed);
    else if (entry == LAUNCH_SLOW)
        count_launch_slow();
}

SHIM_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                    unsigned int gridDimZ, unsigned int blockDimX,
                                    unsigned int blockDimY, unsigned int blockDimZ,
                                    unsigned int sharedMemBytes, CUstream hStream,
                                    void **kernelParams, void **extra)
{
    count_launch();
    return REAL(cuLaunchKernel)(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ,
                                sharedMemBytes, hStream, kernelParams, extra);
}

SHIM_EXPORT CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gridDimX,
                                         unsigned int gridDimY, unsigned int gridDimZ,
                                         unsigned int blockDimX, unsigned int blockDimY,
                                         unsigned int blockDimZ, unsigned int sharedMemBytes,
                                         CUstream hStream, void **kernelParams, void **extra)
{
    count_launch();
    return REAL(cuLaunchKernel_ptsz)(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY,
                                     blockDimZ, sharedMemBytes, hStream, kernelParams, extra);
}

SHIM_EXPORT CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f,
                                      void **kernelParams, void **extra)
{
    count_launch();
    return REAL(cuLaunchKernelEx)(config, f, kernelParams, extra);
}

SHIM_EXPORT CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f,
                                           void **kernelParams, void **extra)
{
    count_launch();
    return REAL(cuLaunchKernelEx_ptsz)(config, f, kernelParams, extra);
}

SHIM_EXPORT CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gridDimX,
                                               unsigned int gridDimY, unsigned int gridDimZ,
                                               unsigned int blockDimX, unsigned int blockDimY,
                                               unsigned int blockDimZ,
                                               unsigned int sharedMemBytes, CUstream hStream,
                                               void **kernelParams)
{
    count_launch();
    return REAL(cuLaunchCooperativeKernel)(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY,
                                           blockDimZ, sharedMemBytes, hStream, kernelParams);
}

SHIM_EXPORT CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gridDimX,
                                                    unsigned int gridDimY, unsigned int gridDimZ,
                                                    unsigned int blockDimX, unsigned int blockDimY,
                                                    unsigned int blockDimZ,
                                                    unsigned int sharedMemBytes, CUstream hStream,
                                                    void **kernelParams)
{
    count_launch();
    return REAL(cuLaunchCooperativeKernel_ptsz)(f, gridDimX, gridDimY, gridDimZ, blockDimX,
                                                blockDimY, blockDimZ, sharedMemBytes, hStream,
                                                kernelParams);
}

SHIM_EXPORT CUresult cuLaunchCooperativeKernelMultiDevice(CUDA_LAUNCH_PARAMS *launchParamsList,
                                                          unsigned int numDevices,
                                                          unsigned int flags)
{
    for (unsigned int i = 0; i < numDevices; i++)
        count_launch();
    return REAL(cuLaunchCooperativeKernelMultiDevice)(launchParamsList, numDevices, flags);
}

SHIM_EXPORT CUresult cuLaunch(CUfunction f)
{
    count_launch();
    return REAL(cuLaunch)(f);
}

SHIM_EXPORT CUresult cuLaunchGrid(CUfunction f, int grid_width, int grid_height)
{
    count_launch();
    return REAL(cuLaunchGrid)(f, grid_width, grid_height);
}

SHIM_EXPORT CUresult cuLaunchGridAsync(CUfunction f, int grid_width, int grid_height,
                                       CUstream hStream)
{
    count_launch();
    return REAL(cuLaunchGridAsync)(f, grid_width, grid_height, hStream);
}

SHIM_EXPORT CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream)
{
    count_launch();
    return REAL(cuGraphLaunch)(hGraphExec, hStream);
}

SHIM_EXPORT CUresult cuGraphLaunch_ptsz(CUgraphExec hGraphExec, CUstream hStream)
{
    count_launch();
    return REAL(cuGraphLaunch_ptsz)(hGraphExec, hStream);
}

/* Host functions use no SMs: hooked so that the limiter can order them, not counted. */
SHIM_EXPORT CUresult cuLaunchHostFunc(CUstream hStream, CUhostFn fn, void *userData)
{
    return REAL(cuLaunchHostFunc)(hStream, fn, userData);
}

SHIM_EXPORT CUresult cuLaunchHostFunc_ptsz(CUstream hStream, CUhostFn fn, void *userData)
{
    return REAL(cuLaunchHostFunc_ptsz)(hStream, fn, userData);
}
