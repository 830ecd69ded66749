/*
 * Launch cost calibration: how much GPU time a launch takes, measured with
 * CUDA events recorded sparsely around real launches.
 *
 * Estimates live in a small lock-free table per process, keyed by the
 * function and launch geometry (or the executable graph).  A key's first
 * FIRST_SAMPLES launches are measured, then at most one every SAMPLE_PERIOD_NS.
 * A measurement is a start/end event pair recorded on the launch's own stream
 * (the _ptsz record for a _ptsz launch), so it spans exactly that kernel once
 * the stream reaches it.  Launches on a capturing stream are not measured.
 *
 * Under time-slicing the span can include another tenant's slice, which
 * would inflate the estimate, throttle the tenant below its share and so
 * ratchet upwards.  The estimator is therefore asymmetric: a lower sample
 * pulls the estimate down fast (1/4), a higher one pushes it up slowly
 * (1/32, by at most the estimate itself), which tracks a low quantile of
 * the samples: the kernel's own time.
 *
 * What a span adds to the kernel is taken off.  A kernel launched onto a
 * stream with nothing left to run is measured "cold": the start event is
 * reached at once, the kernel only once the driver has submitted it, so the
 * span adds the launch call's own time (tens of microseconds when the thread
 * has just woken, longer than a short kernel), and a throttled tenant's stream
 * drains in every wait.  For such a sample (cuStreamQuery said idle when it
 * was armed) the host time from the start event to the launch call's return
 * is taken off.  Behind running work ("warm"), the events themselves add the time the
 * GPU takes from one command to the next: two more events, recorded back to
 * back before the start event, measure it and it is taken off (about a
 * microsecond: several percent of a short kernel).
 *
 * A kernel much shorter than RUN_NS is measured over a run of consecutive
 * launches of its key on one stream from one thread (up to RUN_NS of them
 * by its estimate, at most RUN_MAX), with an end event after the first and
 * one after the last: a kernel right after an event runs slower than one
 * right after another kernel, so spans of single short kernels would charge
 * their tenant a few percent more than it used.  A run ends before a launch
 * of another key or stream, before the thread waits for its share or turn,
 * and before a launch onto a stream that went idle: the span then never holds
 * time the GPU did not spend on the run's kernels.
 *
 * Kernels of unknown cost.  A launch has to be charged before it runs, and a key
 * never measured has no cost to charge: it is charged the process's running
 * estimate (DEFAULT_COST_NS before any), a guess that a long kernel outruns by
 * orders of magnitude.  So the guess is only a down payment, and its first
 * measurement (a "probe") is charged pessimistically until it lands: for as long
 * as its kernel may hold the GPU, from the last time its start event was seen
 * not reached (time-sliced, MPS or alone, the GPU's time is what a share is of),
 * as a launch made then would be.  When it lands, what the key's launches were charged
 * (guesses and the probe's running charge) is trued up against what they took
 * (shim_calib_poll hands the differences to the limiter).  What waits for the
 * measurement is the charge, not the launches: a process's next launches are not
 * held back to learn the cost (the GPU would drain at every new kernel shape),
 * but the running charge reaches the tenant's shared clock within a tick of the
 * limiter's watcher thread (compute.c), so they, and the tenant's other
 * processes, find the share spent.  Nothing escapes by ending: an exiting
 * process waits (bounded) for its probes and charges them, a probe lost with
 * its context is charged up to then, and one still running at the end of the
 * wait is charged for the time it ran; the next process of the tenant finds it
 * all in tat.  Short kernels land within a tick and pay nothing extra.
 *
 * Concurrency: table entries are claimed with a CAS on the key; the sample
 * ring is guarded by a lock (atomic_flag) that a thread failing to take for a
 * sample of a known key simply skips: it does not sample or poll this time.
 * Probes, the exit and a destroyed context wait for it instead.  Driver calls
 * made for the shim's own use run in relaxed stream-capture mode, so that a
 * global-mode capture in another thread is never invalidated by them.
 */
#include <pthread.h>
#include <sched.h>
#include <string.h>

#include "calib.h"

