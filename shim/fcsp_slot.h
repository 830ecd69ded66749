/*
 * The FCSP tenant slot: the ABI between the host (fcsp-hook, fcsp-observer,
 * fcspctl; Python) and libvgpu.so (C) inside the tenant's processes.
 *
 * This header is the single source of truth for the layout.  The Python
 * mirror lives in fcsp_hook/slot/abi.py and tests/test_abi.py compiles a program
 * that prints every offset and size below and compares them byte for byte.
 *
 * A slot is a directory, /run/fcsp/tenants/<container-id>/ on the host,
 * mounted read-only at /run/fcsp inside the container.  It holds two files,
 * so that the separation between what the host grants and what the tenant
 * reports is enforced by the kernel, not by convention:
 *
 *   limits  struct fcsp_limits, written by the host only.  Inside the
 *           container it is reachable only through the read-only mount, so
 *           a tenant (even root in the container) cannot raise its limits.
 *   usage   struct fcsp_usage, written by the shim, bind-mounted read-write
 *           over its own path.  The host treats every byte of it as
 *           untrusted input.
 *
 * Rules for every field: fixed width, naturally aligned, little endian (the
 * host's), no pointers, no platform-sized types.  Reserved bytes are zero.
 */
#ifndef FCSP_SLOT_H
#define FCSP_SLOT_H

#include <stdalign.h>
#include <stddef.h>
#include <stdint.h>

/*
 * The contract's rules, in one place.  Shares are in 1/100 % (FCSP_WHOLE_GPU_CENTI
 * is the whole GPU); the live words below are rewritten by the host while tenants
 * run, one aligned store each, outside the seqlock, and 0 in each means "not set":
 *
 *   sm_effective_centi     the share in force.  0: unset, run on sm_requested_centi;
 *                          the host writes at least FCSP_MIN_SHARE_CENTI, and the
 *                          request itself while no observer runs.
 *   clock_scale_centi      0: no clock scaling.
 *   turn                   0: no turns.
 *   observer_heartbeat_ns  0: no observer; older than FCSP_OBSERVER_STALE_NS: the
 *                          observer is gone.  Without a live one the shim runs on its
 *                          requests: no share above sm_requested_centi, no clock
 *                          scaling, no turns.
 *
 * A device's memory quota is fcsp_mem_quota(mem_limit_bytes, mem_limit_basis_points,
 * its real total): the smaller of the two that are set; 0: no quota.
 */

/* 100 % in 1/100 %: the whole GPU as a share, the whole real total as a memory quota. */
#define FCSP_WHOLE_GPU_CENTI 10000u
/* The smallest share the host grants: 0 in sm_effective_centi is reserved for "unset". */
#define FCSP_MIN_SHARE_CENTI 1u
/*
 * The observer beats every tick, far more often than this; a heartbeat this old means
 * it is gone, and grants only a live observer keeps correct must not outlive it.
 */
#define FCSP_OBSERVER_STALE_NS 1000000000ull

/*
 * The memory quota in bytes: the smaller of the non-zero of limit_bytes and
 * basis_points (1/100 %) of real_total; 0: no quota.  basis_points of an unknown
 * total (0) count as unset, and FCSP_WHOLE_GPU_CENTI or more is the whole total.
 * The product is split at FCSP_WHOLE_GPU_CENTI so that it cannot overflow 64 bits.
 */
static inline uint64_t fcsp_mem_quota(uint64_t limit_bytes, uint32_t basis_points,
                                      uint64_t real_total)
{
    uint64_t share = real_total;
    if (basis_points < FCSP_WHOLE_GPU_CENTI)
        share = real_total / FCSP_WHOLE_GPU_CENTI * basis_points +
                real_total % FCSP_WHOLE_GPU_CENTI * basis_points / FCSP_WHOLE_GPU_CENTI;
    if (!basis_points || !share)
        return limit_bytes;
    return limit_bytes && limit_bytes < share ? limit_bytes : share;
}

