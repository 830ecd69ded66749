/* Shared device-memory state of the simulator (see sim_state.h). */
#include "sim_state.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/*
 * Each process's kernel time on each device, in buckets of BUSY_BUCKET_NS of the
 * timeline (a ring of BUSY_BUCKETS: the last few seconds), for NVML's per-process
 * utilisation.  A bucket holds its number on the timeline and the busy ns in it.
 */
#define BUSY_BUCKET_NS 40000000ull
#define BUSY_BUCKETS 128
#define BUSY_DEVICES 4

struct sim_busy {
    _Atomic uint64_t bucket[BUSY_BUCKETS];
    _Atomic uint64_t ns[BUSY_BUCKETS];
};

struct sim_proc {
    _Atomic int32_t pid;
    _Atomic int32_t mps_client; /* announced itself to an MPS control daemon at cuInit */
    _Atomic uint64_t used[SIM_MAX_DEVICES];
    _Atomic uint32_t contexts; /* bit d: has had a context on device d */
    struct sim_busy busy[BUSY_DEVICES];
};

struct sim_shared {
    struct sim_proc proc[SIM_MAX_PROCS];
    _Atomic uint64_t busy_until[SIM_MAX_DEVICES]; /* CLOCK_MONOTONIC ns */
    struct sim_busy device_busy[BUSY_DEVICES];    /* every process's kernels, as they ran */
};

static struct sim_config config;
static struct sim_shared *shared;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_mutex_t take_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sim_proc *mine;
static pid_t mine_pid;

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static void parse_uuid(const char *text, unsigned char out[16])
{
    int n = 0;
    for (const char *p = text; *p && n < 32; p++) {
        int v = hexval(*p);
        if (p < text + 4 || v < 0) /* skip the "GPU-" prefix and dashes */
            continue;
        if (n % 2 == 0)
            out[n / 2] = (unsigned char)(v << 4);
        else
            out[n / 2] |= (unsigned char)v;
        n++;
    }
}

static void format_uuid(const unsigned char *b, char *out, size_t len)
{
    snprintf(out, len,
             "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
             b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
             b[14], b[15]);
}

