/* Live allocations and what each was charged (see track.c). */
#ifndef FCSP_SHIM_TRACK_H
#define FCSP_SHIM_TRACK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum track_kind {
    TRACK_DEVPTR = 1, /* cuMemAlloc*, pitch, managed, async and pool allocations */
    TRACK_VMM = 2,    /* cuMemCreate handles */
    TRACK_ARRAY = 3,
    TRACK_MIPMAP = 4,
    TRACK_IPC = 5,    /* cuIpcOpenMemHandle mappings */
    TRACK_SPILL = 6,  /* spill mode: managed memory past the quota, charged as spilled */
    TRACK_UVM = 7,    /* spill mode: managed memory that uvm.c moves; its range says which
                       * counter holds the charge */
};

struct track_hit {
    uint64_t key;
    uint64_t size;
    int entry; /* usage entry the size was charged to */
    enum track_kind kind;
};

int shim_track_init(void); /* also gives a forked child an empty table */
/* 0, or -1 when the table is full (the charge then stays until exit). */
int shim_track_insert(uint64_t key, enum track_kind kind, int entry, uint64_t size, void *ctx);
bool shim_track_remove(uint64_t key, enum track_kind kind, struct track_hit *hit);
/* Remove every entry made in ctx, calling release for each; returns how many. */
size_t shim_track_remove_ctx(void *ctx, void (*release)(const struct track_hit *));

#endif