/*
 * FCSP_MEM_SPILL: how many bytes past the quota a tenant may hold in host memory the GPU
 * maps: spill_bytes where set, else spill_centi (1/100 of the quota: FCSP_WHOLE_GPU_CENTI
 * is 1x) of the quota; 0: none.  Split like fcsp_mem_quota so that it cannot overflow.
 */
static inline uint64_t fcsp_mem_spill(uint64_t spill_bytes, uint32_t spill_centi, uint64_t quota)
{
    if (spill_bytes)
        return spill_bytes;
    uint64_t whole = quota / FCSP_WHOLE_GPU_CENTI;
    uint64_t part = quota % FCSP_WHOLE_GPU_CENTI * spill_centi / FCSP_WHOLE_GPU_CENTI;
    if (spill_centi && whole > (UINT64_MAX - part) / spill_centi)
        return UINT64_MAX;
    return whole * spill_centi + part;
}

#define FCSP_LIMITS_MAGIC 0x4c505346u /* "FSPL" as little-endian bytes */
#define FCSP_USAGE_MAGIC 0x55505346u  /* "FSPU" */
#define FCSP_SLOT_VERSION 2u

#define FCSP_MAX_DEVICES 16u
#define FCSP_MAX_PROCS 64u
#define FCSP_UUID_LEN 48u
#define FCSP_ID_LEN 72u
#define FCSP_TENANT_LEN 64u

/* Paths as the container sees them; the host side creates them. */
#define FCSP_SLOT_DIR "/run/fcsp"
#define FCSP_LIMITS_FILE "limits"
#define FCSP_USAGE_FILE "usage"

/* fcsp_limits.isolation_mode */
enum fcsp_isolation_mode {
    FCSP_MODE_NONE = 0,
    FCSP_MODE_BALANCED = 1,
    FCSP_MODE_STRICT = 2,
    FCSP_MODE_ADAPTIVE = 3,
};

/* fcsp_limits.mem_mode */
enum fcsp_mem_mode {
    FCSP_MEM_HARD = 0, /* an allocation past the quota fails */
    FCSP_MEM_SOFT = 1, /* it succeeds, the excess is counted, a warning is logged once */
    /*
     * it is served from unified memory kept in the host's memory (the GPU reads it
     * there) up to fcsp_mem_spill() bytes past the quota, so that the tenant's memory on
     * the device stays within its quota; past that it fails.
     */
    FCSP_MEM_SPILL = 2,
};

/* fcsp_limits.uvm_profile: the named set of the knobs below, as the host resolved them */
enum fcsp_uvm_profile {
    FCSP_UVM_DEFAULT = 0,
    FCSP_UVM_LLM_INFERENCE = 1,
    FCSP_UVM_TRAINING = 2,
};

/* fcsp_limits.evict_policy: which spilled or resident ranges move to the host first */
enum fcsp_evict_policy {
    FCSP_EVICT_LRU = 0,  /* least recently used by a launch */
    FCSP_EVICT_FIFO = 1, /* oldest allocation */
};

/* fcsp_limits.pressure_pct: warning | high << 8 | critical << 16, percent of the quota */
#define FCSP_PRESSURE_BITS 8u

/*
 * The profiles' knobs, for bare processes (BUD_UVM_PROFILE) and the host alike:
 * X(profile, name, warning %, high %, critical %, prefetch MiB, eviction policy).
 */
#define FCSP_UVM_PROFILES(X)                                                     \
    X(FCSP_UVM_DEFAULT, "default", 70, 85, 95, 16, FCSP_EVICT_LRU)               \
    X(FCSP_UVM_LLM_INFERENCE, "llm_inference", 70, 85, 95, 64, FCSP_EVICT_LRU)   \
    X(FCSP_UVM_TRAINING, "training", 80, 90, 97, 32, FCSP_EVICT_FIFO)

/* fcsp_limits.priority */
enum fcsp_priority {
    FCSP_PRIORITY_BEST_EFFORT = 0,
    FCSP_PRIORITY_LATENCY = 1,
};

