/* Interfaces shared by the files of libvgpu.so. */
#ifndef FCSP_SHIM_H
#define FCSP_SHIM_H

/*
 * The driver's own view of cuda.h: it declares every ABI variant of an entry
 * point side by side (cuMemAlloc and cuMemAlloc_v2, cuLaunchKernel and
 * cuLaunchKernel_ptsz), so each hook is type-checked against its variant.
 */
#define __CUDA_API_VERSION_INTERNAL 1
#include <cuda.h>

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "fcsp_slot.h"
#include "glibc_compat.h"
#include "hooks_gen.h"
#include "nvml_api.h"

#define SHIM_EXPORT __attribute__((visibility("default")))
#define TLS __attribute__((tls_model("initial-exec"))) __thread
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

/* ---- dispatch.c: symbol table, the real driver, dlsym ---------------------- */

enum shim_lib { SHIM_LIB_CUDA, SHIM_LIB_NVML, SHIM_LIB_COUNT };

struct shim_sym_info {
    const char *name;
    enum shim_lib lib;
    void *hook; /* our exported function; NULL for entries we only resolve */
};
extern const struct shim_sym_info shim_syms[SYM_COUNT]; /* hooks_gen.c, sorted by name */

/* Real entry points, filled once per library when it is first needed. */
extern _Atomic(void *) shim_real_ptrs[SYM_COUNT];
void *shim_real_slow(enum shim_sym sym);

/* CLOCK_MONOTONIC in ns: vDSO, no system call; the time base the observer shares. */
static inline uint64_t shim_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline void *shim_real(enum shim_sym sym)
{
    void *p = atomic_load_explicit(&shim_real_ptrs[sym], memory_order_acquire);
    return likely(p != NULL) ? p : shim_real_slow(sym);
}

/* The real driver function, with the type of our own hook of the same name. */
#define REAL(sym) ((__typeof__(&sym))shim_real(SYM_##sym))

/* Our hook for a pointer the real driver handed out, or p itself. */
void *shim_substitute(enum shim_lib lib, void *p);
void shim_dispatch_init(void);
void shim_dispatch_after_fork_child(void);

/* pthread_once and a futex, without libpthread (glibc_compat.h); a once starts at 0. */
void shim_once(_Atomic int *state, void (*fn)(void));
void shim_once_after_fork_child(_Atomic int *state);
void shim_futex_wait(_Atomic int *word, int value);
void shim_futex_wake(_Atomic int *word);

/* ---- state shared by the hooks --------------------------------------------- */

/*
 * Spill mode's performance knobs (not limits): the slot's profile, or BUD_UVM_PROFILE's
 * for a bare process, with single knobs overridden by BUD_UVM_PRESSURE_*_PCT and
 * BUD_PREFETCH_*.  Kept for prefetching and eviction.
 */
struct shim_uvm {
    uint32_t profile;        /* enum fcsp_uvm_profile */
    uint8_t pressure_pct[3]; /* warning, high, critical: percent of the quota, rising */
    uint64_t prefetch_bytes; /* the largest range moved back to the device at once; 0: none */
    uint32_t evict_policy;   /* enum fcsp_evict_policy */
};

struct shim_state {
    /*
     * Set once in the constructor, before any other thread can exist.  false:
     * no slot and no BUD_* limit, every hook is a straight call to the driver
     * and dlsym/cuGetProcAddress hand out the driver's own pointers.
     */
    bool active;
    bool have_slot;
    const struct fcsp_limits *limits; /* NULL without a slot */
    struct fcsp_usage *usage;         /* the slot's, or a private one for BUD_* only */
    _Atomic(struct fcsp_usage_proc *) proc; /* this process's record, claimed lazily */
    _Atomic bool exiting;             /* charges released by the destructor */
    struct shim_uvm uvm;              /* set once in the constructor (device.c) */
};
extern struct shim_state shim;

/* ---- log.c ------------------------------------------------------------------ */

