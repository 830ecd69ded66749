/* The shim's view of its tenant slot (see fcsp_slot.h for the layout). */
#ifndef FCSP_SHIM_SLOT_H
#define FCSP_SHIM_SLOT_H

#include "fcsp_slot.h"

struct shim_slot {
    const struct fcsp_limits *limits; /* read-only mapping; NULL without a slot */
    struct fcsp_usage *usage;         /* read-write mapping; NULL without a slot */
};

/*
 * Map the slot found in dir (FCSP_SLOT_DIR inside a container).  Returns 0 on
 * success, -1 when there is no usable slot, with a reason in err.
 */
int shim_slot_open(struct shim_slot *slot, const char *dir, const char **err);

#endif
