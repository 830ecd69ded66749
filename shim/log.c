/*
 * Diagnostics on stderr, prefixed "fcsp:".  Only initialisation and one-time
 * warnings log; the hot paths never do.  BUD_LOG_LEVEL (error, warn, info,
 * debug or 0-3) is read once, in the constructor.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "shim.h"

static enum shim_log_level log_level = LOG_WARN;

void shim_log_init(void)
{
    static const char *const names[] = {"error", "warn", "info", "debug"};
    const char *value = getenv("BUD_LOG_LEVEL");
    if (!value || !*value)
        return;
    for (unsigned i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcasecmp(value, names[i]) == 0 || (value[0] == (char)('0' + i) && !value[1])) {
            log_level = (enum shim_log_level)i;
            return;
        }
    }
    shim_log(LOG_WARN, "BUD_LOG_LEVEL=%s is not one of error, warn, info, debug; using warn", value);
}

void shim_log(enum shim_log_level level, const char *fmt, ...)
{
    if (level > log_level)
        return;
    /* One write(2), so that lines of concurrent processes do not interleave. */
    char line[512];
    int n = snprintf(line, sizeof(line), "fcsp[%d]: ", (int)getpid());
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    size_t len = (size_t)n + (m < 0 ? 0 : (size_t)m);
    if (len > sizeof(line) - 2)
        len = sizeof(line) - 2;
    line[len++] = '\n';
    ssize_t ignored = write(STDERR_FILENO, line, len);
    (void)ignored;
}
