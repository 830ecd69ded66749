/*
 * Spill mode's eviction and prefetch (uvm.c): which of a process's managed ranges live on
 * the device, moved there when a launch uses them and back to the host to make room.
 *
 * Nothing here runs outside spill mode: allocations and frees first test shim_uvm_on(),
 * one relaxed load; kernel launches learn it from the launch word they load anyway
 * (LAUNCH_UVM, shim.h).  The other modes' paths stay as they were.
 */
#ifndef FCSP_SHIM_UVM_H
#define FCSP_SHIM_UVM_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "shim.h"

/* Set while some device of the process is in spill mode (device.c, as limits load). */
extern _Atomic bool shim_uvm_live;

/*
 * Advise a managed range to live on the host (the device reads it there) or on ordinal's
 * device, and to be mapped by that device wherever it is.
 */
CUresult shim_uvm_place(CUdeviceptr base, uint64_t size, int ordinal, bool on_host);

static inline bool shim_uvm_on(void)
{
    return atomic_load_explicit(&shim_uvm_live, memory_order_relaxed);
}

enum uvm_state {
    UVM_RESIDENT = 0, /* preferred location the device, charged to mem_used_bytes */
    UVM_SPILLED = 1,  /* preferred location the host, charged to mem_spilled_bytes */
};

/*
 * A managed allocation made in spill mode, charged as `state`: false when the range table
 * is full (the caller then tracks it as a fixed charge that eviction never moves).
 */
bool shim_uvm_add(uint64_t base, uint64_t size, int ordinal, int entry, CUcontext ctx,
                  enum uvm_state state);
/* Before the range at `base` is freed: forget it; false if it was not registered.  Its
 * charge is then the caller's to release as *state says. */
bool shim_uvm_forget(uint64_t base, enum uvm_state *state);
/* A context is gone: its stream of migrations with it. */
void shim_uvm_forget_context(CUcontext ctx);
/* Before a kernel launch: mark the ranges it uses, shrink to a lowered quota, promote. */
void shim_uvm_before_launch(CUfunction f, void **params, CUstream stream, bool ptsz);
/* Before an allocation in spill mode: shrink to a lowered quota. */
void shim_uvm_fit_quota(int ordinal, int entry);
void shim_uvm_after_fork_child(void);
/* At exit, in spill mode: one info line of what eviction and prefetch did. */
void shim_uvm_report(void);

/*
 * memory.c: move a range's charge between the tenant's two counters (and this process's
 * record, which exit and the reaper release).  Within the quota, resp. the spill bound,
 * unless force (undoing a move that the driver refused).  false: it did not fit.
 */
bool shim_memory_charge_resident(int ordinal, int entry, uint64_t size, bool force);
bool shim_memory_charge_spilled(int ordinal, int entry, uint64_t size, bool force);

#endif