/* fcsp_limits_device.backend: how the GPU's time is shared between tenants */
enum fcsp_backend {
    FCSP_BACKEND_TIMESLICE = 0, /* the driver time-slices contexts; FCSP throttles launches */
    FCSP_BACKEND_MPS = 1,       /* the tenant is a client of FCSP's MPS daemon for this GPU */
};

/*
 * With FCSP_BACKEND_MPS the slot directory holds FCSP_MPS_DIR: on the host a
 * directory the observer keeps holding only the daemon's unprivileged `control`
 * socket, mounted there read-only; the shim points CUDA_MPS_PIPE_DIRECTORY at it.
 */
#define FCSP_MPS_DIR "mps"

/* fcsp_limits_device.flags */
#define FCSP_DEV_SELECTED_BY_UUID 0x1u

/* fcsp_limits_device.turn: cycle | start << FCSP_TURN_BITS | length << 2 * FCSP_TURN_BITS */
#define FCSP_TURN_BITS 20u

/*
 * One GPU the container sees, in the order it sees them (entry i is CUDA
 * ordinal i when CUDA_VISIBLE_DEVICES is not set inside the container).
 */
struct fcsp_limits_device {
    char uuid[FCSP_UUID_LEN];      /* "GPU-..." when known, NUL padded */
    int32_t host_index;            /* nvidia<N> minor on the host, -1 if unknown */
    uint32_t flags;                /* FCSP_DEV_* */
    uint64_t mem_limit_bytes;      /* 0: no byte quota (see fcsp_mem_quota) */
    uint32_t mem_limit_basis_points; /* quota as 1/100 % of the real total; 0: none */
    uint32_t sm_requested_centi;   /* requested share, 1/100 %: 4000 = 40 % */
    /*
     * The share in force now, 1/100 %; 0: unset, the request applies.  Written
     * by the observer as a single aligned 32-bit store and read by the shim
     * with one relaxed load, outside the seqlock.
     */
    _Atomic uint32_t sm_effective_centi;
    uint32_t backend;              /* enum fcsp_backend, fixed at prestart */
    /*
     * MPS only: the client's active thread percentage, 1/100 %, fixed at prestart
     * (MPS reads it when a client connects).  A latency tenant gets its share of the
     * SMs; the others on the GPU get what latency tenants have not reserved.
     * 0: the shim derives it from the mode (strict: the share; else 100 %).
     */
    uint32_t mps_threads_centi;
    /*
     * How much faster than its full-load clock the GPU runs now, 1/100 %: 12000 = 20 %
     * faster.  Written by the observer like sm_effective_centi (one aligned store,
     * outside the seqlock) when [observer] clock_normalise is on; 0: no scaling.  The
     * shim multiplies measured kernel times by it, so a share is a share of the work
     * the GPU does at full load rather than of its time.
     */
    _Atomic uint32_t clock_scale_centi;
    /*
     * Turns, time-slicing backend only: while two or more tenants keep the GPU busy the
     * observer gives each a window of a repeating cycle in which it alone launches
     * (switching between busy contexts costs a few percent of the GPU's time, and a
     * kernel's event span then includes the neighbour's slices).  One word, written like
     * sm_effective_centi (one aligned store, outside the seqlock), FCSP_TURN_BITS each:
     * the cycle, the window's start in it and its length, in microseconds; cycles start
     * at multiples of their length on CLOCK_MONOTONIC.  0: no turns.
     */
    _Atomic uint64_t turn;
    /* FCSP_MEM_SPILL: how far past the quota, see fcsp_mem_spill(). */
    uint64_t mem_spill_bytes;
    uint32_t mem_spill_centi;
    /*
     * MPS only: how many of the tenant's processes the observer sees as clients of this
     * GPU's MPS server.  MPS caps each client's SMs, not the tenant's: with more than one,
     * a shim whose thread percentage holds its share also counts its kernel time at that
     * percentage against the share (compute.c).  Written like sm_effective_centi (one
     * aligned store, outside the seqlock); 0: none seen (or no observer).
     */
    _Atomic uint32_t mps_processes;
};

