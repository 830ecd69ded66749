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
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PROTOCOL "FCSP-HOOK 1"
#define MAX_STATE (1u << 20)      /* oci.MAX_STATE_BYTES: the hook reads one byte more */
#define MAX_REPLY (64u << 10)     /* what fcsp-hookd sends of the hook's stderr, and its header */
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

static void cleanup_close(int *fd)
{
    if (*fd >= 0)
        close(*fd);
}
#define AUTO_CLOSE __attribute__((cleanup(cleanup_close)))

/* To the socket without SIGPIPE (a server that died closes it under us: we fall back), or
 * to an ordinary descriptor. */
static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0 && errno == ENOTSOCK)
            n = write(fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

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

/* The hook's exit code from fcsp-hookd, its stderr printed; -1: no answer. */
static int ask_server(const struct request *r)
{
    AUTO_CLOSE int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (fd < 0 || strlen(r->socket_path) >= sizeof(addr.sun_path))
        return -1;
    strcpy(addr.sun_path, r->socket_path);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        return -1;
    if (write_all(fd, PROTOCOL "\n", strlen(PROTOCOL) + 1) < 0)
        return -1;
    for (int i = 0; i < r->nargs; i++)
        if (write_all(fd, r->args[i], strlen(r->args[i])) < 0 || write_all(fd, "\n", 1) < 0)
            return -1;
    if (write_all(fd, "\n", 1) < 0 || write_all(fd, r->state, r->state_len) < 0)
        return -1;
    shutdown(fd, SHUT_WR);

    static char reply[MAX_REPLY + 64];
    size_t len = 0;
    long long deadline = now_ms() + ANSWER_TIMEOUT_MS;
    for (;;) {
        long long left = deadline - now_ms();
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (left <= 0 || poll(&p, 1, (int)left) <= 0)
            return -1; /* no answer in time: the Python hook decides */
        ssize_t n = read(fd, reply + len, sizeof(reply) - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0 || (len += (size_t)n) == sizeof(reply) - 1)
            break;
    }
    reply[len] = '\0';
    char *eol = memchr(reply, '\n', len);
    size_t head = strlen(PROTOCOL);
    if (!eol || strncmp(reply, PROTOCOL " ", head + 1) != 0)
        return -1; /* a reply that is not one */
    char *end;
    long code = strtol(reply + head + 1, &end, 10);
    if (end != eol || end == reply + head + 1 || code < 0 || code > 255)
        return -1;
    size_t printed = len - (size_t)(eol + 1 - reply);
    if (printed)
        (void)write_all(2, eol + 1, printed);
    return (int)code;
}

/* Run the Python hook with the state as its stdin (a memfd: no writer to wait for). */
static int run_fallback(const struct request *r)
{
    int fd = memfd_create("fcsp-hook-state", 0);
    if (fd < 0 || write_all(fd, r->state, r->state_len) < 0 || lseek(fd, 0, SEEK_SET) < 0 ||
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
    int code = ask_server(&r);
    if (code >= 0)
        return code;
    return run_fallback(&r);
}
