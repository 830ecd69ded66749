/*
 * fcsp-hook: the program the hooks.d entry runs at every start and removal of a
 * container with fcsp.* annotations.  It hands the OCI state to fcsp-hookd over its Unix
 * socket and prints the answer, so that a container start pays the start of a small C
 * program rather than Python's (fcsp_hook/hook/server.py has the protocol).  Whenever
 * fcsp-hookd gives no answer (not running, refused, died mid-request, a reply that is not
 * one), it runs the Python hook itself on the same state: the same work, slower.
 *
 *   fcsp-hook --socket PATH [ARG...] -- PYTHON-HOOK-COMMAND...
 *
 * ARG... are the hook's own arguments (--config PATH oci): sent to fcsp-hookd, or
 * appended to PYTHON-HOOK-COMMAND.  The environment is the entry's own, passed on as is.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "hookd.h"

#define MAX_STATE (1u << 20)      /* oci.MAX_STATE_BYTES: the hook reads one byte more */
#define ANSWER_TIMEOUT_MS 8500    /* under the hooks.d entry's 10 s */
#define MAX_ARGS 8

struct request {
    const char *socket_path;
    char **args;
    int nargs;
    char **fallback;
    int nfallback;
    char *state;
    size_t state_len;
};

/* Up to MAX_STATE + 1 bytes of stdin: enough for the hook to refuse a larger state. */
static int read_state(struct request *r)
{
    size_t cap = MAX_STATE + 1;
    r->state = malloc(cap);
    if (!r->state)
        return -1;
    r->state_len = 0;
    while (r->state_len < cap) {
        ssize_t n = read(0, r->state + r->state_len, cap - r->state_len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        r->state_len += (size_t)n;
    }
    return 0;
}

/* Run the Python hook with the state as its stdin (a memfd: no writer to wait for). */
static int run_fallback(const struct request *r)
{
    int fd = memfd_create("fcsp-hook-state", 0);
    if (fd < 0 || hookd_write_all(fd, r->state, r->state_len) < 0 || lseek(fd, 0, SEEK_SET) < 0 ||
        dup2(fd, 0) < 0) {
        fprintf(stderr, "fcsp-hook: cannot hand the state to %s: %s\n", r->fallback[0],
                strerror(errno));
        return 1;
    }
    char *argv[64];
    int n = 0;
    for (int i = 0; i < r->nfallback && n < 60; i++)
        argv[n++] = r->fallback[i];
    for (int i = 0; i < r->nargs && n < 63; i++)
        argv[n++] = r->args[i];
    argv[n] = NULL;
    execv(argv[0], argv);
    fprintf(stderr, "fcsp-hook: cannot run %s: %s\n", argv[0], strerror(errno));
    return 1;
}

static int parse_args(int argc, char **argv, struct request *r)
{
    if (argc < 5 || strcmp(argv[1], "--socket") != 0)
        return -1;
    r->socket_path = argv[2];
    int i = 3;
    r->args = argv + i;
    while (i < argc && strcmp(argv[i], "--") != 0)
        i++;
    r->nargs = (int)(argv + i - r->args);
    if (i >= argc - 1 || r->nargs > MAX_ARGS || argv[i + 1][0] != '/')
        return -1;
    r->fallback = argv + i + 1;
    r->nfallback = argc - i - 1;
    return 0;
}

int main(int argc, char **argv)
{
    struct request r = {0};
    if (parse_args(argc, argv, &r) < 0) {
        fprintf(stderr, "usage: fcsp-hook --socket PATH [ARG...] -- /PYTHON-HOOK-COMMAND...\n");
        return 2;
    }
    if (read_state(&r) < 0) {
        fprintf(stderr, "fcsp-hook: cannot read the OCI state on stdin: %s\n", strerror(errno));
        return 1;
    }
    int code = hookd_ask(r.socket_path, r.args, r.nargs, r.state, r.state_len, ANSWER_TIMEOUT_MS);
    if (code >= 0)
        return code;
    return run_fallback(&r);
}
