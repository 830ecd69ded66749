/*
 * The tenant slot: mapping and validating it, and the per-process records
 * in its usage file.
 *
 * A process claims a record when the library loads (and a forked child when
 * it starts), so the observer sees every process of the tenant.  Claiming
 * first recycles the records of dead processes, so only FCSP_MAX_PROCS live
 * processes at once can exhaust the table; past that a process keeps a
 * private record (its charge is then not reclaimable after SIGKILL, and a
 * warning says so).  The record carries the process's charge per device
 * (device memory, and what spill mode served from host memory), so that
 * whoever finds it dead (kill(pid, 0) == ESRCH, a zombie, or a reused
 * pid with another start time) can give its charge back: the owner cannot,
 * after SIGKILL.  Claims and reaps are compare-and-swaps on the record's
 * state, so two reapers never release the same charge twice.
 */
#include "slot.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "shim.h"

/*
 * The kernel's stat system calls: glibc >= 2.33 exports stat/fstat as GLIBC_2.33
 * symbols that older images lack, and before 2.33 they were header wrappers.  On
 * x86_64 and aarch64 the kernel's struct stat is glibc's.
 */
int shim_stat(const char *path, struct stat *st)
{
    return (int)syscall(SYS_newfstatat, AT_FDCWD, path, st, 0);
}

int shim_fstat(int fd, struct stat *st)
{
    return (int)syscall(SYS_fstat, fd, st);
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
}
#define cleanup_fd __attribute__((cleanup(close_fd)))

static void *map_file(const char *dir, const char *name, size_t size, int writable,
                      const char **err)
{
    char path[512];
    if (snprintf(path, sizeof(path), "%s/%s", dir, name) >= (int)sizeof(path)) {
        *err = "slot path too long";
        return NULL;
    }
    cleanup_fd int fd = open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) {
        *err = errno == ENOENT ? "no slot" : "cannot open slot file";
        return NULL;
    }
    struct stat st;
    if (shim_fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || (size_t)st.st_size < size) {
        *err = "slot file has the wrong size";
        return NULL;
    }
    void *p = mmap(NULL, size, writable ? PROT_READ | PROT_WRITE : PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        *err = "cannot map slot file";
        return NULL;
    }
    return p;
}

int shim_slot_open(struct shim_slot *slot, const char *dir, const char **err)
{
    memset(slot, 0, sizeof(*slot));
    const struct fcsp_limits *limits =
        map_file(dir, FCSP_LIMITS_FILE, sizeof(struct fcsp_limits), 0, err);
    if (!limits)
        return -1;
    if (limits->magic != FCSP_LIMITS_MAGIC || limits->version != FCSP_SLOT_VERSION ||
        limits->size != sizeof(struct fcsp_limits)) {
        *err = "limits file has a foreign magic, version or size";
        munmap((void *)limits, sizeof(struct fcsp_limits));
        return -1;
    }
    struct fcsp_usage *usage = map_file(dir, FCSP_USAGE_FILE, sizeof(struct fcsp_usage), 1, err);
    if (!usage) {
        munmap((void *)limits, sizeof(struct fcsp_limits));
        return -1;
    }
    if (usage->magic != FCSP_USAGE_MAGIC || usage->version != FCSP_SLOT_VERSION ||
        usage->size != sizeof(struct fcsp_usage)) {
        *err = "usage file has a foreign magic, version or size";
        munmap((void *)limits, sizeof(struct fcsp_limits));
        munmap(usage, sizeof(struct fcsp_usage));
        return -1;
    }
    slot->limits = limits;
    slot->usage = usage;
    return 0;
}

/* ---- per-process records ------------------------------------------------------ */

/*
 * Field 3 (state) and field 22 (start time) of /proc/<pid>/stat.  Returns -1
 * when the process does not exist.
 */
static int read_proc_stat(pid_t pid, char *state, uint64_t *start)
{
    char path[64], buf[1024];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    cleanup_fd int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    const char *p = strrchr(buf, ')'); /* the command name may hold spaces and parens */
    unsigned long long st = 0;
    if (!p || sscanf(p + 2, "%c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d "
                            "%*d %*d %llu", state, &st) != 2)
        return -1;
    *start = st;
    return 0;
}

static bool process_is_dead(pid_t pid, uint64_t start_time)
{
    if (pid <= 0)
        return true;
    if (kill(pid, 0) < 0 && errno == ESRCH)
        return true;
    char state = '?';
    uint64_t start = 0;
    if (read_proc_stat(pid, &state, &start) < 0)
        return access("/proc/self/stat", F_OK) == 0; /* no /proc: trust kill() */
    /* A zombie has released its GPU memory already; its parent just has not waited. */
    if (state == 'Z' || state == 'X')
        return true;
    return start_time && start != start_time;
}

/* Move a record's share of one counter out of the tenant's total. */
static void give_back(_Atomic uint64_t *share, _Atomic uint64_t *total)
{
    uint64_t bytes = atomic_exchange_explicit(share, 0, memory_order_relaxed);
    if (!bytes)
        return;
    uint64_t held = atomic_load_explicit(total, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(total, &held, held > bytes ? held - bytes : 0,
                                                  memory_order_release, memory_order_relaxed))
        ;
}

/* Give a record's charge (device memory and spill) back to the tenant's totals; the caller
 * owns the record. */