static void init(void)
{
    const char *devices = getenv("FCSP_SIM_DEVICES");
    const char *mem = getenv("FCSP_SIM_MEM_BYTES");
    config.devices = devices ? atoi(devices) : 1;
    if (config.devices < 0)
        config.devices = 0;
    if (config.devices > SIM_MAX_DEVICES)
        config.devices = SIM_MAX_DEVICES;
    config.mem_bytes = mem ? strtoull(mem, NULL, 0) : (16ull << 30);
    const char *wait_counts = getenv("FCSP_SIM_WAIT_COUNTS_US");
    config.wait_counted_ns = wait_counts ? strtoull(wait_counts, NULL, 0) * 1000u : 0;
    const char *uuids = getenv("FCSP_SIM_UUIDS");
    for (int d = 0; d < SIM_MAX_DEVICES; d++) {
        unsigned char *u = config.uuid[d];
        memset(u, 0, 16);
        u[0] = 0x5e;
        u[1] = 0x1f;
        u[15] = (unsigned char)d;
    }
    for (int d = 0; uuids && *uuids && d < SIM_MAX_DEVICES; d++) {
        parse_uuid(uuids, config.uuid[d]);
        uuids = strchr(uuids, ',');
        if (!uuids)
            break;
        uuids++;
    }
    for (int d = 0; d < SIM_MAX_DEVICES; d++)
        format_uuid(config.uuid[d], config.uuid_text[d], sizeof(config.uuid_text[d]));

    const char *path = getenv("FCSP_SIM_STATE");
    void *p = MAP_FAILED;
    if (path && *path) {
        int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
        if (fd >= 0 && ftruncate(fd, sizeof(struct sim_shared)) == 0)
            p = mmap(NULL, sizeof(struct sim_shared), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (fd >= 0)
            close(fd);
    }
    if (p == MAP_FAILED)
        p = mmap(NULL, sizeof(struct sim_shared), PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    shared = p;
}

const struct sim_config *sim_config(void)
{
    pthread_once(&once, init);
    return &config;
}

/*
 * Processes are known by their pid on the host, as the real driver reports them to
 * NVML, also from inside a pid namespace of their own: the first NSpid of
 * /proc/self/status (the host's /proc is the one mounted).  A pid is alive while /proc
 * has it and it is not a zombie; kill(pid, 0) would not see host pids from inside a
 * namespace.
 */
static pid_t host_pid(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    pid_t pid = getpid();
    while (f && fgets(line, sizeof(line), f)) {
        if (strncmp(line, "NSpid:", 6) == 0) {
            pid = (pid_t)atoi(line + 6);
            break;
        }
    }
    if (f)
        fclose(f);
    return pid;
}

static int alive(pid_t pid)
{
    if (pid <= 0)
        return 0;
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno != ENOENT && errno != ESRCH;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 1;
    buf[n] = '\0';
    const char *p = strrchr(buf, ')');
    return !(p && (p[2] == 'Z' || p[2] == 'X'));
}

/* This process's entry; a dead process's entry is recycled, as the driver frees its memory. */
static struct sim_proc *my_entry(void)
{
    sim_config();
    static pid_t cached_getpid, cached_host;
    if (getpid() != cached_getpid) { /* a fork: a new process */
        cached_getpid = getpid();
        cached_host = host_pid();
    }
    pid_t self = cached_host;
    if (mine && mine_pid == self)
        return mine;
    for (int i = 0; i < SIM_MAX_PROCS; i++) {
        struct sim_proc *e = &shared->proc[i];
        int32_t pid = atomic_load(&e->pid);
        if (pid != 0 && alive(pid))
            continue;
        if (!atomic_compare_exchange_strong(&e->pid, &pid, -1))
            continue;
        for (int d = 0; d < SIM_MAX_DEVICES; d++)
            atomic_store(&e->used[d], 0);
        for (int d = 0; d < BUSY_DEVICES; d++)
            for (int b = 0; b < BUSY_BUCKETS; b++)
                atomic_store(&e->busy[d].bucket[b], 0);
        atomic_store(&e->contexts, 0);
        atomic_store(&e->mps_client, 0);
        atomic_store(&e->pid, self);
        mine = e;
        mine_pid = self;
        return e;
    }
    abort(); /* more than SIM_MAX_PROCS live processes: a broken test */
}

uint64_t sim_used(int dev)
{
    sim_config();
    uint64_t used = 0;
    for (int i = 0; i < SIM_MAX_PROCS; i++) {
        struct sim_proc *e = &shared->proc[i];
        int32_t pid = atomic_load(&e->pid);
        if (pid > 0 && alive(pid))
            used += atomic_load(&e->used[dev]);
    }
    return used;
}

void sim_mark_mps_client(void)
{
    atomic_store(&my_entry()->mps_client, 1);
}

void sim_context(int dev)
{
    const char *text = getenv("FCSP_SIM_CONTEXT_BYTES");
    uint64_t bytes = text ? strtoull(text, NULL, 0) : 0;
    struct sim_proc *e = my_entry();
    uint32_t bit = 1u << dev;
    if (!bytes || (atomic_fetch_or(&e->contexts, bit) & bit))
        return;
    pthread_mutex_lock(&take_lock);
    atomic_fetch_add(&e->used[dev], bytes); /* the driver's own: never refused here */
    pthread_mutex_unlock(&take_lock);
}

static void add_busy(struct sim_busy *busy, uint64_t start, uint64_t end)
{
    for (uint64_t n = start / BUSY_BUCKET_NS; n * BUSY_BUCKET_NS < end; n++) {
        uint64_t from = n * BUSY_BUCKET_NS > start ? n * BUSY_BUCKET_NS : start;
        uint64_t to = (n + 1) * BUSY_BUCKET_NS < end ? (n + 1) * BUSY_BUCKET_NS : end;
        int slot = (int)(n % BUSY_BUCKETS);
        uint64_t held = atomic_load(&busy->bucket[slot]);
        if (held != n + 1 && atomic_compare_exchange_strong(&busy->bucket[slot], &held, n + 1))
            atomic_store(&busy->ns[slot], 0);
        atomic_fetch_add(&busy->ns[slot], to - from);
    }
}

/* Clips [*from_ns, *to_ns) to what the rings still hold and has passed: 0 if nothing is left. */
static int busy_span(int dev, uint64_t *from_ns, uint64_t *to_ns)
{
    sim_config();
    uint64_t now = sim_now_ns();
    if (*to_ns > now)
        *to_ns = now;
    if (now - *from_ns > (BUSY_BUCKETS - 1) * BUSY_BUCKET_NS)
        *from_ns = now - (BUSY_BUCKETS - 1) * BUSY_BUCKET_NS;
    return dev >= 0 && dev < BUSY_DEVICES && *from_ns < *to_ns;
}

static uint64_t busy_ns(struct sim_busy *busy, uint64_t from_ns, uint64_t to_ns)
{
    uint64_t ns = 0;
    for (uint64_t b = from_ns / BUSY_BUCKET_NS; b * BUSY_BUCKET_NS < to_ns; b++) {
        int slot = (int)(b % BUSY_BUCKETS);
        if (atomic_load(&busy->bucket[slot]) == b + 1)
            ns += atomic_load(&busy->ns[slot]);
    }
    return ns;
}

int sim_device_busy(int dev, uint64_t from_ns, uint64_t to_ns)
{
    if (!busy_span(dev, &from_ns, &to_ns))
        return 0;
    uint64_t p = busy_ns(&shared->device_busy[dev], from_ns, to_ns) * 100 / (to_ns - from_ns);
    return p > 100 ? 100 : (int)p;
}

int sim_process_busy(int dev, uint64_t from_ns, uint64_t to_ns, uint32_t *pids, uint32_t *pct,
                     int max)
{
    if (!busy_span(dev, &from_ns, &to_ns))
        return 0;
    int n = 0;
    for (int i = 0; i < SIM_MAX_PROCS; i++) {
        struct sim_proc *e = &shared->proc[i];
        int32_t pid = atomic_load(&e->pid);
        if (pid <= 0 || !alive(pid))
            continue;
        uint64_t ns = busy_ns(&e->busy[dev], from_ns, to_ns);
        if (!ns)
            continue;
        if (n < max) {
            uint64_t p = ns * 100 / (to_ns - from_ns);
            pids[n] = (uint32_t)pid;
            pct[n] = (uint32_t)(p > 100 ? 100 : p);
        }
        n++;
    }
    return n;
}

int sim_processes(int dev, uint32_t *pids, uint64_t *used, int max, int mps_only)
{
    sim_config();
    int n = 0;
    for (int i = 0; i < SIM_MAX_PROCS; i++) {
        struct sim_proc *e = &shared->proc[i];
        int32_t pid = atomic_load(&e->pid);
        uint64_t bytes = atomic_load(&e->used[dev]);
        if (pid <= 0 || !bytes || !alive(pid) || (mps_only && !atomic_load(&e->mps_client)))
            continue;
        if (n < max) {
            pids[n] = (uint32_t)pid;
            used[n] = bytes;
        }
        n++;
    }
    return n;
}

int sim_take(int dev, uint64_t size)
{
    struct sim_proc *e = my_entry();
    pthread_mutex_lock(&take_lock);
    uint64_t used = sim_used(dev);
    int ok = used + size >= used && used + size <= config.mem_bytes;
    if (ok)
        atomic_fetch_add(&e->used[dev], size);
    pthread_mutex_unlock(&take_lock);
    return ok ? 0 : -1;
}

void sim_give(int dev, uint64_t size)
{
    struct sim_proc *e = my_entry();
    uint64_t used = atomic_load(&e->used[dev]);
    atomic_store(&e->used[dev], used > size ? used - size : 0);
}

uint64_t sim_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

uint64_t sim_timeline_run(int dev, uint64_t ready_ns, uint64_t dur_ns)
{
    static _Atomic uint64_t own_end[SIM_MAX_DEVICES]; /* this process's last kernel's end */
    sim_config();
    _Atomic uint64_t *busy = &shared->busy_until[dev];
    uint64_t now = sim_now_ns();
    uint64_t free_at = atomic_load(busy), end;
    do {
        uint64_t start = free_at > now ? free_at : now;
        if (ready_ns > start)
            start = ready_ns;
        end = start + dur_ns;
    } while (!atomic_compare_exchange_weak(busy, &free_at, end));
    if (!dur_ns)
        return end;
    uint64_t counted = end - dur_ns;
    if (config.wait_counted_ns) {
        uint64_t waited_from = now > ready_ns ? now : ready_ns;
        uint64_t mine = atomic_exchange(&own_end[dev], end);
        if (mine > waited_from)
            waited_from = mine; /* behind its own work: not waiting on a neighbour */
        if (counted > waited_from + config.wait_counted_ns)
            waited_from = counted - config.wait_counted_ns;
        if (waited_from < counted)
            counted = waited_from;
    }
    if (dev < BUSY_DEVICES) {
        add_busy(&my_entry()->busy[dev], counted, end);
        add_busy(&shared->device_busy[dev], end - dur_ns, end);
    }
    return end;
}