#define TABLE_SIZE 1024u /* power of two */
#define PROBES 8u
#define FIRST_SAMPLES 3u
#define SAMPLE_PERIOD_NS 10000000ull
#define DEFAULT_COST_NS 100000ull
#define RING 16
#define RUN_NS 200000ull /* measure short kernels over runs about this long */
#define RUN_MAX 16u
#define LOCK_SPINS 100000u /* a thread that must have the ring yields this often at most */
_Static_assert(RING <= CALIB_MAX_TRUE_UPS, "a poll returns one true-up per sample at most");

struct estimate {
    _Atomic uint64_t key;            /* 0: free */
    _Atomic uint64_t est_ns;         /* 0: not measured yet */
    _Atomic uint64_t last_sample_ns;
    _Atomic uint32_t started;        /* samples started */
    _Atomic uint32_t uncalibrated;   /* launches charged before the first measurement */
    _Atomic uint64_t uncalibrated_ns; /* what they were charged */
};

static struct estimate table[TABLE_SIZE];
static _Atomic uint64_t average_ns; /* over every key; 0: nothing measured yet */

enum sample_state { SAMPLE_FREE, SAMPLE_ARMED, SAMPLE_PENDING };
/* Per sample: an empty pair (warm: the events' own cost), then around the kernel, or the
 * first kernel and the whole run. */
enum { GAP_START, GAP_END, START, FIRST_END, END, EVENTS };

struct sample {
    _Atomic int state;
    CUevent ev[EVENTS];
    CUcontext ctx;
    uint32_t epoch;
    uint32_t index;     /* table entry */
    uint64_t key;
    int entry;          /* the caller's, handed back with the true-up */
    CUstream stream;
    bool ptsz;
    bool cold;          /* the stream was idle when the start event was recorded */
    uint64_t armed_ns;  /* host time the start event was recorded */
    uint64_t submit_ns; /* cold: host time from then to the launch call's return */
    uint32_t launches;  /* measured so far; in the span, once pending */
    uint32_t run;       /* launches to measure */
    int end;            /* the span's end event: FIRST_END or END */
    /*
     * A probe: the first measurement of a key of unknown cost.  Until it lands, the time
     * its kernel may hold the GPU is charged as it passes (under the ring's lock).
     */
    bool probe;
    uint64_t held_from;   /* host time since which the kernel may have run */
    uint64_t charged_to;  /* host time up to which that has been charged */
    uint64_t provisional; /* GPU ns charged so, given back when the measurement lands */
    bool gone;            /* its context was destroyed (at gone_ns): its events with it */
    uint64_t gone_ns;
};

static struct sample ring[RING];
/* The sample this thread's run is in (armed, measuring its launches); -1: none. */
TLS int shim_calib_open_run = -1;
static pthread_key_t run_owner; /* closes a thread's open run when the thread exits */
static _Atomic int run_owner_once;
static atomic_flag ring_busy = ATOMIC_FLAG_INIT;
static _Atomic int pending;
static _Atomic int probes;  /* probes pending; a futex word for the watcher */
static bool stopped;        /* the process is exiting: no more driver calls (ring lock) */

typedef CUresult (*event_record_fn)(CUevent, CUstream);
typedef CUresult (*is_capturing_fn)(CUstream, CUstreamCaptureStatus *);
typedef CUresult (*stream_query_fn)(CUstream);
typedef CUresult (*elapsed_fn)(float *, CUevent, CUevent);
typedef CUresult (*event_destroy_fn)(CUevent); /* cuEventDestroy_v2: not declared under
                                                  __CUDA_API_VERSION_INTERNAL */

/*
 * The ring's lock.  Samples of known keys skip a busy ring (nothing is lost but a
 * measurement); a probe, the exit and a destroyed context wait for it: the holder only
 * records or queries a few events.
 */
static bool lock_ring(bool wait)
{
    if (!atomic_flag_test_and_set_explicit(&ring_busy, memory_order_acquire))
        return true;
    for (unsigned i = 0; wait && i < LOCK_SPINS; i++) {
        sched_yield();
        if (!atomic_flag_test_and_set_explicit(&ring_busy, memory_order_acquire))
            return true;
    }
    return false;
}

