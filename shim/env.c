/*
 * BUD_* environment variables: limits for a bare process, and a way to lower
 * (never raise) what a slot grants.  Read once in the constructor: the hot
 * paths never call getenv.  A malformed value logs one warning naming the
 * variable and the form it takes, and is ignored.
 *
 * Memory modes, from the strictest: hard (refuse past the quota), spill (serve
 * what does not fit from host memory, up to a bound), soft (allow, count).
 * BUD_MEMORY_LIMIT_MODE=hard|spill|soft and BUD_UVM_ENABLED=1 (spill) pick one
 * for a bare process; inside a slot they may only move towards hard.
 * BUD_UVM_ENABLED=0 turns spill into hard.  BUD_UVM_MAX (8G, or 1.5x the
 * quota) bounds the spill: it only lowers a spill slot's bound, and a bare
 * process (or a soft slot moved to spill) gets 1x its quota without it.
 *
 * BUD_UVM_PROFILE (a bare process's; a slot's profile is the host's),
 * BUD_UVM_PRESSURE_{WARNING,HIGH,CRITICAL}_PCT, BUD_PREFETCH_ENABLED and
 * BUD_PREFETCH_MAX_SIZE_MB are performance knobs, not limits: they override
 * the profile's in a slot too (shim_uvm_init).
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "shim.h"

struct shim_env shim_env = {.mode = -1, .uvm_profile = -1, .prefetch_enabled = -1};

/* Binary multiples, with or without "i"/"B": 8G = 8Gi = 8GiB = 8 * 2^30. */
static int unit_shift(const char *s, unsigned *shift)
{
    static const char letters[] = "KMGTP";
    *shift = 0;
    if (!*s || strcasecmp(s, "B") == 0)
        return 0;
    const char *p = strchr(letters, toupper((unsigned char)*s));
    if (!p)
        return -1;
    *shift = 10u * (unsigned)(p - letters + 1);
    s++;
    if (*s == 'i')
        s++;
    if (*s == 'B' || *s == 'b')
        s++;
    return *s ? -1 : 0;
}

int shim_parse_size(const char *text, struct shim_env_limit *out)
{
    memset(out, 0, sizeof(*out));
    if (!text)
        return -1;
    errno = 0;
    char *end = NULL;
    double value = strtod(text, &end);
    if (errno || end == text || !(value > 0) || !(value < 1e30)) /* also rejects NaN and inf */
        return -1;
    while (*end == ' ')
        end++;
    if (strcmp(end, "%") == 0) {
        if (value > 100)
            return -1;
        uint32_t bp = (uint32_t)(value * 100 + 0.5);
        out->basis_points = bp ? bp : 1;
        return 0;
    }
    unsigned shift;
    if (unit_shift(end, &shift) < 0)
        return -1;
    double bytes = value * (double)(1ull << shift);
    if (bytes < 1 || bytes >= 18446744073709551615.0)
        return -1;
    out->bytes = (uint64_t)bytes;
    return 0;
}

static void read_limit(const char *name, struct shim_env_limit *out)
{
    const char *value = getenv(name);
    if (!value || !*value)
        return;
    if (shim_parse_size(value, out) < 0) {
        memset(out, 0, sizeof(*out));
        shim_log(LOG_WARN, "%s=%s is not a size (512M, 8G, 1.5G, 50%%); ignored", name, value);
        return;
    }
    shim_env.any_limit = true;
}

uint32_t shim_parse_share(const char *text)
{
    if (!text)
        return 0;
    errno = 0;
    char *end = NULL;
    double value = strtod(text, &end);
    if (errno || end == text || !(value > 0) || value > 100)
        return 0;
    if (*end == '%')
        end++;
    if (*end)
        return 0;
    uint32_t centi = (uint32_t)(value * 100 + 0.5);
    return centi ? centi : FCSP_MIN_SHARE_CENTI;
}

static uint32_t read_share(const char *name)
{
    const char *value = getenv(name);
    if (!value || !*value)
        return 0;
    uint32_t centi = shim_parse_share(value);
    if (!centi)
        shim_log(LOG_WARN, "%s=%s is not a share in (0, 100] %%; ignored", name, value);
    else
        shim_env.any_limit = true;
    return centi;
}

/* Ranks from the strictest; a mode this library does not know counts as hard. */
static int strictness(uint32_t mode)
{
    switch (mode) {
    case FCSP_MEM_SPILL:
        return 1;
    case FCSP_MEM_SOFT:
        return 2;
    default:
        return 0;
    }
}

/* The stricter of two modes, either -1 (unset). */
static int stricter(int a, int b)
{
    if (a < 0)
        return b;
    if (b < 0)
        return a;
    return strictness((uint32_t)a) <= strictness((uint32_t)b) ? a : b;
}