enum shim_log_level { LOG_ERROR = 0, LOG_WARN = 1, LOG_INFO = 2, LOG_DEBUG = 3 };
void shim_log_init(void);
void shim_log(enum shim_log_level level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* ---- env.c: BUD_* variables, read once ----------------------------------- */

struct shim_env_limit {
    uint64_t bytes;         /* 0: none */
    uint32_t basis_points;  /* 1/100 % of the real total; 0: none */
};

/* A spill bound: bytes, else a multiple of the quota in 1/100 (see fcsp_mem_spill). */
struct shim_env_spill {
    uint64_t bytes;
    uint32_t centi; /* FCSP_WHOLE_GPU_CENTI: 1x; both 0: unset */
};

struct shim_env {
    struct shim_env_limit dev[FCSP_MAX_DEVICES]; /* BUD_MEMORY_LIMIT_DEV<n>, else BUD_MEMORY_LIMIT */
    bool any_limit;
    /* -1: unset, else enum fcsp_mem_mode: BUD_MEMORY_LIMIT_MODE and BUD_UVM_ENABLED=1, the
     * stricter of the two */
    int mode;
    bool uvm_off;                  /* BUD_UVM_ENABLED=0: spill mode becomes hard */
    struct shim_env_spill uvm_max; /* BUD_UVM_MAX */
    /* BUD_SM_LIMIT_DEV<n>, else BUD_SM_LIMIT, in 1/100 %; 0: none.  Only ever lowers a share. */
    uint32_t sm_centi[FCSP_MAX_DEVICES];
    /* Unified-memory knobs; -1 or 0: unset. */
    int uvm_profile;             /* BUD_UVM_PROFILE, a bare process's only */
    uint8_t pressure_pct[3];     /* BUD_UVM_PRESSURE_{WARNING,HIGH,CRITICAL}_PCT */
    int prefetch_enabled;        /* BUD_PREFETCH_ENABLED: 0 or 1 */
    uint64_t prefetch_max_bytes; /* BUD_PREFETCH_MAX_SIZE_MB */
};
extern struct shim_env shim_env;
void shim_env_init(void);
/* "512M", "8G", "1.5G", "1073741824", "50%": 0 on success, -1 if malformed. */
int shim_parse_size(const char *text, struct shim_env_limit *out);
/* "30", "30%", "12.5": a share in (0, 100] % as 1/100 %; 0 if malformed. */
uint32_t shim_parse_share(const char *text);
/* "8G" (a size, no percentage) or "1.5x" (0.01x to 100x the quota): 0, or -1 if malformed. */
int shim_parse_spill(const char *text, struct shim_env_spill *out);
/*
 * The memory mode in force: what a slot grants made stricter by BUD_*, never laxer (hard
 * is stricter than spill, spill than soft); without a slot, the process's own choice.
 */
enum fcsp_mem_mode shim_env_mem_mode(bool have_slot, uint32_t granted);
/* The name of a mode, for messages. */
const char *shim_mem_mode_name(enum fcsp_mem_mode mode);
/* Once, in the constructor after the slot is mapped: spill mode's knobs into shim.uvm. */
void shim_uvm_init(void);

/* ---- device.c: CUDA ordinals, slot entries, limits ----------------------- */

/*
 * The launch word, the one load of every launch's common path: >= 0, the usage entry every
 * launch of this process counts against (one device); LAUNCH_SLOW: look the device up
 * (several devices, or not yet known); LAUNCH_OFF: inactive, count nothing; LAUNCH_UVM:
 * spill mode, uvm.c looks at each kernel launch first, then the device is looked up.
 */
#define LAUNCH_SLOW (-1)
#define LAUNCH_OFF (-2)
#define LAUNCH_UVM (-3)
extern _Atomic int shim_launch_entry;
/* Spill mode on or off for launches (device.c, as limits are read); LAUNCH_OFF stays. */
void shim_launch_uvm(bool on);

struct shim_limit {
    uint64_t bytes;          /* 0: no quota */
    enum fcsp_mem_mode mode; /* what an allocation past it gets */
};

/*
 * The quota of slot entry `entry` seen as device `index`, on a device of real_total bytes;
 * with spill, also how many bytes past it spill mode may serve from host memory.
 */
struct shim_limit shim_limit_resolve(int entry, int index, uint64_t real_total, uint64_t *spill);
/* Slot entry for a device UUID string ("GPU-..."), else `index` if the slot has one. */
int shim_slot_entry_for(const char *uuid, int index);

/* After cuInit: map CUDA ordinals to slot entries, cache real totals. */
void shim_devices_init(void);
bool shim_devices_ready(void);
/* Usage index (slot entry) of the current context's device, and its ordinal; -1 if none. */
int shim_current_device(int *ordinal);
int shim_device_entry(int ordinal);
int shim_device_ordinal(CUdevice dev);
/* The quota in force for a CUDA ordinal (follows limits->generation). */
struct shim_limit shim_device_limit(int ordinal);
/* Spill mode: the bytes past that quota which may be served from host memory. */
uint64_t shim_device_spill(int ordinal);
/* The slot's memory mode and unified-memory knobs as the host wrote them; false: no slot. */
bool shim_slot_uvm(uint32_t *mem_mode, struct shim_uvm *granted);
uint64_t shim_device_real_total(int ordinal);
/* Number of CUDA devices the process sees (0 before cuInit). */
extern int shim_ndevices;
/* Bumped when a context is destroyed, so caches keyed by context handle start over. */
extern _Atomic uint32_t shim_context_epoch;

/* ---- slot.c: stat without glibc's stat/fstat symbols (GLIBC_2.33, glibc_compat.h) ---- */

struct stat;
int shim_stat(const char *path, struct stat *st);
int shim_fstat(int fd, struct stat *st);

/* ---- mps.c: the MPS backend, set up before the driver initialises ---------- */

/*
 * The MPS thread percentage in force, 1/100 %, when it holds this process's share
 * (strict, latency): decided when CUDA initialises, 0 until then and otherwise.
 */
extern _Atomic uint32_t shim_mps_capped_centi;
void shim_mps_init(const struct fcsp_limits *limits, const char *slot_dir);
/* Right before the driver reads CUDA_MPS_*: in cuInit, and before it creates a context. */
void shim_mps_before_init(void);
void shim_mps_before_context(void);

/* ---- compute.c (compute.h has the launch-path interface) ------------------- */

void shim_launch_init(void);
void shim_compute_thread_flush(void);
void shim_compute_after_fork_child(void);

/* ---- slot.c: per-process records ------------------------------------------ */

struct fcsp_usage_proc *shim_proc(void);   /* claims on first use */
void shim_reap_dead(void);                  /* release the charge of dead processes */
void shim_process_exit(void);
void shim_after_fork_child(void);

/* ---- memory.c --------------------------------------------------------------- */

void shim_memory_init(void);
void shim_memory_after_fork_child(void);
/* Free bytes and total as the tenant sees them, for usage entry `entry`. */
void shim_memory_view(int entry, struct shim_limit limit, uint64_t real_free,
                      uint64_t real_total, uint64_t *free_out, uint64_t *total_out);

#endif
