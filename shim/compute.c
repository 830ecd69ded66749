/*
 * Compute shares: a GCRA (virtual-time) limiter per tenant and device.
 *
 * The tenant's share s (1/100 %) of a GPU means: of every second of wall
 * time, s/10000 may be spent running its kernels.  All of the tenant's
 * processes share one theoretical arrival time, tat_ns, in the usage file.
 * A launch whose kernel is estimated to take c ns of GPU time does
 *
 *     base = max(tat, now);  tat = base + c * 10000 / s     (one CAS)
 *
 * and may go at once if base - now <= BURST_NS, else its thread sleeps until
 * base - BURST_NS.  So over any interval the tenant is admitted at most s of
 * the GPU time, plus one burst; idle time earns no credit beyond the burst.
 * The wait is taken before the launch call itself: stream order is kept and
 * nothing is queued behind the driver's back.  Because tat is absolute, a
 * thread that oversleeps (timer slack, a busy host) does not lose its rate:
 * the next launches find the tenant behind its allowance and go at once.
 *
 * Why GCRA rather than a refilled token bucket: the bucket needs a refill
 * (a second shared word and a timestamp, or a refill thread); GCRA is one
 * word and one CAS, and a change of share applies to the next launch with
 * no bucket state to rescale.  Its "gain" is the cost model itself: c is the
 * kernel's measured GPU time (calib.c), so nothing depends on the SM count.
 *
 * The share in force: the observer's sm_effective_centi (one relaxed load),
 * or the request while that is unset (0).  The observer may raise it above the
 * request (work conservation); if the observer is gone (heartbeat 0 or older
 * than FCSP_OBSERVER_STALE_NS) such a raise is ignored and the request applies,
 * i.e. strict behaviour.  Isolation mode none means no compute limit; so does
 * an MPS client whose thread percentage is its share (strict, or latency
 * priority), since the hardware then keeps it to its SMs, as long as it is the
 * tenant's only MPS process (mps_sm_fraction says what holds several).
 * BUD_SM_LIMIT(_DEV<n>) can only lower the result.
 * 100 % skips everything but the launch counter.
 *
 * Turns: while the observer publishes a window of a repeating cycle for the
 * tenant (fcsp_limits_device.turn: two or more tenants keep the GPU busy), a
 * launch also waits for the window and is booked into it: it goes if the work
 * the tenant booked so far plus half of its own cost ends inside the window
 * (so that on average the window is filled, not left short by a kernel that
 * does not fit), or if it is the window's first.  Then the busy tenants of a
 * GPU take turns instead of being time-sliced by the driver, which loses a
 * few percent of the GPU's time to switching between busy contexts and
 * stretches each kernel's measured span by the neighbour's slices.  The share
 * itself is still the GCRA's, with a burst of one cycle so that a window can
 * be used at full speed.  Booking is done on the host, by estimate; what keeps
 * the tenant's work inside its window on the device is a margin learnt from
 * when that work really ended (turn_margin_ns below).  Turns of an observer
 * that stopped beating are ignored.
 *
 * A kernel whose cost is not known yet (its key was never measured) is charged a
 * guess at launch, then for the time it holds the GPU as it runs, every
 * PROBE_TICK_NS, by a thread of the shim's own, and trued up when measured; an
 * exiting process first waits for such kernels (calib.c says why).
 *
 * Reported in the usage file, per device:
 *   launches      every launch (at once)
 *   busy_ns       the GPU time admitted: the sum of the calibrated costs c,
 *                 i.e. GPU time as measured by the events, extrapolated to
 *                 every launch
 *   tokens_used   the share-time consumed: the sum of c * 10000 / s
 *   throttled_ns  time launching threads slept for their share
 *   demand_centi  the share the tenant would use unthrottled (estimate)
 *   busy_sq       the sum of the costs' squares (in 1.024 us units): how big the
 *                 launches are that take the tenant's GPU time
 * busy_ns, busy_sq and tokens_used are summed per thread and flushed every
 * FLUSH_EVERY launches and before every wait, to keep atomics off the
 * common path.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <time.h>

#include "compute.h"

#define BURST_NS 4000000ull         /* may run this far ahead of its allowance */
#define MIN_SLEEP_NS 1000000ull     /* fewer, longer sleeps; less than BURST_NS loses nothing */
#define WAIT_CHUNK_NS 10000000ull   /* re-read the share at least this often while waiting */
#define TURN_LEAD_NS 300000ull      /* launch this long before the window opens */
#define MARK_POLL_NS 100000ull      /* how often a waiting thread looks whether its work ended */
#define FLUSH_EVERY 16u
#define DEMAND_WINDOW_NS 100000000ull
#define CLOCK_SCALE_MAX (2 * FCSP_WHOLE_GPU_CENTI)
#define PROBE_TICK_NS 2000000ull       /* charge kernels of unknown cost this often as they run */
#define EXIT_SETTLE_NS 1000000000ull   /* an exiting process waits this long for their end */
#define WATCHER_STACK (256u << 10)
#define TURN_MASK ((1ull << FCSP_TURN_BITS) - 1)