struct fcsp_limits {
    uint32_t magic;                /* FCSP_LIMITS_MAGIC */
    uint32_t version;              /* FCSP_SLOT_VERSION */
    uint32_t size;                 /* sizeof(struct fcsp_limits) */
    /*
     * Seqlock over every field below except sm_effective_centi, clock_scale_centi,
     * turn, mps_processes and observer_heartbeat_ns: odd while the host writes, bumped
     * before and after.  Readers retry until they see the same even value twice.
     */
    _Atomic uint32_t seq;
    uint32_t isolation_mode;       /* enum fcsp_isolation_mode */
    uint32_t mem_mode;             /* enum fcsp_mem_mode */
    uint32_t priority;             /* enum fcsp_priority */
    uint32_t device_count;         /* entries in use in device[] */
    uint64_t generation;           /* bumped on every host update */
    /* CLOCK_MONOTONIC ns of the observer's last tick; 0: no observer.  Stale after
     * FCSP_OBSERVER_STALE_NS. */
    _Atomic uint64_t observer_heartbeat_ns;
    char container_id[FCSP_ID_LEN];
    char tenant[FCSP_TENANT_LEN];
    /*
     * The container's init process on the host, written by the hook at
     * prestart (state.pid and field 22 of /proc/<pid>/stat).  The observer
     * reaps the slot once that process is gone or its start time differs
     * (the pid was reused).  0: unknown, the slot is never reaped.
     */
    int32_t init_host_pid;
    uint32_t reserved1;
    uint64_t init_start_time;
    /*
     * Unified memory (FCSP_MEM_SPILL), resolved by the host from the tenant's profile:
     * the profile, its pressure levels (FCSP_PRESSURE_BITS each), the largest prefetch
     * in bytes and the eviction policy.
     */
    uint32_t uvm_profile;          /* enum fcsp_uvm_profile */
    uint32_t pressure_pct;
    uint64_t prefetch_bytes;
    uint32_t evict_policy;         /* enum fcsp_evict_policy */
    uint32_t reserved2;
    uint64_t reserved[4];
    struct fcsp_limits_device device[FCSP_MAX_DEVICES];
};

/* Per GPU, summed over all of the tenant's processes.  Written by the shim. */
struct fcsp_usage_device {
    /*
     * Device memory charged to the tenant.  An allocation reserves its size
     * here with one compare-and-swap that also checks the quota, so two
     * processes racing for the last bytes can never both pass.
     */
    _Atomic uint64_t mem_used_bytes;
    _Atomic uint64_t mem_peak_bytes;
    _Atomic uint64_t mem_soft_excess_bytes; /* soft mode: bytes granted past the quota */
    _Atomic uint64_t mem_rejected;          /* allocations refused (hard mode) */
    _Atomic uint64_t launches;
    _Atomic uint64_t tokens_used;
    _Atomic uint64_t busy_ns;               /* measured GPU time of the tenant's kernels */
    _Atomic uint64_t throttled_ns;          /* time launching threads waited for tokens */
    _Atomic uint64_t demand_centi;          /* share the tenant would use unthrottled, 1/100 % */
    /*
     * Compute limiter state shared by all of the tenant's processes (shim
     * only; the host reads nothing here).  tat_ns is the GCRA theoretical
     * arrival time: the CLOCK_MONOTONIC instant up to which the tenant's
     * admitted launches have used its share.  The demand_* words are the
     * start of the current demand-estimation window and the busy/throttled
     * counters at that start, claimed by one process per window with a CAS.
     */
    _Atomic uint64_t tat_ns;
    _Atomic uint64_t demand_window_ns;
    _Atomic uint64_t demand_busy_ns;
    _Atomic uint64_t demand_throttled_ns;
    /* Turns: the CLOCK_MONOTONIC instant the tenant's work booked into its window ends. */
    _Atomic uint64_t turn_booked_ns;
    /*
     * Turns: how much earlier than its window's end the tenant stops booking, learnt
     * from when its work really ended (us, signed, low 32 bits), and the window last
     * measured (its end in us, truncated; high 32 bits): one measurement per window.
     */
    _Atomic uint64_t turn_margin;
    /*
     * The sum over launches of (c >> 10)^2, c the cost admitted in ns (busy_ns sums c):
     * over an interval, its change divided by busy_ns's, both in 1.024 us units, is the
     * mean cost of a launch weighted by GPU time, i.e. the size of the launches that
     * take the tenant's time (fcsp-observer fits turn cycles to it).
     */
    _Atomic uint64_t busy_sq;
    /* FCSP_MEM_SPILL: bytes served past the quota from host memory, and their peak. */
    _Atomic uint64_t mem_spilled_bytes;
    _Atomic uint64_t mem_spill_peak_bytes;
    /* Unified memory the shim moved to the device (prefetch) and to the host (eviction). */
    _Atomic uint64_t mem_migrated_in_bytes;
    _Atomic uint64_t mem_migrated_out_bytes;
};

