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

struct sim_proc {
    _Atomic int32_t pid;
    _Atomic int32_t mps_client; /* announced itself to an MPS control daemon at cuInit */
    _Atomic uint64_t used[SIM_MAX_DEVICES];
};

struct sim_shared {
    struct sim_proc proc[SIM_MAX_PROCS];
    _Atomic uint64_t busy_until[SIM_MAX_DEVICES]; /* CLOCK_MONOTONIC ns */
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

static int alive(pid_t pid)
{
    if (pid <= 0)
        return 0;
    if (kill(pid, 0) < 0 && errno == ESRCH)
        return 0;
    char path[64], buf[512];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *p = strrchr(buf, ')');
    return !(p && (p[2] == 'Z' || p[2] == 'X'));
}

/* This process's entry; a dead process's entry is recycled, as the driver frees its memory. */
static struct sim_proc *my_entry(void)
{
    sim_config();
    pid_t self = getpid();
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
    return end;
}
