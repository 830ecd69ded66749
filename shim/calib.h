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
 * What a poll says about what launches were charged, on `entry`.  held_from_ns == 0: a
 * correction: the launches of a key charged at a guess before its first measurement
 * took gpu_ns more GPU time than they were charged (less, if negative).  Otherwise a
 * kernel of unknown cost has held the GPU (or may have: it is still running) for gpu_ns
 * more since held_from_ns: charged as a launch made then would be, and given back by
 * the correction its measurement brings.
 */
struct calib_true_up {
    int entry;
    int64_t gpu_ns;
    uint64_t held_from_ns;
};
#define CALIB_MAX_TRUE_UPS 16 /* at most one per sample in flight */
/*
 * Fold finished samples into the estimates, and charge the kernels of unknown cost
 * still running for the time that passed; at most one thread at a time.  Returns how
 * many true-ups it wrote to `out`.  CALIB_POLL_TRY does nothing if another thread is
 * polling; CALIB_POLL_ASIDE neither, from a thread of the shim's own: it makes each
 * sample's context current there, and an event that does not answer is left for the
 * application's threads rather than taken as lost; CALIB_POLL_WAIT waits for the other
 * thread; CALIB_POLL_LAST, at exit, also settles the kernels of unknown cost still
 * running (what they held so far is what they cost) and makes every later poll a no-op:
 * the driver may be finalised after it.
 */
enum calib_poll { CALIB_POLL_TRY, CALIB_POLL_ASIDE, CALIB_POLL_WAIT, CALIB_POLL_LAST };
unsigned shim_calib_poll(struct calib_true_up out[CALIB_MAX_TRUE_UPS], enum calib_poll how);
bool shim_calib_pending(void);
/* A kernel of unknown cost is being measured; block until one is. */
bool shim_calib_probing(void);
void shim_calib_wait_for_probe(void);
/* A context was destroyed: its samples' events went with it (a probe's kernel too). */
void shim_calib_forget_context(CUcontext ctx);

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