static void unlock_ring(void)
{
    atomic_flag_clear_explicit(&ring_busy, memory_order_release);
}

/* ---- estimates -------------------------------------------------------------- */

static void fold(_Atomic uint64_t *est, uint64_t sample)
{
    uint64_t old = atomic_load_explicit(est, memory_order_relaxed), next;
    do {
        if (old == 0)
            next = sample;
        else if (sample < old)
            next = old - (old - sample) / 4;
        else
            next = old + ((sample - old < old ? sample - old : old) / 32);
        if (next == 0)
            next = 1;
    } while (!atomic_compare_exchange_weak_explicit(est, &old, next, memory_order_relaxed,
                                                    memory_order_relaxed));
}

static struct estimate *lookup(uint64_t key, uint32_t *index)
{
    uint32_t first = (uint32_t)(key >> 20) & (TABLE_SIZE - 1);
    for (uint32_t p = 0; p < PROBES; p++) {
        uint32_t i = (first + p) & (TABLE_SIZE - 1);
        struct estimate *e = &table[i];
        uint64_t k = atomic_load_explicit(&e->key, memory_order_relaxed);
        if (likely(k == key)) {
            *index = i;
            return e;
        }
        if (k == 0 && atomic_compare_exchange_strong_explicit(&e->key, &k, key,
                                                              memory_order_relaxed,
                                                              memory_order_relaxed)) {
            *index = i;
            return e;
        }
        if (k == key) { /* another thread claimed it for the same key */
            *index = i;
            return e;
        }
    }
    /*
     * Full neighbourhood: the first entry goes to the new key.  A concurrent
     * reader may briefly use the evicted key's estimate; a cost, never a fault.
     */
    struct estimate *e = &table[first];
    atomic_store_explicit(&e->key, key, memory_order_relaxed);
    atomic_store_explicit(&e->est_ns, 0, memory_order_relaxed);
    atomic_store_explicit(&e->started, 0, memory_order_relaxed);
    atomic_store_explicit(&e->uncalibrated, 0, memory_order_relaxed);
    atomic_store_explicit(&e->uncalibrated_ns, 0, memory_order_relaxed);
    *index = first;
    return e;
}

uint64_t shim_calib_cost(uint64_t key, uint64_t now, bool *sample, uint32_t *index)
{
    struct estimate *e = lookup(key, index);
    uint64_t est = atomic_load_explicit(&e->est_ns, memory_order_relaxed);
    uint64_t last = atomic_load_explicit(&e->last_sample_ns, memory_order_relaxed);
    if (unlikely(atomic_load_explicit(&e->started, memory_order_relaxed) < FIRST_SAMPLES) ||
        unlikely(now - last >= SAMPLE_PERIOD_NS)) {
        /* One thread per period wins the right to measure this key. */
        if (atomic_compare_exchange_strong_explicit(&e->last_sample_ns, &last, now,
                                                    memory_order_relaxed, memory_order_relaxed)) {
            /* Counted when granted, armed or not: a key that cannot be measured (a
             * capturing stream) falls back to the periodic attempts. */
            atomic_fetch_add_explicit(&e->started, 1, memory_order_relaxed);
            *sample = true;
        }
    }
    if (likely(est != 0))
        return est;
    uint64_t cost = atomic_load_explicit(&average_ns, memory_order_relaxed);
    if (!cost)
        cost = DEFAULT_COST_NS;
    atomic_fetch_add_explicit(&e->uncalibrated, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&e->uncalibrated_ns, cost, memory_order_relaxed);
    return cost;
}

/* ---- driver calls for our own use -------------------------------------------- */

static void *real_or_null(enum shim_sym sym)
{
    return shim_real(sym);
}

/* Relaxed capture mode for this thread; returns the mode to restore. */
static CUstreamCaptureMode relax_capture(bool *changed)
{
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
    __typeof__(&cuThreadExchangeStreamCaptureMode) exchange =
        real_or_null(SYM_cuThreadExchangeStreamCaptureMode);
    *changed = exchange && exchange(&mode) == CUDA_SUCCESS;
    return mode;
}

