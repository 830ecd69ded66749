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
 * See compute.c for the limiter and calib.c for the cost estimates.
 */
#ifndef FCSP_COMPUTE_H
#define FCSP_COMPUTE_H

#include "shim.h"

#define SHARE_FULL_CENTI 10000u /* the whole GPU */
#define TLS __attribute__((tls_model("initial-exec"))) __thread

struct compute_launch {
    int sample; /* calibration ring slot armed for this launch; -1: none */
};

/*
 * >= 0: the usage entry every launch of this process counts against (one
 * device); LAUNCH_SLOW: look the device up (several devices, or not yet
 * known); LAUNCH_OFF: inactive, count nothing.
 */
#define LAUNCH_SLOW (-1)
#define LAUNCH_OFF (-2)
extern _Atomic int shim_launch_entry;

void shim_compute_charge(struct compute_launch *l, int entry, uint64_t key, CUstream stream,
                         bool ptsz);
void shim_calib_end(struct compute_launch *l, CUresult rc);
void shim_compute_thread_flush(void);

static inline void compute_begin(struct compute_launch *l, uint64_t key, CUstream stream,
                                 bool ptsz)
{
    l->sample = -1;
    int entry = atomic_load_explicit(&shim_launch_entry, memory_order_relaxed);
    if (likely(entry != LAUNCH_OFF))
        shim_compute_charge(l, entry, key, stream, ptsz);
}

static inline void compute_end(struct compute_launch *l, CUresult rc)
{
    if (unlikely(l->sample >= 0))
        shim_calib_end(l, rc);
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

/* ---- calib.c: GPU-time estimates from sparse CUDA events -------------------- */

/*
 * The estimated GPU time of a launch of `key`, in ns.  *sample is set when
 * this launch should be measured (the caller then arms a sample right before
 * the launch, after any wait).
 */
uint64_t shim_calib_cost(uint64_t key, uint64_t now, bool *sample, uint32_t *index);
/* Arm a sample: record the start event on the launch's stream.  -1 if it could not. */
int shim_calib_arm(uint32_t index, uint64_t key, int entry, CUstream stream, bool ptsz);
/*
 * A run: the sample this thread armed last, kept open over its next launches of the same
 * key and stream (short kernels); -1 when none is.  shim_calib_run_next, before a launch
 * while one is: the sample to measure it in, or -1 after closing the run (another key or
 * stream, an idle stream); shim_calib_run_close before the thread waits.
 */
extern TLS int shim_calib_open_run;
int shim_calib_run_next(uint64_t key, CUstream stream, bool ptsz);
void shim_calib_run_close(void);
/* Fold finished samples into the estimates; non-blocking, at most one thread at a time. */
void shim_calib_poll(void);
bool shim_calib_pending(void);
/*
 * The marker for the end of a turn window's work: record it on `stream` (false: not
 * recorded, e.g. the stream is capturing or another thread holds it); then poll it until
 * it is reached or lost, or drop it.  Polling it after it was reached or lost, or
 * dropping it, releases it for the next window.
 */
enum mark_state { MARK_RUNNING, MARK_REACHED, MARK_LOST };
bool shim_calib_mark(CUstream stream, bool ptsz);
enum mark_state shim_calib_mark_poll(void);
void shim_calib_mark_drop(void);
/* After fork: the child's events belong to no context of its own. */
void shim_calib_after_fork_child(void);

/* compute.c, for calib.c: give back or charge the difference found by a first measurement. */
void shim_compute_true_up(int entry, int64_t gpu_ns);

#endif