void shim_launch_init(void)
{
    atomic_store_explicit(&shim_launch_entry, shim.active ? LAUNCH_SLOW : LAUNCH_OFF,
                          memory_order_relaxed);
}

/* ---- the share in force ------------------------------------------------------ */

static bool observer_alive_at(const struct fcsp_limits *limits, uint64_t now)
{
    uint64_t beat = __atomic_load_n(&limits->observer_heartbeat_ns, __ATOMIC_RELAXED);
    return beat != 0 && (int64_t)(now - beat) <= (int64_t)FCSP_OBSERVER_STALE_NS;
}

static bool observer_alive(const struct fcsp_limits *limits)
{
    return observer_alive_at(limits, shim_monotonic_ns());
}

/*
 * GPU time as it would be at the GPU's full-load clock, when the observer publishes
 * how much faster kernels run now (fcsp_limits_device.clock_scale_centi): a throttled
 * tenant's kernels run at a higher clock than they would alone at full load and would
 * otherwise get more work done than their share.  Applied when a launch is charged,
 * not folded into the estimates, so a new scale holds from the next launch on.  A
 * scale never lowers a charge (below 1 it is not trusted, nor above 2), and one that
 * no live observer keeps up to date is ignored.
 */
static uint64_t at_reference_clock(int entry, uint64_t gpu_ns, uint64_t now)
{
    const struct fcsp_limits *limits = shim.limits;
    if (!limits)
        return gpu_ns;
    uint32_t scale = atomic_load_explicit(
        &((struct fcsp_limits_device *)&limits->device[entry])->clock_scale_centi,
        memory_order_relaxed);
    if (likely(scale == 0) || scale <= FCSP_WHOLE_GPU_CENTI || scale > CLOCK_SCALE_MAX ||
        gpu_ns > UINT64_MAX / CLOCK_SCALE_MAX || !observer_alive_at(limits, now))
        return gpu_ns;
    return gpu_ns * scale / FCSP_WHOLE_GPU_CENTI; /* 64-bit: a multiply and a shift */
}

/*
 * MPS caps each process's SMs, not the tenant's: k busy clients at a 30 % thread
 * percentage use 30 % of the SMs each.  While the host sees more than one MPS process of
 * the tenant on this GPU (fcsp_limits_device.mps_processes), a process whose percentage
 * holds its share counts its kernel time at that fraction of the GPU, and the share
 * applies to the tenant's sum as it does on a time-sliced GPU: its processes then run, in
 * all, as much as one would alone.  One process is held by the percentage alone.  The
 * count is the host's last word even if its observer is gone: a strict limit does not
 * lapse with it.  Returns the fraction, 1/100 %, or 0 when the percentage alone holds.
 */