static void restore_capture(CUstreamCaptureMode mode, bool changed)
{
    if (changed)
        REAL(cuThreadExchangeStreamCaptureMode)(&mode);
}

static bool capturing(CUstream stream, bool ptsz)
{
    is_capturing_fn fn = real_or_null(ptsz ? SYM_cuStreamIsCapturing_ptsz : SYM_cuStreamIsCapturing);
    CUstreamCaptureStatus status = CU_STREAM_CAPTURE_STATUS_NONE;
    if (!fn || fn(stream, &status) != CUDA_SUCCESS)
        return true; /* cannot tell: do not touch the stream */
    return status != CU_STREAM_CAPTURE_STATUS_NONE;
}

/* Everything queued on the stream has run: the next kernel would be measured cold. */
static bool stream_idle(CUstream stream, bool ptsz)
{
    stream_query_fn fn = real_or_null(ptsz ? SYM_cuStreamQuery_ptsz : SYM_cuStreamQuery);
    return fn && fn(stream) == CUDA_SUCCESS;
}

static CUresult record(CUevent ev, CUstream stream, bool ptsz)
{
    event_record_fn fn = real_or_null(ptsz ? SYM_cuEventRecord_ptsz : SYM_cuEventRecord);
    return fn ? fn(ev, stream) : CUDA_ERROR_NOT_SUPPORTED;
}

/* Events of the current context, created if need be: a sample's, or the window marker. */
struct event_set {
    CUevent *ev;
    int n;
    CUcontext *ctx;  /* events belong to the context they were created in */
    uint32_t *epoch; /* shim_context_epoch at creation: a destroyed context took them */
};

static bool ready_events(struct event_set set)
{
    CUcontext ctx = NULL;
    if (!REAL(cuCtxGetCurrent) || REAL(cuCtxGetCurrent)(&ctx) != CUDA_SUCCESS || !ctx)
        return false;
    uint32_t epoch = atomic_load_explicit(&shim_context_epoch, memory_order_relaxed);
    if (set.ev[0] && *set.ctx == ctx && *set.epoch == epoch)
        return true;
    event_destroy_fn destroy = real_or_null(SYM_cuEventDestroy_v2);
    /* Events of a destroyed context went with it: forget them rather than destroy them. */
    bool mine = set.ev[0] && *set.epoch == epoch && destroy;
    for (int i = 0; i < set.n; i++) {
        if (mine)
            destroy(set.ev[i]);
        set.ev[i] = NULL;
    }
    if (!destroy || !REAL(cuEventCreate))
        return false;
    for (int i = 0; i < set.n; i++) {
        if (REAL(cuEventCreate)(&set.ev[i], CU_EVENT_DEFAULT) != CUDA_SUCCESS) {
            set.ev[i] = NULL;
            while (i-- > 0) {
                destroy(set.ev[i]);
                set.ev[i] = NULL;
            }
            return false;
        }
    }
    *set.ctx = ctx;
    *set.epoch = epoch;
    return true;
}

static struct event_set sample_events(struct sample *s)
{
    return (struct event_set){s->ev, EVENTS, &s->ctx, &s->epoch};
}

/* ---- samples ------------------------------------------------------------------ */

/* The start event, after the empty pair if the stream is running something (warm). */
static bool record_start(struct sample *s, CUstream stream, bool ptsz)
{
    s->cold = stream_idle(stream, ptsz);
    if (!s->cold && (record(s->ev[GAP_START], stream, ptsz) != CUDA_SUCCESS ||
                     record(s->ev[GAP_END], stream, ptsz) != CUDA_SUCCESS))
        return false;
    return record(s->ev[START], stream, ptsz) == CUDA_SUCCESS;
}

/* Launches a sample of a kernel of estimate est spans: a run about RUN_NS long. */
static uint32_t run_length(uint64_t est)
{
    if (est == 0 || est >= RUN_NS)
        return 1;
    return RUN_NS / est < RUN_MAX ? (uint32_t)(RUN_NS / est) : RUN_MAX;
}

