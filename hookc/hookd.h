/*
 * Asking fcsp-hookd (fcsp_hook/hook/server.py has the protocol) from the native programs
 * on the container-start path: fcsp-hook, the hooks.d entry, and fcsp-runtime, the OCI
 * runtime wrapper.  Either runs the Python code itself whenever this gives no answer.
 */
#ifndef FCSP_HOOKD_H
#define FCSP_HOOKD_H

#include <stddef.h>

#define HOOKD_MAX_ARGS 64 /* server.MAX_ARGUMENTS */

/* Send args and body to the fcsp-hookd listening at socket_path and wait up to
 * timeout_ms for its answer.  Returns the exit code it reports (0-255), with what it
 * printed written to stderr; -1 when there is no answer (not running, refused, died
 * mid-request, a reply that is not one), having printed nothing. */
int hookd_ask(const char *socket_path, char *const *args, int nargs, const char *body,
              size_t body_len, int timeout_ms);

/* write(2) until done, without SIGPIPE on a socket; -1 on failure. */
int hookd_write_all(int fd, const char *buf, size_t len);

#endif