static uint32_t mps_sm_fraction(const struct fcsp_limits *limits, int entry)
{
    uint32_t sms = atomic_load_explicit(&shim_mps_capped_centi, memory_order_relaxed);
    if (likely(sms == 0) || !limits)
        return 0;
    struct fcsp_limits_device *d = (struct fcsp_limits_device *)&limits->device[entry];
    return atomic_load_explicit(&d->mps_processes, memory_order_relaxed) > 1 ? sms : 0;
}

/* A kernel's measured time as the GPU time it costs the tenant: at the reference clock,
 * and at its SMs' fraction of the GPU where MPS processes share the tenant's share. */
static uint64_t gpu_time(int entry, uint64_t kernel_ns, uint64_t now)
{
    uint64_t ns = at_reference_clock(entry, kernel_ns, now);
    uint32_t sms = mps_sm_fraction(shim.limits, entry);
    if (likely(sms == 0) || ns > UINT64_MAX / FCSP_WHOLE_GPU_CENTI)
        return ns;
    return ns * sms / FCSP_WHOLE_GPU_CENTI;
}

static uint32_t env_cap(int ordinal)
{
    uint32_t cap = ordinal >= 0 && ordinal < (int)FCSP_MAX_DEVICES ? shim_env.sm_centi[ordinal] : 0;
    return cap ? cap : FCSP_WHOLE_GPU_CENTI;
}

/*
 * Slot entry `entry`, CUDA ordinal `ordinal`.  Common case: two plain loads
 * from the same cache line of the limits file.  The heartbeat is read only
 * when the observer granted more than the request.
 */
static uint32_t share_in_force(int entry, int ordinal)
{
    uint32_t cap = env_cap(ordinal);
    const struct fcsp_limits *limits = shim.limits;
    if (!limits)
        return cap;
    /* none: no limit; an MPS client whose thread percentage is its share: the hardware
     * holds it (mps.c), unless the tenant runs several (mps_sm_fraction) */
    if (unlikely(limits->isolation_mode == FCSP_MODE_NONE))
        return cap;
    if (unlikely(atomic_load_explicit(&shim_mps_capped_centi, memory_order_relaxed)) &&
        !mps_sm_fraction(limits, entry))
        return cap;
    struct fcsp_limits_device *d = (struct fcsp_limits_device *)&limits->device[entry];
    uint32_t share = atomic_load_explicit(&d->sm_effective_centi, memory_order_relaxed);
    uint32_t requested = d->sm_requested_centi;
    if (unlikely(share > requested || share == 0)) {
        if (share == 0 || !observer_alive(limits))
            share = requested;
    }
    if (share == 0) /* a slot written without any compute share: not limited */
        share = FCSP_WHOLE_GPU_CENTI;
    return share < cap ? share : cap;
}

/* ---- per-thread counters, flushed in batches ---------------------------------- */

struct thread_acc {
    int entry;
    uint32_t launches;
    uint64_t busy_ns;
    uint64_t busy_sq;
    uint64_t tokens;
};
static TLS struct thread_acc acc = {.entry = -1};

/*
 * demand_centi: over windows of DEMAND_WINDOW_NS, the GPU time admitted
 * divided by the time the tenant's threads were not waiting for their share,
 * i.e. the share it would have used had it not been throttled.  One process
 * per window wins the CAS on the window start and publishes it.
 */
static void update_demand(struct fcsp_usage_device *u, uint64_t now)
{
    uint64_t start = atomic_load_explicit(&u->demand_window_ns, memory_order_relaxed);
    if (now - start < DEMAND_WINDOW_NS ||
        !atomic_compare_exchange_strong_explicit(&u->demand_window_ns, &start, now,
                                                 memory_order_relaxed, memory_order_relaxed))
        return;
    uint64_t busy = atomic_load_explicit(&u->busy_ns, memory_order_relaxed);
    uint64_t throttled = atomic_load_explicit(&u->throttled_ns, memory_order_relaxed);
    uint64_t d_busy = busy - atomic_exchange_explicit(&u->demand_busy_ns, busy,
                                                      memory_order_relaxed);
    uint64_t d_thr = throttled - atomic_exchange_explicit(&u->demand_throttled_ns, throttled,
                                                          memory_order_relaxed);
    uint64_t span = now - start;
    if (start == 0 || span > 10 * DEMAND_WINDOW_NS) /* first window, or after a long idle */
        span = DEMAND_WINDOW_NS;
    uint64_t running = d_thr < span - span / 20 ? span - d_thr : span / 20;
    uint64_t demand = (uint64_t)((unsigned __int128)d_busy * FCSP_WHOLE_GPU_CENTI / running);
    atomic_store_explicit(&u->demand_centi,
                          demand < FCSP_WHOLE_GPU_CENTI ? demand : FCSP_WHOLE_GPU_CENTI,
                          memory_order_relaxed);
    atomic_store_explicit(&shim.usage->heartbeat_ns, now, memory_order_relaxed);
}

