/*
 * BUD_* environment variables: limits for a bare process, and a way to lower
 * (never raise) what a slot grants.  Read once in the constructor: the hot
 * paths never call getenv.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "shim.h"

struct shim_env shim_env = {.mode = -1};

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
    const char *mode = getenv("BUD_MEMORY_LIMIT_MODE");
    if (mode && *mode) {
        if (strcasecmp(mode, "hard") == 0)
            shim_env.mode = FCSP_MEM_HARD;
        else if (strcasecmp(mode, "soft") == 0)
            shim_env.mode = FCSP_MEM_SOFT;
        else
            shim_log(LOG_WARN, "BUD_MEMORY_LIMIT_MODE=%s is not hard or soft; ignored", mode);
    }
}