int shim_calib_arm(uint32_t index, uint64_t key, int entry, CUstream stream, bool ptsz)
{
    bool probe = atomic_load_explicit(&table[index].est_ns, memory_order_relaxed) == 0;
    if (!lock_ring(probe))
        return -1; /* someone else is in the ring: skip this sample */
    int slot = -1;
    for (int i = 0; i < RING && slot < 0; i++)
        if (atomic_load_explicit(&ring[i].state, memory_order_relaxed) == SAMPLE_FREE)
            slot = i;
    bool changed = false;
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
    if (slot >= 0) {
        struct sample *s = &ring[slot];
        mode = relax_capture(&changed);
        if (capturing(stream, ptsz) || !ready_events(sample_events(s)) ||
            !record_start(s, stream, ptsz)) {
            slot = -1;
        } else {
            s->index = index;
            s->key = key;
            s->entry = entry;
            s->stream = stream;
            s->ptsz = ptsz;
            s->armed_ns = shim_monotonic_ns();
            s->launches = 0;
            s->run = run_length(atomic_load_explicit(&table[index].est_ns, memory_order_relaxed));
            s->probe = probe;
            s->held_from = s->armed_ns;
            s->charged_to = 0;
            s->provisional = 0;
            s->gone = false;
            atomic_store_explicit(&s->state, SAMPLE_ARMED, memory_order_relaxed);
        }
        restore_capture(mode, changed);
    }
    unlock_ring();
    return slot;
}

/* A pending sample is done with: free it for the next. */
static void release_pending(struct sample *s)
{
    atomic_fetch_sub_explicit(&pending, 1, memory_order_relaxed);
    if (s->probe)
        atomic_fetch_sub_explicit(&probes, 1, memory_order_relaxed);
    atomic_store_explicit(&s->state, SAMPLE_FREE, memory_order_release);
}

/*
 * The sample's span ends at its event `end` after `launches` launches: hand it to
 * shim_calib_poll, or free it if it holds none.
 */
static void close_sample(struct sample *s, int end, uint32_t launches)
{
    s->end = end;
    s->launches = launches;
    if (!launches) {
        atomic_store_explicit(&s->state, SAMPLE_FREE, memory_order_release);
        return;
    }
    atomic_fetch_add_explicit(&pending, 1, memory_order_relaxed);
    /*
     * The watcher (compute.c) charges a probe as it runs.  Woken only now, after the launch
     * and its end event: a thread woken between the start event and the launch could take
     * the CPU there and stretch the span by the neighbours' work queued meanwhile.
     */
    bool wake = s->probe && atomic_fetch_add_explicit(&probes, 1, memory_order_relaxed) == 0;
    atomic_store_explicit(&s->state, SAMPLE_PENDING, memory_order_release);
    if (wake)
        shim_futex_wake(&probes);
}

/*
 * Close this thread's run: its span ends at an end event recorded now, right behind its
 * last launch, if the stream is still running it; otherwise (or at thread exit, with no
 * driver calls) at the event after its first launch.
 */
static void close_run(bool may_record)
{
    int slot = shim_calib_open_run;
    if (slot < 0)
        return;
    shim_calib_open_run = -1;
    struct sample *s = &ring[slot];
    bool whole = false;
    if (may_record && s->launches > 1) {
        bool changed = false;
        CUstreamCaptureMode mode = relax_capture(&changed);
        whole = !capturing(s->stream, s->ptsz) && !stream_idle(s->stream, s->ptsz) &&
                record(s->ev[END], s->stream, s->ptsz) == CUDA_SUCCESS;
        restore_capture(mode, changed);
    }
    close_sample(s, whole ? END : FIRST_END, whole ? s->launches : 1);
}

void shim_calib_run_close(void)
{
    close_run(true);
}

static void close_run_at_exit(void *sample)
{
    (void)sample;
    close_run(false);
}

/* Without libpthread (an old glibc, glibc_compat.h) a run is one launch. */
static void make_run_owner(void)
{
    if (!pthread_key_create || !pthread_setspecific ||
        pthread_key_create(&run_owner, close_run_at_exit) != 0)
        run_owner = (pthread_key_t)-1;
}