static void flush(uint64_t now)
{
    if (acc.entry < 0)
        return;
    struct fcsp_usage_device *u = &shim.usage->device[acc.entry];
    if (acc.busy_ns) {
        atomic_fetch_add_explicit(&u->busy_ns, acc.busy_ns, memory_order_relaxed);
        atomic_fetch_add_explicit(&u->busy_sq, acc.busy_sq, memory_order_relaxed);
    }
    if (acc.tokens)
        atomic_fetch_add_explicit(&u->tokens_used, acc.tokens, memory_order_relaxed);
    acc.busy_ns = acc.busy_sq = acc.tokens = 0;
    if (now)
        update_demand(u, now);
}

void shim_compute_thread_flush(void)
{
    if (shim.active)
        flush(shim_monotonic_ns());
}

/*
 * What a measurement says about launches already charged (calib.h): a correction (plain
 * add, or give back) or the time a kernel of unknown cost held the GPU since held_from,
 * charged as a launch made then: base = max(tat, held_from), so a tenant idle before it
 * gets no more credit than a launch then would have had.  busy_ns and tokens_used only
 * grow: they are counters the observer reads in differences.
 */
static void true_up(const struct calib_true_up *up)
{
    int entry = up->entry;
    int64_t gpu_ns = up->gpu_ns;
    if (entry < 0 || !shim.active || gpu_ns == 0)
        return;
    uint32_t share = share_in_force(entry, entry); /* entry == ordinal unless UUID-mapped */
    if (share >= FCSP_WHOLE_GPU_CENTI)
        return;
    uint64_t now = shim_monotonic_ns();
    gpu_ns = gpu_ns > 0 ? (int64_t)gpu_time(entry, (uint64_t)gpu_ns, now)
                        : -(int64_t)gpu_time(entry, (uint64_t)-gpu_ns, now);
    int64_t tokens = gpu_ns * (int64_t)FCSP_WHOLE_GPU_CENTI / (int64_t)share;
    struct fcsp_usage_device *u = &shim.usage->device[entry];
    if (up->held_from_ns) {
        uint64_t tat = atomic_load_explicit(&u->tat_ns, memory_order_relaxed);
        uint64_t base;
        do {
            base = tat > up->held_from_ns ? tat : up->held_from_ns;
        } while (!atomic_compare_exchange_weak_explicit(&u->tat_ns, &tat,
                                                        base + (uint64_t)tokens,
                                                        memory_order_relaxed,
                                                        memory_order_relaxed));
    } else {
        atomic_fetch_add_explicit(&u->tat_ns, (uint64_t)tokens, memory_order_relaxed);
    }
    if (gpu_ns > 0) {
        atomic_fetch_add_explicit(&u->busy_ns, (uint64_t)gpu_ns, memory_order_relaxed);
        atomic_fetch_add_explicit(&u->tokens_used, (uint64_t)tokens, memory_order_relaxed);
    }
}

/* Fold finished measurements into the estimates, and true up what they correct. */
static void poll_calibration(enum calib_poll how)
{
    struct calib_true_up up[CALIB_MAX_TRUE_UPS];
    unsigned n = shim_calib_poll(up, how);
    for (unsigned i = 0; i < n; i++)
        true_up(&up[i]);
}