static void release_record(struct fcsp_usage_proc *rec)
{
    for (unsigned d = 0; d < FCSP_MAX_DEVICES; d++) {
        struct fcsp_usage_device *dev = &shim.usage->device[d];
        give_back(&rec->mem_used_bytes[d], &dev->mem_used_bytes);
        give_back(&rec->mem_spilled_bytes[d], &dev->mem_spilled_bytes);
    }
}

static bool try_reap(struct fcsp_usage_proc *rec, pid_t self, uint64_t self_start)
{
    if (atomic_load_explicit(&rec->state, memory_order_acquire) != FCSP_PROC_LIVE)
        return false;
    pid_t pid = rec->pid;
    uint64_t start = rec->start_time;
    /* Our own pid with our start time: a record left by this process before exec(). */
    bool stale_self = pid == self && start == self_start;
    if (!stale_self && (pid == self || !process_is_dead(pid, start)))
        return false;
    uint32_t expected = FCSP_PROC_LIVE;
    if (!atomic_compare_exchange_strong_explicit(&rec->state, &expected, FCSP_PROC_REAPING,
                                                 memory_order_acq_rel, memory_order_relaxed))
        return false;
    /* The record may have been freed and claimed again between our reads: look again. */
    if (rec->pid != pid || rec->start_time != start) {
        atomic_store_explicit(&rec->state, FCSP_PROC_LIVE, memory_order_release);
        return false;
    }
    release_record(rec);
    atomic_store_explicit(&rec->state, FCSP_PROC_FREE, memory_order_release);
    shim_log(LOG_INFO, "released the charge of dead process %d", (int)pid);
    return true;
}

static uint64_t self_start_time(void)
{
    char state;
    uint64_t start = 0;
    return read_proc_stat(getpid(), &state, &start) == 0 ? start : 0;
}

void shim_reap_dead(void)
{
    if (!shim.have_slot)
        return;
    struct fcsp_usage_proc *own = atomic_load_explicit(&shim.proc, memory_order_relaxed);
    pid_t self = getpid();
    for (unsigned i = 0; i < FCSP_MAX_PROCS; i++) {
        struct fcsp_usage_proc *rec = &shim.usage->proc[i];
        if (rec != own)
            try_reap(rec, self, (uint64_t)-1);
    }
}

/*
 * Without a slot (BUD_* only) or with a full table the process still needs a
 * record for its own bookkeeping: this one is private, so nobody can reap it.
 */
static struct fcsp_usage_proc private_record;
static pthread_mutex_t claim_lock = PTHREAD_MUTEX_INITIALIZER;

static struct fcsp_usage_proc *claim_record(void)
{
    if (!shim.have_slot)
        return &private_record;
    pid_t self = getpid();
    uint64_t start = self_start_time();
    for (int pass = 0; pass < 2; pass++) {
        for (unsigned i = 0; i < FCSP_MAX_PROCS; i++) {
            struct fcsp_usage_proc *rec = &shim.usage->proc[i];
            try_reap(rec, self, start);
            uint32_t expected = FCSP_PROC_FREE;
            /* REAPING while we fill it in: reapers only look at LIVE records. */
            if (!atomic_compare_exchange_strong_explicit(&rec->state, &expected,
                                                         FCSP_PROC_REAPING, memory_order_acq_rel,
                                                         memory_order_relaxed))
                continue;
            rec->pid = (int32_t)self;
            rec->start_time = start;
            for (unsigned d = 0; d < FCSP_MAX_DEVICES; d++) {
                atomic_store_explicit(&rec->mem_used_bytes[d], 0, memory_order_relaxed);
                atomic_store_explicit(&rec->mem_spilled_bytes[d], 0, memory_order_relaxed);
            }
            uint64_t now = shim_monotonic_ns();
            atomic_store_explicit(&rec->heartbeat_ns, now, memory_order_relaxed);
            atomic_store_explicit(&shim.usage->heartbeat_ns, now, memory_order_relaxed);
            atomic_store_explicit(&rec->state, FCSP_PROC_LIVE, memory_order_release);
            return rec;
        }
    }
    shim_log(LOG_WARN, "all %u process records of the slot are taken; this process's charge "
                       "will not be released if it is killed", FCSP_MAX_PROCS);
    return &private_record;
}

struct fcsp_usage_proc *shim_proc(void)
{
    struct fcsp_usage_proc *rec = atomic_load_explicit(&shim.proc, memory_order_acquire);
    if (likely(rec != NULL))
        return rec;
    pthread_mutex_lock(&claim_lock);
    rec = atomic_load_explicit(&shim.proc, memory_order_relaxed);
    if (!rec) {
        rec = claim_record();
        atomic_store_explicit(&shim.proc, rec, memory_order_release);
    }
    pthread_mutex_unlock(&claim_lock);
    return rec;
}

void shim_process_exit(void)
{
    if (atomic_exchange(&shim.exiting, true))
        return;
    struct fcsp_usage_proc *rec = atomic_load_explicit(&shim.proc, memory_order_acquire);
    if (!rec)
        return;
    release_record(rec);
    if (rec != &private_record)
        atomic_store_explicit(&rec->state, FCSP_PROC_FREE, memory_order_release);
}

/*
 * The child of fork() shares nothing of the parent's CUDA state: it drops the
 * parent's record pointer (the caller then claims the child's own).
 */
void shim_after_fork_child(void)
{
    pthread_mutex_init(&claim_lock, NULL);
    atomic_store_explicit(&shim.proc, NULL, memory_order_relaxed);
    memset(&private_record, 0, sizeof(private_record));
}
