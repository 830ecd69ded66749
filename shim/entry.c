/*
 * Library entry: find the slot and read the environment once, before main(),
 * and never in a hot path.  Nothing here touches CUDA: the driver is loaded
 * only when the process itself uses it.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "calib.h"
#include "shim.h"
#include "slot.h"
#include "uvm.h"

struct shim_state shim;


/*
 * Inside a container the hook mounts the slot at FCSP_SLOT_DIR, and nothing
 * in the tenant's environment may point the shim elsewhere (a fake slot would
 * grant any limit).  FCSP_SLOT_DIR in the environment is honoured only where
 * no slot is mounted: bare processes and the GPU-less tests.
 */
static const char *slot_dir(void)
{
    struct stat st;
    if (shim_stat(FCSP_SLOT_DIR "/" FCSP_LIMITS_FILE, &st) == 0)
        return FCSP_SLOT_DIR;
    const char *dir = getenv("FCSP_SLOT_DIR");
    return dir && *dir ? dir : FCSP_SLOT_DIR;
}

/* BUD_* limits without a slot: the same accounting, in memory private to the process. */
static struct fcsp_usage private_usage;

/* A forked child is a process of its own: no inherited record or allocations.  It claims
 * a record of its own when it charges anything. */
static void child_after_fork(void)
{
    shim_dispatch_after_fork_child();
    shim_after_fork_child();
    shim_memory_after_fork_child();
    shim_uvm_after_fork_child();
    shim_calib_after_fork_child();
    shim_compute_after_fork_child();
}

__attribute__((constructor)) static void shim_init(void)
{
    shim_log_init();
    shim_env_init();
    shim_dispatch_init();

    struct shim_slot slot;
    const char *err = NULL;
    const char *dir = slot_dir();
    if (shim_slot_open(&slot, dir, &err) == 0) {
        shim.limits = slot.limits;
        shim.usage = slot.usage;
        shim.have_slot = true;
        shim_log(LOG_DEBUG, "slot %s mapped", dir);
        shim_mps_init(slot.limits, dir);
    } else if (shim_env.any_limit) {
        shim.usage = &private_usage;
        shim_log(LOG_DEBUG, "no slot (%s); BUD_* limits apply to this process", err);
    }
    shim.active = shim.usage != NULL;
    shim_launch_init();
    if (!shim.active)
        return;
    shim_memory_init();
    shim_uvm_init();
    /*
     * The process record is claimed at cuInit (or the first charge), not here: every
     * program of the container loads this library, and shells, tools and non-CUDA workers
     * must not use up the slot's FCSP_MAX_PROCS records that its CUDA processes need.
     */
    pthread_atfork(NULL, NULL, child_after_fork);
}

__attribute__((destructor)) static void shim_fini(void)
{
    if (shim.active) {
        shim_compute_thread_flush(); /* the exiting thread's batched busy time */
        if (shim_uvm_on())
            shim_uvm_report();
        shim_process_exit();
    }
}
