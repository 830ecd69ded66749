/*
 * Simulated nvidia-cuda-mps-control, part of the simulated driver: enough of
 * the real program's contract for fcsp-observer's MPS supervision and the
 * hook's mounts to run in CI.  Modelled on what the real one does
 * (bench/results/mps-facts.md):
 *
 *   -d   daemonise; create in $CUDA_MPS_PIPE_DIRECTORY the sockets `control`
 *        (0666) and `control_privileged` (0755), `control_lock` and
 *        nvidia-cuda-mps-control.pid; log to $CUDA_MPS_LOG_DIRECTORY/control.log.
 *   -f   the same in the foreground.
 *   (no argument) the command-line client: sends each stdin line to the
 *        daemon, through control_privileged when the caller may open it.
 *
 * Commands: get_server_list and get_default_active_thread_percentage (anyone);
 * quit and set_* (control_privileged only; through `control` the real daemon
 * answers "Not enough privilege").  The simulated libcuda announces itself at
 * cuInit with "client <pid> <threads> <pinned>", logged as "NEW CLIENT": that
 * is how tests see which processes became MPS clients and with which limits.
 * One server, listed under the daemon's own pid, starts with the first client
 * and takes the default thread percentage then; set_active_thread_percentage
 * changes it for the clients after.  A client gets the lower of what it asks
 * and its server's, as the real one does, logged as "CLIENT <pid> ACTIVE
 * THREADS <n>" and answered, so that the client's kernels run on that part of
 * the SMs (cuda_sim.c).  Faults are not modelled: tests append the real server's fault
 * line to server.log.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static char pipe_dir[512], log_dir[512];
static int default_threads = 100, server_threads = 100, server_up;

static void path_in(char *out, size_t size, const char *dir, const char *name)
{
    snprintf(out, size, "%s/%s", dir, name);
}

static void logf_(const char *file, const char *fmt, ...)
{
    char path[600];
    path_in(path, sizeof(path), log_dir, file);
    FILE *f = fopen(path, "a");
    if (!f)
        return;
    time_t now = time(NULL);
    char stamp[32];
    strftime(stamp, sizeof(stamp), "%Y-%m-%d %H:%M:%S", localtime(&now));
    fprintf(f, "[%s.000 Control %6d] ", stamp, (int)getpid());
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputc('\n', f);
    fclose(f);
}

static int listen_on(const char *name, mode_t mode)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    path_in(addr.sun_path, sizeof(addr.sun_path), pipe_dir, name);
    unlink(addr.sun_path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0 || listen(fd, 16) != 0) {
        perror(addr.sun_path);
        exit(1);
    }
    chmod(addr.sun_path, mode);
    return fd;
}

static void cleanup(void)
{
    const char *names[] = {"control", "control_privileged", "control_lock",
                           "nvidia-cuda-mps-control.pid"};
    char path[600];
    for (size_t i = 0; i < sizeof(names) / sizeof(*names); i++) {
        path_in(path, sizeof(path), pipe_dir, names[i]);
        unlink(path);
    }
}

static void on_term(int sig)
{
    (void)sig;
    cleanup();
    _exit(0);
}

/* One connection, one command line; returns 1 when the daemon must quit. */
static int serve(int fd, int privileged)
{
    char line[256] = {0};
    ssize_t n = read(fd, line, sizeof(line) - 1);
    if (n <= 0)
        return 0;
    line[strcspn(line, "\r\n")] = '\0';
    char reply[300];
    int quit = 0;
    int pid = 0, pct = 0;
    if (strcmp(line, "get_server_list") == 0) {
        snprintf(reply, sizeof(reply), server_up ? "%d\n" : "\n", (int)getpid());
    } else if (strcmp(line, "get_default_active_thread_percentage") == 0) {
        snprintf(reply, sizeof(reply), "%d.0\n", default_threads);
    } else if (strncmp(line, "client ", 7) == 0) {
        if (!server_up)
            server_up = 1, server_threads = default_threads;
        const char *asked = strstr(line, "threads=");
        int want = asked && sscanf(asked, "threads=%d", &pct) == 1 ? pct : 100;
        sscanf(line, "client %d", &pid);
        logf_("control.log", "NEW CLIENT %s", line + 7);
        int granted = want < server_threads ? want : server_threads;
        logf_("control.log", "CLIENT %d ACTIVE THREADS %d", pid, granted);
        snprintf(reply, sizeof(reply), "ok %d\n", granted);
    } else if (strcmp(line, "quit") == 0 || strncmp(line, "set_", 4) == 0) {
        if (!privileged) {
            snprintf(reply, sizeof(reply), "Not enough privilege to execute %s command\n", line);
        } else if (sscanf(line, "set_default_active_thread_percentage %d", &pct) == 1) {
            default_threads = pct;
            snprintf(reply, sizeof(reply), "\n");
        } else if (sscanf(line, "set_active_thread_percentage %d %d", &pid, &pct) == 2) {
            if (server_up && pid == (int)getpid())
                server_threads = pct;
            snprintf(reply, sizeof(reply), server_threads == pct ? "\n" : "No server %d\n", pid);
        } else {
            snprintf(reply, sizeof(reply), "\n");
            quit = strcmp(line, "quit") == 0;
        }
    } else {
        snprintf(reply, sizeof(reply), "Unrecognized command %s\n", line);
    }
    logf_("control.log", "Command %s (%s)", line, privileged ? "privileged" : "user");
    if (write(fd, reply, strlen(reply)) < 0)
        return quit;
    return quit;
}

