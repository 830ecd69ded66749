/* Library entry: find the slot once, before main(), and never in a hot path. */
#include <pthread.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "slot.h"

static struct shim_slot the_slot;

/*
 * Inside a container the hook mounts the slot at FCSP_SLOT_DIR, and nothing
 * in the tenant's environment may point the shim elsewhere (a fake slot would
 * grant any limit).  FCSP_SLOT_DIR in the environment is honoured only where
 * no slot is mounted: bare processes and the GPU-less tests.
 */
static const char *slot_dir(void)
{
    struct stat st;
    if (stat(FCSP_SLOT_DIR "/" FCSP_LIMITS_FILE, &st) == 0)
        return FCSP_SLOT_DIR;
    const char *dir = getenv("FCSP_SLOT_DIR");
    return dir && *dir ? dir : FCSP_SLOT_DIR;
}

static void child_after_fork(void)
{
    shim_slot_register_process(&the_slot);
}

__attribute__((constructor)) static void shim_init(void)
{
    const char *err = NULL;
    if (shim_slot_open(&the_slot, slot_dir(), &err) == 0) {
        shim_slot_register_process(&the_slot);
        pthread_atfork(NULL, NULL, child_after_fork);
    }
}