/* Keep the sample open for this thread's next launches; false: it cannot be. */
static bool open_run(int slot)
{
    shim_once(&run_owner_once, make_run_owner);
    if (run_owner == (pthread_key_t)-1 || pthread_setspecific(run_owner, &ring[slot]) != 0)
        return false;
    shim_calib_open_run = slot;
    return true;
}

/*
 * After a measured launch.  The first gets an end event of its own (FIRST_END), so that
 * a run cut short still measures one launch; the others none until the run closes, since
 * a kernel right after an event is slower than one right after another kernel.
 */
void shim_calib_end(int slot, CUresult rc)
{
    struct sample *s = &ring[slot];
    if (rc != CUDA_SUCCESS) { /* nothing was queued: a run goes on without it */
        if (s->launches == 0)
            close_sample(s, FIRST_END, 0);
        return;
    }
    if (++s->launches > 1) {
        if (s->launches >= s->run)
            close_run(true);
        return;
    }
    if (s->cold)
        s->submit_ns = shim_monotonic_ns() - s->armed_ns;
    bool changed = false;
    CUstreamCaptureMode mode = relax_capture(&changed);
    bool ended = record(s->ev[FIRST_END], s->stream, s->ptsz) == CUDA_SUCCESS;
    restore_capture(mode, changed);
    if (!ended || s->run == 1 || !open_run(slot))
        close_sample(s, FIRST_END, ended ? 1 : 0);
}

int shim_calib_run_next(uint64_t key, CUstream stream, bool ptsz)
{
    int slot = shim_calib_open_run;
    const struct sample *s = &ring[slot];
    bool changed = false;
    CUstreamCaptureMode mode = relax_capture(&changed);
    /* An idle stream: the GPU waited for this launch, and the span would count the wait. */
    bool follows = s->key == key && s->stream == stream && s->ptsz == ptsz &&
                   !capturing(stream, ptsz) && !stream_idle(stream, ptsz);
    restore_capture(mode, changed);
    if (follows)
        return slot;
    close_run(true);
    return -1;
}

bool shim_calib_pending(void)
{
    return atomic_load_explicit(&pending, memory_order_relaxed) > 0;
}

bool shim_calib_probing(void)
{
    return atomic_load_explicit(&probes, memory_order_relaxed) > 0;
}

void shim_calib_wait_for_probe(void)
{
    while (atomic_load_explicit(&probes, memory_order_relaxed) <= 0)
        shim_futex_wait(&probes, 0);
}

/* A correction of what was charged: the limiter charges it (or gives it back). */
static bool correction(const struct sample *s, int64_t gpu_ns, struct calib_true_up *up)
{
    *up = (struct calib_true_up){s->entry, gpu_ns, 0};
    return gpu_ns != 0;
}

/*
 * A probe whose kernel has not been measured yet: charge the time since it was last
 * charged, from when the kernel may have started (its start event was reached, or is
 * taken as reached: `started`), as a launch made then would be.  Until its key has an
 * estimate: then the measurement that gave it trued up what the key's launches cost.
 */
static bool accrue(struct sample *s, uint64_t now, bool started, struct calib_true_up *up)
{
    const struct estimate *e = &table[s->index];
    if (atomic_load_explicit(&e->key, memory_order_relaxed) == s->key &&
        atomic_load_explicit(&e->est_ns, memory_order_relaxed) != 0)
        return false;
    if (!started) {
        s->held_from = now; /* queued behind other work: it has not run yet */
        return false;
    }
    uint64_t from = s->charged_to > s->held_from ? s->charged_to : s->held_from;
    if (now <= from)
        return false;
    *up = (struct calib_true_up){s->entry, (int64_t)(now - from), from};
    s->charged_to = now;
    s->provisional += now - from;
    return true;
}