static void account(int entry, uint64_t cost, uint64_t tokens, uint64_t now)
{
    if (unlikely(acc.entry != entry)) {
        flush(0);
        acc.entry = entry;
    }
    acc.busy_ns += cost;
    acc.busy_sq += (cost >> 10) * (cost >> 10);
    acc.tokens += tokens;
    if (unlikely(++acc.launches >= FLUSH_EVERY)) {
        acc.launches = 0;
        flush(now);
        if (shim_calib_pending())
            poll_calibration(CALIB_POLL_TRY);
    }
}

/* ---- waiting for the share ---------------------------------------------------- */

static void sleep_until(uint64_t deadline)
{
    struct timespec ts = {(time_t)(deadline / 1000000000u), (long)(deadline % 1000000000u)};
    /* EINTR: the caller's loop re-reads the clock and sleeps again. */
    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL);
}

/*
 * Sleep until `deadline`, in chunks, re-reading the share after each: a
 * share raised to 100 % ends the wait; another change rescales what is left
 * of it and this launch's own reservation in tat.  Never spins, holds no lock.
 */
static void wait_for_share(struct fcsp_usage_device *u, int entry, int ordinal,
                           uint64_t deadline, uint32_t share, uint64_t cost, uint64_t *tokens,
                           uint64_t now)
{
    flush(now); /* the observer sees this thread's work before it sees the wait */
    shim_calib_run_close(); /* the stream may drain meanwhile */
    while (now < deadline) {
        uint64_t until = deadline - now > WAIT_CHUNK_NS ? now + WAIT_CHUNK_NS : deadline;
        sleep_until(until);
        uint64_t woke = shim_monotonic_ns();
        /*
         * Report the wait as it goes, not when it ends: a tenant whose launches are all
         * waiting must not look idle to the observer, which would cut its share and
         * lengthen the very wait it is in.
         */
        atomic_fetch_add_explicit(&u->throttled_ns, woke - now, memory_order_relaxed);
        now = woke;
        uint32_t current = share_in_force(entry, ordinal);
        if (likely(current == share))
            continue;
        if (current >= FCSP_WHOLE_GPU_CENTI)
            break;
        if (deadline > now)
            deadline = now + (uint64_t)((unsigned __int128)(deadline - now) * share / current);
        uint64_t again = cost * FCSP_WHOLE_GPU_CENTI / current;
        atomic_fetch_add_explicit(&u->tat_ns, again - *tokens, memory_order_relaxed);
        *tokens = again;
        share = current;
    }
    if (shim_calib_pending()) /* measurements that finished while we slept */
        poll_calibration(CALIB_POLL_TRY);
}

/* ---- turns ------------------------------------------------------------------------ */

struct turn {
    uint64_t cycle, start, length; /* ns */
};

/* The tenant's window on this device, if the observer publishes one and is alive. */
static bool turn_in_force(int entry, uint64_t now, struct turn *t)
{
    const struct fcsp_limits *limits = shim.limits;
    if (!limits)
        return false;
    uint64_t word = atomic_load_explicit(
        &((struct fcsp_limits_device *)&limits->device[entry])->turn, memory_order_relaxed);
    if (likely(word == 0) || !observer_alive_at(limits, now))
        return false;
    t->cycle = (word & TURN_MASK) * 1000;
    t->start = (word >> FCSP_TURN_BITS & TURN_MASK) * 1000;
    t->length = (word >> 2 * FCSP_TURN_BITS & TURN_MASK) * 1000;
    return t->length > 0 && t->length <= t->cycle && t->start < t->cycle;
}

/*
 * The opening of the window a launch at `now` goes into: the last one, or the next if it
 * opens within TURN_LEAD_NS.  The lead covers the time from a launch call to its kernel
 * running (the thread waking, the call, the device switching contexts); without it the
 * GPU would sit idle at every change of turn, running neither tenant's work.
 */