enum fcsp_mem_mode shim_env_mem_mode(bool have_slot, uint32_t granted)
{
    int mode = shim_env.mode;
    if (have_slot)
        mode = stricter(strictness(granted) ? (int)granted : FCSP_MEM_HARD, shim_env.mode);
    if (mode < 0 || (mode == FCSP_MEM_SPILL && shim_env.uvm_off))
        return FCSP_MEM_HARD;
    return (enum fcsp_mem_mode)mode;
}

const char *shim_mem_mode_name(enum fcsp_mem_mode mode)
{
    switch (mode) {
    case FCSP_MEM_SOFT:
        return "soft";
    case FCSP_MEM_SPILL:
        return "spill";
    default:
        return "hard";
    }
}

int shim_parse_spill(const char *text, struct shim_env_spill *out)
{
    memset(out, 0, sizeof(*out));
    if (!text)
        return -1;
    errno = 0;
    char *end = NULL;
    double ratio = strtod(text, &end);
    if (!errno && end != text && (*end == 'x' || *end == 'X') && !end[1]) {
        if (!(ratio >= 0.01 && ratio <= 100)) /* also rejects NaN */
            return -1;
        out->centi = (uint32_t)(ratio * FCSP_WHOLE_GPU_CENTI + 0.5);
        return 0;
    }
    /* A percentage would be of the GPU for BUD_MEMORY_LIMIT but of the quota here: neither. */
    struct shim_env_limit size;
    if (shim_parse_size(text, &size) < 0 || !size.bytes)
        return -1;
    out->bytes = size.bytes;
    return 0;
}

/* "1" or "0"; -1 when unset or malformed. */
static int read_switch(const char *name)
{
    const char *value = getenv(name);
    if (!value || !*value)
        return -1;
    if ((value[0] == '0' || value[0] == '1') && !value[1])
        return value[0] - '0';
    shim_log(LOG_WARN, "%s=%s is not 1 or 0; ignored", name, value);
    return -1;
}

static void read_mode(void)
{
    const char *value = getenv("BUD_MEMORY_LIMIT_MODE");
    if (value && *value) {
        if (strcasecmp(value, "hard") == 0)
            shim_env.mode = FCSP_MEM_HARD;
        else if (strcasecmp(value, "spill") == 0)
            shim_env.mode = FCSP_MEM_SPILL;
        else if (strcasecmp(value, "soft") == 0)
            shim_env.mode = FCSP_MEM_SOFT;
        else
            shim_log(LOG_WARN, "BUD_MEMORY_LIMIT_MODE=%s is not hard, spill or soft; ignored",
                     value);
    }
    int uvm = read_switch("BUD_UVM_ENABLED");
    if (uvm == 1)
        shim_env.mode = stricter(shim_env.mode, FCSP_MEM_SPILL);
    shim_env.uvm_off = uvm == 0;
}

static void read_uvm_max(void)
{
    const char *value = getenv("BUD_UVM_MAX");
    if (value && *value && shim_parse_spill(value, &shim_env.uvm_max) < 0)
        shim_log(LOG_WARN, "BUD_UVM_MAX=%s is not a size (8G, 512M) or a multiple of the quota "
                           "from 0.01x to 100x (1.5x); ignored", value);
}

/* A whole number in [low, high], "%" allowed after it where percent says so; -1 when unset
 * or malformed. */
static long read_number(const char *name, long low, long high, bool percent)
{
    const char *value = getenv(name);
    if (!value || !*value)
        return -1;
    errno = 0;
    char *end = NULL;
    long n = strtol(value, &end, 10);
    if (percent && *end == '%')
        end++;
    if (errno || end == value || *end || n < low || n > high) {
        shim_log(LOG_WARN, "%s=%s is not a whole number from %ld to %ld; ignored", name, value,
                 low, high);
        return -1;
    }
    return n;
}

static const char *const uvm_profile_names[] = {
#define PROFILE_NAME(profile, name, ...) [profile] = name,
    FCSP_UVM_PROFILES(PROFILE_NAME)
#undef PROFILE_NAME
};

static void read_uvm_knobs(void)
{
    const char *value = getenv("BUD_UVM_PROFILE");
    if (value && *value) {
        for (unsigned p = 0; p < sizeof(uvm_profile_names) / sizeof(uvm_profile_names[0]); p++)
            if (strcasecmp(value, uvm_profile_names[p]) == 0)
                shim_env.uvm_profile = (int)p;
        if (shim_env.uvm_profile < 0)
            shim_log(LOG_WARN, "BUD_UVM_PROFILE=%s is not default, llm_inference or training; "
                               "ignored", value);
    }
    static const char *const pressure[3] = {"BUD_UVM_PRESSURE_WARNING_PCT",
                                            "BUD_UVM_PRESSURE_HIGH_PCT",
                                            "BUD_UVM_PRESSURE_CRITICAL_PCT"};
    for (unsigned level = 0; level < 3; level++) {
        long pct = read_number(pressure[level], 1, 100, true);
        shim_env.pressure_pct[level] = pct > 0 ? (uint8_t)pct : 0;
    }
    shim_env.prefetch_enabled = read_switch("BUD_PREFETCH_ENABLED");
    long mib = read_number("BUD_PREFETCH_MAX_SIZE_MB", 1, 1L << 20, false);
    shim_env.prefetch_max_bytes = mib > 0 ? (uint64_t)mib << 20 : 0;
}

