/*
 * Launch cost calibration (calib.c), as the compute limiter uses it: how much GPU
 * time a launch takes, from CUDA events recorded sparsely around real launches, and
 * a marker for when the device has finished a turn window's work.
 *
 * The dependency runs one way: compute.c calls calibration, calibration never calls
 * the limiter and knows nothing of shares or the slot.  What a measurement says about
 * launches already charged comes back as a return value (shim_calib_poll), for the
 * limiter to charge or give back.
 */
#ifndef FCSP_CALIB_H
#define FCSP_CALIB_H

#include "shim.h"

/*
 * The estimated GPU time of a launch of `key`, in ns.  *sample is set when
 * this launch should be measured (the caller then arms a sample right before
 * the launch, after any wait).
 */
uint64_t shim_calib_cost(uint64_t key, uint64_t now, bool *sample, uint32_t *index);
/*
 * Arm a sample: record the start event on the launch's stream.  `entry` is the
 * caller's, handed back with the sample's true-up.  Returns the sample, -1 if it
 * could not; after the launch, shim_calib_end(sample, the launch's result).
 */
int shim_calib_arm(uint32_t index, uint64_t key, int entry, CUstream stream, bool ptsz);
void shim_calib_end(int sample, CUresult rc);
/*
 * A run: the sample this thread armed last, kept open over its next launches of the same
 * key and stream (short kernels); -1 when none is.  shim_calib_run_next, before a launch
 * while one is: the sample to measure it in, or -1 after closing the run (another key or
 * stream, an idle stream); shim_calib_run_close before the thread waits.
 */
extern TLS int shim_calib_open_run;
int shim_calib_run_next(uint64_t key, CUstream stream, bool ptsz);
void shim_calib_run_close(void);

/*
 * The first measurement of a key found that its launches before it, charged at a
 * guess, took gpu_ns more GPU time than charged (less, if negative), on `entry`.
 */
struct calib_true_up {
    int entry;
    int64_t gpu_ns;
};
#define CALIB_MAX_TRUE_UPS 16 /* at most one per sample in flight */
/*
 * Fold finished samples into the estimates; non-blocking, at most one thread at a
 * time.  Returns how many true-ups it wrote to `out`.
 */
unsigned shim_calib_poll(struct calib_true_up out[CALIB_MAX_TRUE_UPS]);
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

#endif