static uint64_t window_opened(const struct turn *t, uint64_t now)
{
    uint64_t at = now + TURN_LEAD_NS;
    return at - (at % t->cycle + t->cycle - t->start) % t->cycle;
}

/*
 * How much before its window's end the tenant stops booking.  Booking counts the tenant's
 * estimated GPU time from the launch on, as if the device ran its work at once and alone;
 * on a time-sliced GPU work left over from a neighbour's window (or the tenant's own
 * backlog when turns begin) runs interleaved with it, slower, and so past the window into
 * the neighbour's, which then runs late and slow in turn: each tenant's work would keep
 * overlapping the other's.  So a thread that finds the window full records a marker after
 * its work and sees when the device reaches it (wait_for_turn); the margin moves half-way
 * towards the overrun (or underrun) it saw, once per window, within plus or minus the
 * window.  It may go below 0 (booking past the end): with kernels that do not divide the
 * window, the tenant's work then ends at the window's end on average, not before it.
 *
 * The work aims to end TURN_LEAD_NS before the window does, when the next tenant's first
 * launches reach the device.  A rise is at most 1/MARGIN_RISE_PARTS of the window: once
 * two tenants' work overlaps, each one's tail waits for the other's time slices and reads
 * as an overrun many times what was booked too much.  Rising by half of such a reading
 * empties the next windows and leaves the tenant short of its share; the cap keeps it
 * close (bench/results/compute-diagnosis.md, section 6).
 */
#define MARGIN_RISE_PARTS 16

static int64_t turn_margin_ns(const struct fcsp_usage_device *u)
{
    return (int64_t)(int32_t)(atomic_load_explicit(&u->turn_margin, memory_order_relaxed) &
                              UINT32_MAX) * 1000;
}

static void learn_margin(struct fcsp_usage_device *u, const struct turn *t, uint64_t closed,
                         uint64_t ended)
{
    uint64_t window = (closed / 1000) & UINT32_MAX;
    int64_t most = (int64_t)t->length;
    int64_t step = ((int64_t)(ended - closed) + (int64_t)TURN_LEAD_NS) / 2;
    if (step > most / MARGIN_RISE_PARTS)
        step = most / MARGIN_RISE_PARTS;
    uint64_t word = atomic_load_explicit(&u->turn_margin, memory_order_relaxed), next;
    do {
        if (word >> 32 == window)
            return; /* another process measured this window */
        int64_t margin = (int64_t)(int32_t)(word & UINT32_MAX) * 1000 + step;
        margin = margin < -most ? -most : margin > most ? most : margin;
        next = window << 32 | (uint32_t)(int32_t)(margin / 1000);
    } while (!atomic_compare_exchange_weak_explicit(&u->turn_margin, &word, next,
                                                    memory_order_relaxed, memory_order_relaxed));
    shim_log(LOG_DEBUG, "turn window's work ended %+lld us from its end; margin %d us",
             (long long)((int64_t)(ended - closed) / 1000), (int)(int32_t)(next & UINT32_MAX));
}

/*
 * Book `cost` into the window open at `now`, if it fits; false: wait for the next one.
 * The window's first launch always goes, so that a kernel longer than the window runs.
 */
static bool book(struct fcsp_usage_device *u, const struct turn *t, uint64_t cost, uint64_t now)
{
    uint64_t opened = window_opened(t, now);
    if (now >= opened + t->length)
        return false;
    uint64_t closes = opened + t->length - (uint64_t)turn_margin_ns(u); /* |margin| <= length */
    uint64_t booked = atomic_load_explicit(&u->turn_booked_ns, memory_order_relaxed);
    for (;;) {
        uint64_t from = booked > now ? booked : now;
        if (from < opened) /* launched in the lead: runs once the window opens */
            from = opened;
        if (booked > opened && from + cost / 2 > closes)
            return false;
        if (atomic_compare_exchange_weak_explicit(&u->turn_booked_ns, &booked, from + cost,
                                                  memory_order_relaxed, memory_order_relaxed))
            return true;
    }
}