/* ---- spill mode's knobs -------------------------------------------------------- */

static const struct shim_uvm uvm_profiles[] = {
#define PROFILE_KNOBS(profile, name, warning, high, critical, prefetch_mib, evict) \
    [profile] = {profile, {warning, high, critical}, (uint64_t)(prefetch_mib) << 20, evict},
    FCSP_UVM_PROFILES(PROFILE_KNOBS)
#undef PROFILE_KNOBS
};

static const struct shim_uvm *uvm_profile(uint32_t profile)
{
    return &uvm_profiles[profile < sizeof(uvm_profiles) / sizeof(uvm_profiles[0])
                             ? profile
                             : FCSP_UVM_DEFAULT];
}

static bool pressure_rises(const uint8_t pct[3])
{
    return pct[0] > 0 && pct[0] < pct[1] && pct[1] < pct[2] && pct[2] <= 100;
}

/* BUD_UVM_PRESSURE_*_PCT over the profile's levels, where together they still rise. */
static void override_pressure(struct shim_uvm *uvm)
{
    uint8_t pct[3];
    for (unsigned level = 0; level < 3; level++)
        pct[level] = shim_env.pressure_pct[level] ? shim_env.pressure_pct[level]
                                                  : uvm->pressure_pct[level];
    if (pressure_rises(pct)) {
        memcpy(uvm->pressure_pct, pct, sizeof(pct));
        return;
    }
    shim_log(LOG_WARN, "BUD_UVM_PRESSURE_*_PCT give levels %u/%u/%u %%, which do not rise; using "
                       "%u/%u/%u", pct[0], pct[1], pct[2], uvm->pressure_pct[0],
             uvm->pressure_pct[1], uvm->pressure_pct[2]);
}

void shim_uvm_init(void)
{
    uint32_t slot_mode = FCSP_MEM_HARD;
    struct shim_uvm uvm;
    if (shim_slot_uvm(&slot_mode, &uvm)) {
        /* Knobs this library does not know are the default's; a slot without levels (0)
         * has its profile's. */
        uvm.profile = uvm_profile(uvm.profile)->profile;
        if (uvm.evict_policy != FCSP_EVICT_FIFO)
            uvm.evict_policy = FCSP_EVICT_LRU;
        if (!pressure_rises(uvm.pressure_pct))
            memcpy(uvm.pressure_pct, uvm_profile(uvm.profile)->pressure_pct, 3);
    } else {
        uvm = *uvm_profile(shim_env.uvm_profile < 0 ? FCSP_UVM_DEFAULT
                                                    : (uint32_t)shim_env.uvm_profile);
    }
    override_pressure(&uvm);
    if (shim_env.prefetch_max_bytes)
        uvm.prefetch_bytes = shim_env.prefetch_max_bytes;
    else if (shim_env.prefetch_enabled == 1 && !uvm.prefetch_bytes)
        uvm.prefetch_bytes = uvm_profile(uvm.profile)->prefetch_bytes;
    if (shim_env.prefetch_enabled == 0)
        uvm.prefetch_bytes = 0;
    shim.uvm = uvm;
    if (shim_env_mem_mode(shim.limits != NULL, slot_mode) == FCSP_MEM_SPILL)
        shim_log(LOG_INFO, "spill mode: profile %s, pressure %u/%u/%u %%, prefetch %llu bytes, "
                           "eviction %s", uvm_profile_names[uvm.profile],
                 uvm.pressure_pct[0], uvm.pressure_pct[1], uvm.pressure_pct[2],
                 (unsigned long long)uvm.prefetch_bytes,
                 uvm.evict_policy == FCSP_EVICT_FIFO ? "fifo" : "lru");
}

void shim_env_init(void)
{
    uint32_t sm_all = read_share("BUD_SM_LIMIT");
    for (unsigned d = 0; d < FCSP_MAX_DEVICES; d++) {
        char name[32];
        snprintf(name, sizeof(name), "BUD_SM_LIMIT_DEV%u", d);
        uint32_t centi = read_share(name);
        shim_env.sm_centi[d] = centi ? centi : sm_all;
    }

    struct shim_env_limit all = {0};
    read_limit("BUD_MEMORY_LIMIT", &all);
    for (unsigned d = 0; d < FCSP_MAX_DEVICES; d++) {
        char name[32];
        snprintf(name, sizeof(name), "BUD_MEMORY_LIMIT_DEV%u", d);
        read_limit(name, &shim_env.dev[d]);
        if (!shim_env.dev[d].bytes && !shim_env.dev[d].basis_points)
            shim_env.dev[d] = all;
    }
    read_mode();
    read_uvm_max();
    read_uvm_knobs();
}
