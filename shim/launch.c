/*
 * Launches.  Every launch family is hooked (PyTorch and cuBLAS launch through
 * cuLaunchKernelEx, graphs through cuGraphLaunch), each variant separately so
 * that a _ptsz launch stays on the per-thread default stream.  Each hook
 * brackets the real call with compute_begin/compute_end (compute.h): count,
 * charge the tenant's share, wait if it is spent, and now and then measure
 * the launch with a pair of events.  In spill mode the kernel launches first let uvm.c
 * bring the spilled ranges they use to the device (begin_kernel).
 */
#include "compute.h"
#include "uvm.h"

/* compute_begin for a kernel launch of f with params (NULL: the `extra` form): in spill
 * mode, which the launch word says, uvm.c moves the data the kernel uses first. */
static inline void begin_kernel(struct compute_launch *l, uint64_t key, CUstream stream,
                                bool ptsz, CUfunction f, void **params)
{
    int entry = atomic_load_explicit(&shim_launch_entry, memory_order_relaxed);
    if (unlikely(entry == LAUNCH_UVM))
        shim_uvm_before_launch(f, params, stream, ptsz);
    compute_begin_entry(l, entry, key, stream, ptsz);
}

SHIM_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                    unsigned int gridDimZ, unsigned int blockDimX,
                                    unsigned int blockDimY, unsigned int blockDimZ,
                                    unsigned int sharedMemBytes, CUstream hStream,
                                    void **kernelParams, void **extra)
{
    struct compute_launch l;
    begin_kernel(&l, compute_kernel_key(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ),
                  hStream, false, f, kernelParams);
    CUresult rc = REAL(cuLaunchKernel)(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY,
                                       blockDimZ, sharedMemBytes, hStream, kernelParams, extra);
    compute_end(&l, rc);
    return rc;
}

SHIM_EXPORT CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gridDimX,
                                         unsigned int gridDimY, unsigned int gridDimZ,
                                         unsigned int blockDimX, unsigned int blockDimY,
                                         unsigned int blockDimZ, unsigned int sharedMemBytes,
                                         CUstream hStream, void **kernelParams, void **extra)
{
    struct compute_launch l;
    begin_kernel(&l, compute_kernel_key(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ),
                  hStream, true, f, kernelParams);
    CUresult rc = REAL(cuLaunchKernel_ptsz)(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY,
                                            blockDimZ, sharedMemBytes, hStream, kernelParams,
                                            extra);
    compute_end(&l, rc);
    return rc;
}

static uint64_t config_key(const CUlaunchConfig *c, CUfunction f)
{
    if (!c)
        return compute_kernel_key(f, 0, 0, 0, 0, 0, 0);
    return compute_kernel_key(f, c->gridDimX, c->gridDimY, c->gridDimZ, c->blockDimX, c->blockDimY,
                      c->blockDimZ);
}

SHIM_EXPORT CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f,
                                      void **kernelParams, void **extra)
{
    struct compute_launch l;
    begin_kernel(&l, config_key(config, f), config ? config->hStream : NULL, false, f, kernelParams);
    CUresult rc = REAL(cuLaunchKernelEx)(config, f, kernelParams, extra);
    compute_end(&l, rc);
    return rc;
}

SHIM_EXPORT CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f,
                                           void **kernelParams, void **extra)
{
    struct compute_launch l;
    begin_kernel(&l, config_key(config, f), config ? config->hStream : NULL, true, f, kernelParams);
    CUresult rc = REAL(cuLaunchKernelEx_ptsz)(config, f, kernelParams, extra);
    compute_end(&l, rc);
    return rc;
}

SHIM_EXPORT CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gridDimX,
                                               unsigned int gridDimY, unsigned int gridDimZ,
                                               unsigned int blockDimX, unsigned int blockDimY,
                                               unsigned int blockDimZ,
                                               unsigned int sharedMemBytes, CUstream hStream,
                                               void **kernelParams)
{
    struct compute_launch l;
    begin_kernel(&l, compute_kernel_key(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ),
                  hStream, false, f, kernelParams);
    CUresult rc = REAL(cuLaunchCooperativeKernel)(f, gridDimX, gridDimY, gridDimZ, blockDimX,
                                                  blockDimY, blockDimZ, sharedMemBytes, hStream,
                                                  kernelParams);
    compute_end(&l, rc);
    return rc;
}