/*
 * Has the device reached the marker recorded after the work booked into the window that
 * closed at `closed`?  Then (or a cycle late: a backlog) learn the margin from when: half-way
 * between the poll that last saw it running, at `before`, and this one.
 */
static bool window_work_ended(struct fcsp_usage_device *u, const struct turn *t, uint64_t closed,
                              uint64_t before, uint64_t now)
{
    enum mark_state state = shim_calib_mark_poll();
    if (state == MARK_RUNNING && (int64_t)(now - closed) < (int64_t)t->cycle)
        return false;
    if (state == MARK_RUNNING)
        shim_calib_mark_drop();
    if (state != MARK_LOST)
        learn_margin(u, t, closed, before + (now - before) / 2);
    return true;
}

/*
 * Sleep until this launch is booked into a window, or turns end; a thread that marked
 * the end of its window's work books nothing more before the device has reached it.  Not
 * reported as throttled time: the observer gives turns to tenants that use all of their
 * share, and a tenant that needs less must not look as if it wanted more because it waits
 * for turns.
 */
static void wait_for_turn(struct fcsp_usage_device *u, int entry, struct turn t, uint64_t cost,
                          uint64_t now, CUstream stream, bool ptsz)
{
    if (book(u, &t, cost, now))
        return;
    flush(now); /* what it did in its window counts for its demand before it waits */
    shim_calib_run_close();
    uint64_t closed = window_opened(&t, now) + t.length;
    bool marked = shim_calib_mark(stream, ptsz);
    for (;;) {
        uint64_t next = window_opened(&t, now) + t.cycle - TURN_LEAD_NS;
        uint64_t chunk = marked ? MARK_POLL_NS : WAIT_CHUNK_NS;
        sleep_until(next - now > chunk ? now + chunk : next);
        uint64_t before = now;
        now = shim_monotonic_ns();
        if (marked)
            marked = !window_work_ended(u, &t, closed, before, now);
        if (!turn_in_force(entry, now, &t))
            break;
        if (!marked && book(u, &t, cost, now))
            break;
    }
    if (marked)
        shim_calib_mark_drop();
}

/* ---- kernels of unknown cost ---------------------------------------------------- */

/*
 * A thread of the shim's own charges the kernels of unknown cost while they run, every
 * PROBE_TICK_NS, and trues them up when their measurements land, whether or not the
 * process launches again (it may be waiting for that very kernel).  It sleeps on a futex
 * while no such kernel is in flight, which is nearly always once a program's kernels are
 * known.  Every signal is blocked in it: the application's handlers run in its own threads.
 */
static void *watch_probes(void *unused)
{
    (void)unused;
    prctl(PR_SET_NAME, "fcsp-calib", 0, 0, 0);
    for (;;) {
        shim_calib_wait_for_probe();
        sleep_until(shim_monotonic_ns() + PROBE_TICK_NS);
        poll_calibration(CALIB_POLL_ASIDE);
    }
    return NULL;
}

/*
 * At exit, before the driver is torn down (by atexit handlers registered before this one,
 * such as the CUDA runtime's, and by ELF destructors, which all run after it): wait up to
 * EXIT_SETTLE_NS for the kernels of unknown cost still in flight and charge them, so that
 * the tenant's next process finds them in tat.  A kernel still running after that is
 * charged for the time it ran until then.
 */
static void settle_at_exit(void)
{
    if (!shim.active)
        return;
    uint64_t deadline = shim_monotonic_ns() + EXIT_SETTLE_NS;
    for (;;) {
        poll_calibration(CALIB_POLL_WAIT);
        uint64_t now = shim_monotonic_ns();
        if (!shim_calib_probing() || now >= deadline)
            break;
        sleep_until(deadline - now > PROBE_TICK_NS ? now + PROBE_TICK_NS : deadline);
    }
    poll_calibration(CALIB_POLL_LAST);
}

/*
 * Once a process has measured its first launch: after the launch call, never between a
 * sample's start event and its launch, whose span the thread's creation would stretch;
 * and after the CUDA runtime's initialisation, so that settle_at_exit runs before its
 * teardown.
 */
