/*
 * fcsp-runtime: the OCI runtime Docker and containerd run for FCSP containers, and on
 * nodes where it is the default, for every other container too.  An engine calls it
 * several times per container (create, start, state, kill, delete); only the create of a
 * container with fcsp.* annotations has work for FCSP (adding the hook to its
 * config.json, fcsp_hook/hook/runtime.py).  Every other call must cost nothing next to
 * the runtime it hands over to: this program decides which kind of call it is and execs
 * the next runtime itself, and runs the Python runtime only for FCSP's creates, or when it
 * cannot tell which runtime comes next.
 *
 * Which runtime comes next is config.toml's [runtime] next, resolved by the Python runtime
 * (the one owner of that rule), which leaves the candidates in order in
 *   /run/fcsp-runtime/<the config's path, '/' as '%'>
 * with the config's size and mtime; this program takes the first candidate that is an
 * executable file while the config is unchanged, and otherwise runs the Python runtime.
 * Once the Python runtime has done an FCSP create, the record also names fcsp-hookd's
 * socket and the hook client: FCSP's creates are then handed to fcsp-hookd (a fork of a
 * running process does the Python runtime's work) and the Python runtime runs only when
 * fcsp-hookd gives no answer.
 * The command line is read as the Python runtime reads it (split_command, bundle_of):
 * tests/test_runtime.py runs every case against both.
 *
 * The Python runtime is $FCSP_RUNTIME_PYTHON, else PYTHON_RUNTIME (set at build time); it
 * learns this launcher's path from $FCSP_RUNTIME_LAUNCHER, to refuse a next runtime that
 * is the launcher itself.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hookd.h"

#ifndef PYTHON_RUNTIME
#define PYTHON_RUNTIME "/usr/local/lib/fcsp/fcsp-runtime.py"
#endif
#define DEFAULT_CONFIG "/etc/fcsp/config.toml"
#define CACHE_DIR "/run/fcsp-runtime"
#define MAX_CACHE 8192
#define CREATE_TIMEOUT_MS 8000 /* fcsp-hookd's own bound on a request */

static const char *const global_value_flags[] = {
    "root", "log", "log-format", "log-level", "criu", "rootless", "cgroup-manager", NULL};
static const char *const create_value_flags[] = {
    "bundle", "b", "console-socket", "pid-file", "preserve-fds", NULL};

static int in(const char *name, size_t len, const char *const *set)
{
    for (; *set; set++)
        if (strlen(*set) == len && strncmp(*set, name, len) == 0)
            return 1;
    return 0;
}

/* "--bundle=x" -> "bundle" (len 6), attached 1; "-b" -> "b", attached 0. */
static const char *flag_name(const char *arg, size_t *len, int *attached)
{
    while (*arg == '-')
        arg++;
    const char *eq = strchr(arg, '=');
    *attached = eq != NULL;
    *len = eq ? (size_t)(eq - arg) : strlen(arg);
    return arg;
}

/* The index of the command in args (argc when there is none). */
static int split_command(int argc, char **argv)
{
    int i = 1;
    while (i < argc) {
        if (strcmp(argv[i], "--") == 0)
            return i + 1;
        if (argv[i][0] != '-')
            return i;
        size_t len;
        int attached;
        const char *name = flag_name(argv[i], &len, &attached);
        i += (attached || !in(name, len, global_value_flags)) ? 1 : 2;
    }
    return argc;
}

/* The bundle of a create/run (the cwd when not given); NULL if there is none to read. */
static const char *bundle_of(int argc, char **argv, int command)
{
    for (int i = command + 1; i < argc && strcmp(argv[i], "--") != 0;) {
        if (argv[i][0] != '-') {
            i++;
            continue;
        }
        size_t len;
        int attached;
        const char *name = flag_name(argv[i], &len, &attached);
        if ((len == 6 && strncmp(name, "bundle", 6) == 0) || (len == 1 && name[0] == 'b')) {
            if (attached)
                return strchr(argv[i], '=') + 1;
            return i + 1 < argc ? argv[i + 1] : NULL;
        }
        i += (attached || !in(name, len, create_value_flags)) ? 1 : 2;
    }
    return ".";
}

/* Does the bundle's config.json name an fcsp.* annotation (anywhere: as the Python side
 * looks for it, by its bytes)?  -1 when it cannot be read: the Python runtime says why. */
static int names_fcsp(const char *bundle)
{
    char path[4096];
    if (snprintf(path, sizeof(path), "%s/config.json", bundle) >= (int)sizeof(path))
        return -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    if (st.st_size == 0) {
        close(fd);
        return 0;
    }
    void *data = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (data == MAP_FAILED)
        return -1;
    int found = memmem(data, (size_t)st.st_size, "\"fcsp.", 6) != NULL;
    munmap(data, (size_t)st.st_size);
    return found;
}

static int is_self(const char *path)
{
    char self[4096], other[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n <= 0 || !realpath(path, other))
        return 0;
    self[n] = '\0';
    return strcmp(self, other) == 0;
}