SHIM_EXPORT CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gridDimX,
                                                    unsigned int gridDimY, unsigned int gridDimZ,
                                                    unsigned int blockDimX, unsigned int blockDimY,
                                                    unsigned int blockDimZ,
                                                    unsigned int sharedMemBytes, CUstream hStream,
                                                    void **kernelParams)
{
    struct compute_launch l;
    begin_kernel(&l, compute_kernel_key(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ),
                  hStream, true, f, kernelParams);
    CUresult rc = REAL(cuLaunchCooperativeKernel_ptsz)(f, gridDimX, gridDimY, gridDimZ, blockDimX,
                                                       blockDimY, blockDimZ, sharedMemBytes,
                                                       hStream, kernelParams);
    compute_end(&l, rc);
    return rc;
}

/*
 * Deprecated, one kernel per device: each is charged (to the current
 * device's entry, which is all the launch path knows) and none is measured.
 */
SHIM_EXPORT CUresult cuLaunchCooperativeKernelMultiDevice(CUDA_LAUNCH_PARAMS *launchParamsList,
                                                          unsigned int numDevices,
                                                          unsigned int flags)
{
    for (unsigned int i = 0; i < numDevices; i++) {
        const CUDA_LAUNCH_PARAMS *p = launchParamsList ? &launchParamsList[i] : NULL;
        struct compute_launch l;
        compute_begin(&l, p ? compute_kernel_key(p->function, p->gridDimX, p->gridDimY, p->gridDimZ,
                                         p->blockDimX, p->blockDimY, p->blockDimZ)
                            : compute_kernel_key(NULL, i, 0, 0, 0, 0, 0),
                      p ? p->hStream : NULL, false);
        compute_end(&l, CUDA_ERROR_NOT_SUPPORTED); /* drops any sample */
    }
    return REAL(cuLaunchCooperativeKernelMultiDevice)(launchParamsList, numDevices, flags);
}

SHIM_EXPORT CUresult cuLaunch(CUfunction f)
{
    struct compute_launch l;
    compute_begin(&l, compute_kernel_key(f, 1, 1, 1, 0, 0, 0), NULL, false);
    CUresult rc = REAL(cuLaunch)(f);
    compute_end(&l, rc);
    return rc;
}

SHIM_EXPORT CUresult cuLaunchGrid(CUfunction f, int grid_width, int grid_height)
{
    struct compute_launch l;
    compute_begin(&l, compute_kernel_key(f, (unsigned)grid_width, (unsigned)grid_height, 1, 0, 0, 0), NULL,
                  false);
    CUresult rc = REAL(cuLaunchGrid)(f, grid_width, grid_height);
    compute_end(&l, rc);
    return rc;
}

SHIM_EXPORT CUresult cuLaunchGridAsync(CUfunction f, int grid_width, int grid_height,
                                       CUstream hStream)
{
    struct compute_launch l;
    compute_begin(&l, compute_kernel_key(f, (unsigned)grid_width, (unsigned)grid_height, 1, 0, 0, 0),
                  hStream, false);
    CUresult rc = REAL(cuLaunchGridAsync)(f, grid_width, grid_height, hStream);
    compute_end(&l, rc);
    return rc;
}

/* A graph replay is charged and measured as one unit: graphs must not escape the share. */
SHIM_EXPORT CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream)
{
    struct compute_launch l;
    compute_begin(&l, compute_graph_key(hGraphExec), hStream, false);
    CUresult rc = REAL(cuGraphLaunch)(hGraphExec, hStream);
    compute_end(&l, rc);
    return rc;
}

SHIM_EXPORT CUresult cuGraphLaunch_ptsz(CUgraphExec hGraphExec, CUstream hStream)
{
    struct compute_launch l;
    compute_begin(&l, compute_graph_key(hGraphExec), hStream, true);
    CUresult rc = REAL(cuGraphLaunch_ptsz)(hGraphExec, hStream);
    compute_end(&l, rc);
    return rc;
}

/* Host functions use no SMs: hooked so that the limiter could order them, not charged. */
SHIM_EXPORT CUresult cuLaunchHostFunc(CUstream hStream, CUhostFn fn, void *userData)
{
    return REAL(cuLaunchHostFunc)(hStream, fn, userData);
}

SHIM_EXPORT CUresult cuLaunchHostFunc_ptsz(CUstream hStream, CUhostFn fn, void *userData)
{
    return REAL(cuLaunchHostFunc_ptsz)(hStream, fn, userData);
}
