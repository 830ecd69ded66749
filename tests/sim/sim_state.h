/*
 * State shared by the simulated driver and NVML: the devices (from the
 * environment), the device memory every process holds and each device's
 * execution timeline (when it is next free), in a file mapped
 * MAP_SHARED (FCSP_SIM_STATE) so that free memory is system-wide, like on a
 * real GPU.  A process's memory returns when it dies, as with the real driver.
 *
 *   FCSP_SIM_DEVICES    number of devices (default 1, at most 16)
 *   FCSP_SIM_MEM_BYTES  memory per device in bytes (default 16 GiB)
 *   FCSP_SIM_UUIDS      comma-separated GPU-... UUIDs (default derived from the index)
 *   FCSP_SIM_STATE      path of the shared state file (default: private to the process)
 *   FCSP_SIM_CONTEXT_BYTES  device memory a process's first context on a device takes
 *                       (default 0), which NVML counts and the shim does not, as with
 *                       the real driver
 */
#ifndef FCSP_SIM_STATE_H
#define FCSP_SIM_STATE_H

#include <stdint.h>

#define SIM_MAX_DEVICES 16
#define SIM_MAX_PROCS 256

struct sim_config {
    int devices;
    uint64_t mem_bytes;
    unsigned char uuid[SIM_MAX_DEVICES][16];
    char uuid_text[SIM_MAX_DEVICES][48];
    uint64_t wait_counted_ns; /* FCSP_SIM_WAIT_COUNTS_US: waiting NVML counts as running */
};

const struct sim_config *sim_config(void);
/* Bytes in use on dev by every live process. */
uint64_t sim_used(int dev);
/* Take size bytes on dev for this process: 0, or -1 when the device is full. */
int sim_take(int dev, uint64_t size);
void sim_give(int dev, uint64_t size);
/* Live processes holding memory on dev (pid, bytes), as NVML lists them; returns how many
 * there are, filling at most max entries. */
int sim_processes(int dev, uint32_t *pids, uint64_t *used, int max, int mps_only);
/* This process is an MPS client (NVML lists it among the MPS processes too). */
void sim_mark_mps_client(void);
/* This process made a context on dev: the first one takes FCSP_SIM_CONTEXT_BYTES. */
void sim_context(int dev);
/*
 * How much of [from_ns, to_ns) dev's timeline ran each live process's kernels, in percent:
 * returns how many processes ran any, filling at most max entries.
 */
int sim_process_busy(int dev, uint64_t from_ns, uint64_t to_ns, uint32_t *pids, uint32_t *pct,
                     int max);
/* How much of [from_ns, to_ns) dev's timeline ran anyone's kernels, in percent. */
int sim_device_busy(int dev, uint64_t from_ns, uint64_t to_ns);

/* CLOCK_MONOTONIC in ns: the time base of the device timeline, events and the shim. */
uint64_t sim_now_ns(void);
/*
 * Run a kernel of dur_ns on dev's timeline, shared by every process like one
 * GPU time-sliced between contexts: it starts when the device is free, its
 * stream has reached it (ready_ns) and it was launched (now), whichever is
 * last, and holds the device until it ends.  Returns the end.  NVML counts up to
 * wait_counted_ns of the time it waited behind other processes' work as this process's, as
 * the H100's driver counts a context's wait for a neighbour's time slice (at most one).
 */
uint64_t sim_timeline_run(int dev, uint64_t ready_ns, uint64_t dur_ns);

#endif