/* Fold a measurement in; true if what was charged before it must be trued up (*up). */
static bool finish(struct sample *s, uint64_t span_ns, uint64_t added_ns,
                   struct calib_true_up *up)
{
    uint64_t measured_ns = (span_ns - added_ns) / s->launches;
    struct estimate *e = &table[s->index];
    int64_t given_back = -(int64_t)s->provisional; /* a probe's charge as it ran */
    if (atomic_load_explicit(&e->key, memory_order_relaxed) != s->key) /* evicted meanwhile */
        return s->probe && correction(s, (int64_t)measured_ns + given_back, up);
    fold(&e->est_ns, measured_ns);
    shim_log(LOG_DEBUG, "calib key %llx measured %llu est %llu %s, less %llu, over %u launches",
             (unsigned long long)s->key, (unsigned long long)measured_ns,
             (unsigned long long)e->est_ns, s->cold ? "cold" : "warm",
             (unsigned long long)added_ns, s->launches);
    fold(&average_ns, measured_ns);
    /* What was charged before this key had any measurement. */
    uint32_t n = atomic_exchange_explicit(&e->uncalibrated, 0, memory_order_relaxed);
    uint64_t charged = atomic_exchange_explicit(&e->uncalibrated_ns, 0, memory_order_relaxed);
    return correction(s, (int64_t)(n * measured_ns) - (int64_t)charged + given_back, up);
}

/* ns from event a to event b; false if either is not done or they cannot be compared. */
static bool elapsed_ns(elapsed_fn elapsed, CUevent a, CUevent b, uint64_t *ns)
{
    float ms = 0;
    if (!elapsed || elapsed(&ms, a, b) != CUDA_SUCCESS || ms < 0)
        return false;
    *ns = (uint64_t)((double)ms * 1e6) + 1;
    return true;
}

/*
 * What the measurement added to the kernel's span: cold, the host time from the start
 * event to the launch call's return; warm, the empty pair's time, if at most an eighth
 * of the span (a stream that ran dry between the query and the records makes the pair
 * measure host time).  Nothing if that is not less than the span itself.
 */
static uint64_t added_time(const struct sample *s, elapsed_fn elapsed, uint64_t span)
{
    uint64_t added = 0;
    if (s->cold)
        added = s->submit_ns;
    else if (!elapsed_ns(elapsed, s->ev[GAP_START], s->ev[GAP_END], &added) || added > span / 8)
        added = 0;
    return added < span ? added : 0;
}

/*
 * One sample, pending: its measurement, the time a probe's kernel held the GPU so far, or
 * nothing yet.  Returns whether it wrote *up; frees the sample once it is done with.
 */
/*
 * A thread of the shim's own makes the sample's context its current one before asking
 * about its events (no application state is touched: nothing else runs on that thread).
 */
static bool adopt(CUcontext ctx)
{
    CUcontext current = NULL;
    __typeof__(&cuCtxSetCurrent) set_current = real_or_null(SYM_cuCtxSetCurrent);
    if (REAL(cuCtxGetCurrent) && REAL(cuCtxGetCurrent)(&current) == CUDA_SUCCESS &&
        current == ctx)
        return true;
    return set_current && set_current(ctx) == CUDA_SUCCESS;
}

static bool poll_sample(struct sample *s, elapsed_fn elapsed, uint64_t now, enum calib_poll how,
                        struct calib_true_up *up)
{
    if (how == CALIB_POLL_ASIDE && !s->gone && !adopt(s->ctx))
        return false;
    CUresult rc = s->gone ? CUDA_ERROR_CONTEXT_IS_DESTROYED : REAL(cuEventQuery)(s->ev[s->end]);
    if (rc == CUDA_ERROR_NOT_READY) {
        if (!s->probe)
            return false;
        bool wrote = accrue(s, now, REAL(cuEventQuery)(s->ev[START]) == CUDA_SUCCESS, up);
        if (how == CALIB_POLL_LAST) /* exiting: what it held so far is what it costs */
            release_pending(s);
        return wrote;
    }
    uint64_t span = 0;
    bool measured = rc == CUDA_SUCCESS && elapsed_ns(elapsed, s->ev[START], s->ev[s->end], &span);
    if (!measured && !s->gone && how == CALIB_POLL_ASIDE)
        return false;
    bool wrote = false;
    if (measured)
        wrote = finish(s, span, added_time(s, elapsed, span), up);
    else if (s->probe) /* lost with its context: charged up to then, as if it ran */
        wrote = accrue(s, s->gone ? s->gone_ns : now, true, up);
    release_pending(s);
    return wrote;
}

