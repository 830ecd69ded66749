/*
 * The compute limiter, as the launch hooks see it.
 *
 * Every launch hook brackets the real call:
 *
 *     struct compute_launch l;
 *     compute_begin(&l, key, stream, ptsz);   count, charge, maybe wait
 *     rc = REAL(cuLaunch...)(...);
 *     compute_end(&l, rc);                    close a calibration sample
 *
 * compute_begin delays the launch call itself when the tenant is out of
 * share, so stream order is kept: nothing is queued behind the driver's back.
 * See compute.c for the limiter and calib.h for the cost estimates it uses.
 */
#ifndef FCSP_COMPUTE_H
#define FCSP_COMPUTE_H

#include "calib.h"
#include "shim.h"

struct compute_launch {
    int sample; /* calibration ring slot armed for this launch; -1: none */
};



void shim_compute_charge(struct compute_launch *l, int entry, uint64_t key, CUstream stream,
                         bool ptsz);
void shim_compute_thread_flush(void);
/* After a measured launch: the first starts the watcher of kernels of unknown cost. */
void shim_compute_measured(void);

/* compute_begin with the launch word already loaded: its caller acted on LAUNCH_UVM. */
static inline void compute_begin_entry(struct compute_launch *l, int entry, uint64_t key,
                                       CUstream stream, bool ptsz)
{
    l->sample = -1;
    if (likely(entry != LAUNCH_OFF))
        shim_compute_charge(l, entry == LAUNCH_UVM ? LAUNCH_SLOW : entry, key, stream, ptsz);
}

static inline void compute_begin(struct compute_launch *l, uint64_t key, CUstream stream,
                                 bool ptsz)
{
    compute_begin_entry(l, atomic_load_explicit(&shim_launch_entry, memory_order_relaxed), key,
                        stream, ptsz);
}

static inline void compute_end(struct compute_launch *l, CUresult rc)
{
    if (unlikely(l->sample >= 0)) {
        shim_calib_end(l->sample, rc);
        shim_compute_measured();
    }
}

/*
 * The calibration key of a kernel launch: the function and its launch
 * geometry, since PyTorch and cuBLAS run one function over many sizes.
 * Never 0 (0 marks a free table entry).
 */
static inline uint64_t compute_kernel_key(const void *f, unsigned gx, unsigned gy, unsigned gz,
                                          unsigned bx, unsigned by, unsigned bz)
{
    uint64_t h = (uint64_t)(uintptr_t)f * 0x9e3779b97f4a7c15ull;
    h ^= ((uint64_t)gx << 32 | gy) * 0xc2b2ae3d27d4eb4full;
    h ^= ((uint64_t)gz << 42 | (uint64_t)bx << 21 | (uint64_t)(by ^ (bz << 10))) *
         0x165667b19e3779f9ull;
    h ^= h >> 29;
    return h | 1;
}

/* A graph replay is calibrated as one unit, keyed by its executable graph. */
static inline uint64_t compute_graph_key(const void *exec)
{
    uint64_t h = (uint64_t)(uintptr_t)exec * 0xff51afd7ed558ccdull;
    return (h ^ (h >> 31) ^ 0x6772617068ull) | 1;
}

#endif
