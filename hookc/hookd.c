/* The client side of fcsp-hookd's protocol: hookd.h. */
#define _GNU_SOURCE
#include "hookd.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PROTOCOL "FCSP-HOOK 1"
#define MAX_REPLY (64u << 10) /* what fcsp-hookd sends of the hook's stderr, and its header */

static void cleanup_close(int *fd)
{
    if (*fd >= 0)
        close(*fd);
}
#define AUTO_CLOSE __attribute__((cleanup(cleanup_close)))

static void cleanup_free(char **p)
{
    free(*p);
}
#define AUTO_FREE __attribute__((cleanup(cleanup_free)))

int hookd_write_all(int fd, const char *buf, size_t len)
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

/* The request's head in one buffer: the protocol line, one line per argument, a blank
 * line.  NULL when an argument holds a newline or there are too many. */
static char *request_head(char *const *args, int nargs, size_t *len)
{
    if (nargs > HOOKD_MAX_ARGS)
        return NULL;
    size_t size = sizeof(PROTOCOL) + 1;
    for (int i = 0; i < nargs; i++) {
        if (strchr(args[i], '\n'))
            return NULL;
        size += strlen(args[i]) + 1;
    }
    char *head = malloc(size);
    if (!head)
        return NULL;
    char *at = stpcpy(head, PROTOCOL "\n");
    for (int i = 0; i < nargs; i++) {
        at = stpcpy(at, args[i]);
        *at++ = '\n';
    }
    *at++ = '\n';
    *len = (size_t)(at - head);
    return head;
}

int hookd_ask(const char *socket_path, char *const *args, int nargs, const char *body,
              size_t body_len, int timeout_ms)
{
    size_t head_len;
    AUTO_FREE char *head = request_head(args, nargs, &head_len);
    AUTO_CLOSE int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (!head || fd < 0 || strlen(socket_path) >= sizeof(addr.sun_path))
        return -1;
    strcpy(addr.sun_path, socket_path);
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        return -1;
    if (hookd_write_all(fd, head, head_len) < 0 || hookd_write_all(fd, body, body_len) < 0)
        return -1;
    shutdown(fd, SHUT_WR);

    static char reply[MAX_REPLY + 64];
    size_t len = 0;
    long long deadline = now_ms() + timeout_ms;
    for (;;) {
        long long left = deadline - now_ms();
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (left <= 0 || poll(&p, 1, (int)left) <= 0)
            return -1; /* no answer in time: the caller's Python code decides */
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
    size_t proto = strlen(PROTOCOL);
    if (!eol || strncmp(reply, PROTOCOL " ", proto + 1) != 0)
        return -1; /* a reply that is not one */
    char *end;
    long code = strtol(reply + proto + 1, &end, 10);
    if (end != eol || end == reply + proto + 1 || code < 0 || code > 255)
        return -1;
    size_t printed = len - (size_t)(eol + 1 - reply);
    if (printed)
        (void)hookd_write_all(2, eol + 1, printed);
    return (int)code;
}
