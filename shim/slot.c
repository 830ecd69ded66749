/* Mapping and validating the tenant slot, and claiming this process's record. */
#include "slot.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

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
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || (size_t)st.st_size < size) {
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

static uint64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Field 22 of /proc/self/stat: with the pid, it names this process uniquely. */
static uint64_t process_start_time(void)
{
    char buf[1024];
    cleanup_fd int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    const char *p = strrchr(buf, ')'); /* the command name may hold spaces */
    unsigned long long start = 0;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %*d "
                            "%*d %*d %llu", &start) != 1)
        return 0;
    return start;
}

void shim_slot_register_process(struct shim_slot *slot)
{
    slot->proc = NULL;
    if (!slot->usage)
        return;
    for (unsigned i = 0; i < FCSP_MAX_PROCS; i++) {
        struct fcsp_usage_proc *rec = &slot->usage->proc[i];
        uint32_t expected = FCSP_PROC_FREE;
        if (!atomic_compare_exchange_strong(&rec->state, &expected, FCSP_PROC_LIVE))
            continue;
        rec->pid = (int32_t)getpid();
        rec->start_time = process_start_time();
        for (unsigned d = 0; d < FCSP_MAX_DEVICES; d++)
            atomic_store_explicit(&rec->mem_used_bytes[d], 0, memory_order_relaxed);
        atomic_store_explicit(&rec->heartbeat_ns, monotonic_ns(), memory_order_release);
        slot->proc = rec;
        return;
    }
}