static _Atomic int watching;

static void start_watching(void)
{
    atexit(settle_at_exit);
    /* Without libpthread (an old glibc, glibc_compat.h): launches and the exit true up. */
    if (!pthread_create || !pthread_attr_init || !pthread_attr_destroy)
        return;
    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0)
        return;
    if (pthread_attr_setstacksize)
        pthread_attr_setstacksize(&attr, WATCHER_STACK);
    sigset_t all, old;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, &old); /* the new thread starts with this mask */
    pthread_t thread;
    if (pthread_create(&thread, &attr, watch_probes, NULL) != 0)
        shim_log(LOG_DEBUG, "no calibration thread: kernels of unknown cost are trued up "
                            "by later launches and at exit");
    sigprocmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
}

void shim_compute_measured(void)
{
    shim_once(&watching, start_watching);
}

/* A forked child has no watcher: it starts its own with its first measurement. */
void shim_compute_after_fork_child(void)
{
    atomic_store_explicit(&watching, 0, memory_order_relaxed);
}

/* ---- the launch path ------------------------------------------------------------ */

static int entry_slow(int *ordinal)
{
    int entry = shim_current_device(ordinal);
    int slow = LAUNCH_SLOW; /* never over LAUNCH_UVM: spill mode looks at every launch */
    if (entry >= 0 && shim_ndevices == 1)
        atomic_compare_exchange_strong_explicit(&shim_launch_entry, &slow, entry,
                                                memory_order_relaxed, memory_order_relaxed);
    return entry;
}

void shim_compute_charge(struct compute_launch *l, int entry, uint64_t key, CUstream stream,
                         bool ptsz)
{
    int ordinal = 0; /* a cached entry means a single device: ordinal 0 */
    if (unlikely(shim_calib_open_run >= 0))
        l->sample = shim_calib_run_next(key, stream, ptsz);
    if (unlikely(entry < 0)) {
        entry = entry_slow(&ordinal);
        if (entry < 0)
            return;
    }
    struct fcsp_usage_device *u = &shim.usage->device[entry];
    atomic_fetch_add_explicit(&u->launches, 1, memory_order_relaxed);
    uint32_t share = share_in_force(entry, ordinal);
    if (share >= FCSP_WHOLE_GPU_CENTI)
        return;

    uint64_t now = shim_monotonic_ns();
    bool sample = false;
    uint32_t index = 0;
    uint64_t cost = gpu_time(entry, shim_calib_cost(key, now, &sample, &index), now);
    uint64_t tokens = cost * FCSP_WHOLE_GPU_CENTI / share;
    struct turn turn;
    bool turns = turn_in_force(entry, now, &turn);
    uint64_t burst = turns && turn.cycle > BURST_NS ? turn.cycle : BURST_NS;
    uint64_t tat = atomic_load_explicit(&u->tat_ns, memory_order_relaxed);
    uint64_t base;
    do {
        base = tat > now ? tat : now;
    } while (!atomic_compare_exchange_weak_explicit(&u->tat_ns, &tat, base + tokens,
                                                    memory_order_relaxed, memory_order_relaxed));
    if (unlikely(base - now > burst)) {
        uint64_t deadline = base - burst;
        if (deadline - now < MIN_SLEEP_NS)
            deadline = now + MIN_SLEEP_NS;
        wait_for_share(u, entry, ordinal, deadline, share, cost, &tokens, now);
        now = shim_monotonic_ns();
        turns = turn_in_force(entry, now, &turn); /* the observer may have moved it meanwhile */
    }
    if (unlikely(turns))
        wait_for_turn(u, entry, turn, cost, now, stream, ptsz);
    account(entry, cost, tokens, now);
    if (unlikely(l->sample >= 0) && shim_calib_open_run < 0)
        l->sample = -1; /* a wait closed the run */
    else if (unlikely(sample) && l->sample < 0)
        l->sample = shim_calib_arm(index, key, entry, stream, ptsz);
}