/* What the Python runtime left for this config: the first candidate for the next runtime
 * that is an executable file, and for FCSP's creates, fcsp-hookd's socket and the hook
 * client the hook entry names.  NULL fields: not known (no record, a changed config, no
 * candidate there any more). */
struct record {
    char *next;
    char *hookd;
    char *client;
};

static struct record read_record(const char *config)
{
    static char text[MAX_CACHE + 1];
    struct record rec = {0};
    char path[4200] = CACHE_DIR "/";
    size_t at = strlen(path);
    for (const char *c = config; *c && at < sizeof(path) - 1; c++)
        path[at++] = *c == '/' ? '%' : *c;
    path[at] = '\0';
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return rec;
    ssize_t n = read(fd, text, MAX_CACHE);
    close(fd);
    if (n <= 0)
        return rec;
    text[n] = '\0';
    /* First line: "config <size> <mtime_ns>" of the config as resolved (0 0: it was absent). */
    unsigned long long size, mtime;
    char *line = strtok(text, "\n");
    if (!line || sscanf(line, "config %llu %llu", &size, &mtime) != 2)
        return rec;
    struct stat st;
    unsigned long long now_size = 0, now_mtime = 0;
    if (stat(config, &st) == 0) {
        now_size = (unsigned long long)st.st_size;
        now_mtime = (unsigned long long)st.st_mtim.tv_sec * 1000000000ull + st.st_mtim.tv_nsec;
    } else if (errno != ENOENT) {
        return rec;
    }
    if (now_size != size || now_mtime != mtime)
        return rec;
    /* Then "next <path>" per candidate, in order; "hookd <path>"; "client <path>". */
    int found_next = 0;
    while ((line = strtok(NULL, "\n"))) {
        if (strncmp(line, "hookd /", 7) == 0) {
            rec.hookd = line + 6;
        } else if (strncmp(line, "client /", 8) == 0) {
            rec.client = line + 7;
        } else if (!found_next && strncmp(line, "next /", 6) == 0) {
            char *candidate = line + 5;
            if (stat(candidate, &st) == 0 && S_ISREG(st.st_mode) && access(candidate, X_OK) == 0) {
                found_next = 1;
                rec.next = is_self(candidate) ? NULL : candidate; /* the Python side refuses */
            }
        }
    }
    return rec;
}

/* An FCSP create handed to fcsp-hookd (runtime.served_create): its exit code, 0 to go on
 * to the next runtime; -1 when it gave no answer. */
static int ask_hookd(const struct record *rec, const char *config, int argc, char **argv)
{
    char cwd[4096];
    if (!getcwd(cwd, sizeof(cwd)))
        return -1;
    char *args[HOOKD_MAX_ARGS];
    int n = 0;
    args[n++] = "runtime-create";
    args[n++] = "--config";
    args[n++] = (char *)config;
    args[n++] = "--client";
    args[n++] = rec->client;
    args[n++] = "--cwd"; /* a relative bundle or --log is the launcher's */
    args[n++] = cwd;
    args[n++] = "--";
    if (argc - 1 > HOOKD_MAX_ARGS - n)
        return -1;
    for (int i = 1; i < argc; i++)
        args[n++] = argv[i];
    return hookd_ask(rec->hookd, args, n, "", 0, CREATE_TIMEOUT_MS);
}

static int run_python(char **argv)
{
    const char *python = getenv("FCSP_RUNTIME_PYTHON");
    if (!python || !*python)
        python = PYTHON_RUNTIME;
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
    if (n > 0) { /* so that it refuses a next runtime that is this launcher */
        self[n] = '\0';
        setenv("FCSP_RUNTIME_LAUNCHER", self, 1);
    }
    argv[0] = (char *)python;
    execv(python, argv);
    fprintf(stderr, "fcsp-runtime: cannot run %s: %s\n", python, strerror(errno));
    return 127;
}

int main(int argc, char **argv)
{
    const char *config = getenv("FCSP_CONFIG");
    if (!config || !*config)
        config = DEFAULT_CONFIG;
    struct record rec = read_record(config);
    int command = split_command(argc, argv);
    if (command < argc && (strcmp(argv[command], "create") == 0 || strcmp(argv[command], "run") == 0)) {
        const char *bundle = bundle_of(argc, argv, command);
        int fcsp = bundle ? names_fcsp(bundle) : -1;
        if (fcsp == 1 && rec.next && rec.hookd && rec.client) {
            int code = ask_hookd(&rec, config, argc, argv);
            if (code > 0)
                return code; /* refused: fcsp-hookd printed why, and wrote it to --log */
            if (code == 0) {
                argv[0] = rec.next;
                execv(rec.next, argv);
            }
        }
        if (fcsp != 0)
            return run_python(argv); /* FCSP's create, or one it cannot read */
    }
    if (!rec.next)
        return run_python(argv);
    argv[0] = rec.next;
    execv(rec.next, argv);
    return run_python(argv); /* gone since it was checked: the Python runtime says why */
}