unsigned shim_calib_poll(struct calib_true_up out[CALIB_MAX_TRUE_UPS], enum calib_poll how)
{
    unsigned n = 0;
    if (!lock_ring(how == CALIB_POLL_WAIT || how == CALIB_POLL_LAST))
        return 0;
    if (stopped) {
        unlock_ring();
        return 0;
    }
    bool changed = false;
    CUstreamCaptureMode mode = relax_capture(&changed);
    elapsed_fn elapsed = real_or_null(SYM_cuEventElapsedTime_v2);
    if (!elapsed)
        elapsed = real_or_null(SYM_cuEventElapsedTime);
    uint64_t now = shim_monotonic_ns();
    for (int i = 0; i < RING; i++) {
        struct sample *s = &ring[i];
        if (atomic_load_explicit(&s->state, memory_order_acquire) == SAMPLE_PENDING &&
            poll_sample(s, elapsed, now, how, &out[n]))
            n++;
    }
    restore_capture(mode, changed);
    if (how == CALIB_POLL_LAST) /* the driver may be finalised while other threads run */
        stopped = true;
    unlock_ring();
    return n;
}

void shim_calib_forget_context(CUcontext ctx)
{
    if (!ctx || !lock_ring(true))
        return; /* a sample whose events went is then found lost when next polled */
    uint64_t now = shim_monotonic_ns();
    for (int i = 0; i < RING; i++) {
        struct sample *s = &ring[i];
        if (atomic_load_explicit(&s->state, memory_order_relaxed) != SAMPLE_FREE &&
            s->ctx == ctx && !s->gone) {
            s->gone = true;
            s->gone_ns = now;
        }
    }
    unlock_ring();
}

/* ---- the end of a turn window's work ------------------------------------------ */

/*
 * One marker per process: an event recorded after the work a thread queued in its turn
 * window, polled until the device reaches it (compute.c's wait_for_turn).  A thread that
 * finds it taken measures nothing this time.
 */
static struct {
    atomic_flag busy;
    CUevent ev;
    CUcontext ctx;
    uint32_t epoch;
} marker = {ATOMIC_FLAG_INIT, NULL, NULL, 0};

bool shim_calib_mark(CUstream stream, bool ptsz)
{
    if (atomic_flag_test_and_set_explicit(&marker.busy, memory_order_acquire))
        return false;
    bool changed = false;
    CUstreamCaptureMode mode = relax_capture(&changed);
    bool ok = !capturing(stream, ptsz) &&
              ready_events((struct event_set){&marker.ev, 1, &marker.ctx, &marker.epoch}) &&
              record(marker.ev, stream, ptsz) == CUDA_SUCCESS;
    restore_capture(mode, changed);
    if (!ok)
        atomic_flag_clear_explicit(&marker.busy, memory_order_release);
    return ok;
}

enum mark_state shim_calib_mark_poll(void)
{
    bool changed = false;
    CUstreamCaptureMode mode = relax_capture(&changed);
    CUresult rc = REAL(cuEventQuery)(marker.ev);
    restore_capture(mode, changed);
    if (rc == CUDA_ERROR_NOT_READY)
        return MARK_RUNNING;
    atomic_flag_clear_explicit(&marker.busy, memory_order_release);
    return rc == CUDA_SUCCESS ? MARK_REACHED : MARK_LOST;
}

void shim_calib_mark_drop(void)
{
    atomic_flag_clear_explicit(&marker.busy, memory_order_release);
}

void shim_calib_after_fork_child(void)
{
    marker.ev = NULL;
    marker.ctx = NULL;
    atomic_flag_clear(&marker.busy);
    /* The parent's contexts and events do not exist in the child. */
    shim_calib_open_run = -1;
    for (int i = 0; i < RING; i++) {
        for (int j = 0; j < EVENTS; j++)
            ring[i].ev[j] = NULL;
        ring[i].ctx = NULL;
        atomic_store_explicit(&ring[i].state, SAMPLE_FREE, memory_order_relaxed);
    }
    atomic_store_explicit(&pending, 0, memory_order_relaxed);
    atomic_store_explicit(&probes, 0, memory_order_relaxed);
    stopped = false;
    atomic_flag_clear(&ring_busy);
}