static int run_daemon(int daemonise)
{
    mkdir(pipe_dir, 0700);
    if (daemonise) {
        pid_t pid = fork();
        if (pid < 0)
            return 1;
        if (pid > 0)
            return 0;
        setsid();
        if (fork() != 0)
            _exit(0);
        int null = open("/dev/null", O_RDWR);
        dup2(null, 0), dup2(null, 1), dup2(null, 2);
    }
    signal(SIGTERM, on_term);
    signal(SIGPIPE, SIG_IGN);
    int user = listen_on("control", 0666);
    int priv = listen_on("control_privileged", 0755);
    char path[600];
    path_in(path, sizeof(path), pipe_dir, "control_lock");
    close(open(path, O_CREAT | O_WRONLY, 0666));
    path_in(path, sizeof(path), pipe_dir, "nvidia-cuda-mps-control.pid");
    FILE *f = fopen(path, "w");
    if (f) {
        fprintf(f, "%d", (int)getpid());
        fclose(f);
    }
    logf_("control.log", "Starting control daemon (simulated)");
    for (;;) {
        struct pollfd fds[2] = {{.fd = user, .events = POLLIN}, {.fd = priv, .events = POLLIN}};
        if (poll(fds, 2, -1) < 0 && errno != EINTR)
            break;
        for (int i = 0; i < 2; i++) {
            if (!(fds[i].revents & POLLIN))
                continue;
            int conn = accept4(fds[i].fd, NULL, NULL, SOCK_CLOEXEC);
            if (conn < 0)
                continue;
            int quit = serve(conn, i == 1);
            close(conn);
            if (quit) {
                logf_("control.log", "Exit");
                cleanup();
                return 0;
            }
        }
    }
    cleanup();
    return 1;
}

static int run_client(void)
{
    char sock[600];
    path_in(sock, sizeof(sock), pipe_dir, "control_privileged");
    if (access(sock, W_OK) != 0)
        path_in(sock, sizeof(sock), pipe_dir, "control");
    char line[256];
    int status = 0;
    while (fgets(line, sizeof(line), stdin)) {
        struct sockaddr_un addr = {.sun_family = AF_UNIX};
        snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", sock);
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) {
            fprintf(stderr, "Cannot find MPS control daemon process\n");
            return 1;
        }
        if (write(fd, line, strlen(line)) < 0)
            status = 1;
        char reply[300];
        ssize_t n;
        while ((n = read(fd, reply, sizeof(reply))) > 0)
            fwrite(reply, 1, (size_t)n, stdout);
        close(fd);
    }
    return status;
}

int main(int argc, char **argv)
{
    const char *p = getenv("CUDA_MPS_PIPE_DIRECTORY");
    const char *l = getenv("CUDA_MPS_LOG_DIRECTORY");
    snprintf(pipe_dir, sizeof(pipe_dir), "%s", p && *p ? p : "/tmp/nvidia-mps");
    snprintf(log_dir, sizeof(log_dir), "%s", l && *l ? l : "/var/log/nvidia-mps");
    if (argc > 1 && strcmp(argv[1], "-d") == 0)
        return run_daemon(1);
    if (argc > 1 && strcmp(argv[1], "-f") == 0)
        return run_daemon(0);
    return run_client();
}