/* fcsp_usage_proc.state */
enum fcsp_proc_state {
    FCSP_PROC_FREE = 0,
    FCSP_PROC_LIVE = 1,
    FCSP_PROC_REAPING = 2, /* claimed by a reaper, which releases its charge */
};

/* One process of the tenant, claimed by CAS on state. */
struct fcsp_usage_proc {
    _Atomic uint32_t state;        /* enum fcsp_proc_state */
    int32_t pid;                   /* in the container's pid namespace */
    uint64_t start_time;           /* /proc/<pid>/stat field 22, to tell a reused pid */
    _Atomic uint64_t heartbeat_ns; /* CLOCK_MONOTONIC of its last report */
    _Atomic uint64_t mem_used_bytes[FCSP_MAX_DEVICES];
    _Atomic uint64_t mem_spilled_bytes[FCSP_MAX_DEVICES]; /* its share of the device's */
    uint64_t reserved[2];
};

struct fcsp_usage {
    uint32_t magic;                /* FCSP_USAGE_MAGIC */
    uint32_t version;              /* FCSP_SLOT_VERSION */
    uint32_t size;                 /* sizeof(struct fcsp_usage) */
    uint32_t reserved0;
    _Atomic uint64_t heartbeat_ns; /* CLOCK_MONOTONIC of the shim's last report */
    uint64_t reserved[7];
    struct fcsp_usage_device device[FCSP_MAX_DEVICES];
    struct fcsp_usage_proc proc[FCSP_MAX_PROCS];
};

/*
 * The ABI is pinned: a change to any of these numbers is a new
 * FCSP_SLOT_VERSION, and tests/test_abi.py must change with it.
 */
_Static_assert(sizeof(_Atomic uint64_t) == 8 && alignof(_Atomic uint64_t) == 8,
               "64-bit atomics must be plain 8-byte words");
_Static_assert(sizeof(struct fcsp_limits_device) == 112, "fcsp_limits_device size");
_Static_assert(sizeof(struct fcsp_limits) == 2048, "fcsp_limits size");
_Static_assert(offsetof(struct fcsp_limits, seq) == 12, "seq offset");
_Static_assert(offsetof(struct fcsp_limits, device) == 256, "limits device[] offset");
_Static_assert(offsetof(struct fcsp_limits, init_host_pid) == 184, "init_host_pid offset");
_Static_assert(offsetof(struct fcsp_limits, init_start_time) == 192, "init_start_time offset");
_Static_assert(sizeof(struct fcsp_usage_device) == 160, "fcsp_usage_device size");
_Static_assert(offsetof(struct fcsp_usage_device, tat_ns) == 72, "tat_ns offset");
_Static_assert(sizeof(struct fcsp_usage_proc) == 296, "fcsp_usage_proc size");
_Static_assert(offsetof(struct fcsp_usage, device) == 80, "usage device[] offset");
_Static_assert(sizeof(struct fcsp_usage) == 21584, "fcsp_usage size");

#endif /* FCSP_SLOT_H */
