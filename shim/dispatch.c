/*
 * Dispatch: where every hooked name is routed.
 *
 * An unmodified CUDA runtime never calls an exported cuLaunchKernel: it
 * dlopens libcuda.so.1, dlsyms cuGetProcAddress_v2 and resolves everything
 * through the pointer it got.  So the shim intercepts at three doors, all
 * driven by the table generated from hooks.def:
 *   - dlsym(): a lookup of a hooked name that finds the driver's definition
 *     returns our hook instead; everything else is untouched;
 *   - cuGetProcAddress(_v2): we call the real resolver (which knows symbol
 *     versions and the per-thread-stream flags), then swap the pointer it
 *     returned for our hook of exactly that variant (cuLaunchKernel_ptsz
 *     for cuLaunchKernel_ptsz), so the variant's semantics survive;
 *   - exported symbols, for programs linked against libcuda directly.
 * libcuda.so.1 and libnvidia-ml.so.1 are dlopen'ed lazily, never linked, so
 * a process that never touches CUDA never loads them.
 */
#include <dlfcn.h>
#include <linux/futex.h>
#include <link.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "shim.h"

_Atomic(void *) shim_real_ptrs[SYM_COUNT];

typedef void *(*dlsym_fn)(void *, const char *);
static _Atomic(dlsym_fn) real_dlsym_ptr;

/*
 * The public dlsym is ours, so the real one comes from dlvsym: glibc 2.34
 * moved it from libdl (GLIBC_2.2.5) into libc (GLIBC_2.34).
 */
static dlsym_fn real_dlsym(void)
{
    dlsym_fn fn = atomic_load_explicit(&real_dlsym_ptr, memory_order_acquire);
    if (likely(fn != NULL))
        return fn;
    if (!shim_have_dl())
        return NULL; /* an old glibc's libdl is not loaded: nothing here can look anything up */
    static const char *const versions[] = {"GLIBC_2.34", "GLIBC_2.2.5", "GLIBC_2.17"};
    for (size_t i = 0; i < sizeof(versions) / sizeof(versions[0]) && !fn; i++)
        fn = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", versions[i]);
    if (!fn) {
        shim_log(LOG_ERROR, "cannot find the C library's dlsym; every lookup will fail");
        return NULL;
    }
    atomic_store_explicit(&real_dlsym_ptr, fn, memory_order_release);
    return fn;
}

static void *call_real_dlsym(void *handle, const char *name)
{
    dlsym_fn fn = real_dlsym();
    return fn ? fn(handle, name) : NULL;
}

/* ---- once, without libpthread ------------------------------------------------ */

void shim_futex_wait(_Atomic int *word, int value)
{
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}

void shim_futex_wake(_Atomic int *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
}

enum { ONCE_NOT_RUN, ONCE_RUNNING, ONCE_DONE };

/* pthread_once, which a glibc older than 2.34 keeps in libpthread (glibc_compat.h). */
void shim_once(_Atomic int *state, void (*fn)(void))
{
    int s = atomic_load_explicit(state, memory_order_acquire);
    if (likely(s == ONCE_DONE))
        return;
    if (s == ONCE_NOT_RUN &&
        atomic_compare_exchange_strong_explicit(state, &s, ONCE_RUNNING, memory_order_acquire,
                                                memory_order_acquire)) {
        fn();
        atomic_store_explicit(state, ONCE_DONE, memory_order_release);
        shim_futex_wake(state);
        return;
    }
    while ((s = atomic_load_explicit(state, memory_order_acquire)) == ONCE_RUNNING)
        shim_futex_wait(state, ONCE_RUNNING);
}

/* After fork: a once that another thread of the parent was running never finishes. */
void shim_once_after_fork_child(_Atomic int *state)
{
    int running = ONCE_RUNNING;
    atomic_compare_exchange_strong(state, &running, ONCE_NOT_RUN);
}

/* ---- the real libraries ---------------------------------------------------- */

struct shim_library {
    const char *soname;
    _Atomic int once;
    void *handle;
};

static struct shim_library libraries[SHIM_LIB_COUNT] = {
    [SHIM_LIB_CUDA] = {"libcuda.so.1", ONCE_NOT_RUN, NULL},
    [SHIM_LIB_NVML] = {"libnvidia-ml.so.1", ONCE_NOT_RUN, NULL},
};

/*
 * Set while this thread loads a library: its constructors may call dlsym, and
 * must get plain answers rather than wait on the once they run under.
 */
static __thread bool resolving;

static void resolve(enum shim_lib which)
{
    struct shim_library *lib = &libraries[which];
    if (!shim_have_dl())
        return;
    resolving = true;
    lib->handle = dlopen(lib->soname, RTLD_NOW | RTLD_LOCAL);
    if (!lib->handle) {
        shim_log(LOG_DEBUG, "cannot load %s: %s", lib->soname, dlerror());
    } else {
        for (unsigned i = 0; i < SYM_COUNT; i++)
            if (shim_syms[i].lib == which)
                atomic_store_explicit(&shim_real_ptrs[i],
                                      call_real_dlsym(lib->handle, shim_syms[i].name),
                                      memory_order_release);
    }
    resolving = false;
}

/* A once runs a function without arguments: one per library. */
static void resolve_cuda(void)
{
    resolve(SHIM_LIB_CUDA);
}

static void resolve_nvml(void)
{
    resolve(SHIM_LIB_NVML);
}

static void (*const resolvers[SHIM_LIB_COUNT])(void) = {
    [SHIM_LIB_CUDA] = resolve_cuda,
    [SHIM_LIB_NVML] = resolve_nvml,
};

static void load_library(enum shim_lib lib)
{
    if (resolving)
        return;
    shim_once(&libraries[lib].once, resolvers[lib]);
}

void shim_dispatch_after_fork_child(void)
{
    for (int i = 0; i < SHIM_LIB_COUNT; i++)
        shim_once_after_fork_child(&libraries[i].once);
}

/* A real entry point is NULL only until its library is loaded, or if it lacks it. */
void *shim_real_slow(enum shim_sym sym)
{
    load_library(shim_syms[sym].lib);
    return atomic_load_explicit(&shim_real_ptrs[sym], memory_order_acquire);
}

void *shim_substitute(enum shim_lib lib, void *p)
{
    if (!p)
        return p;
    load_library(lib);
    for (unsigned i = 0; i < SYM_COUNT; i++) {
        if (shim_syms[i].lib == lib && shim_syms[i].hook &&
            atomic_load_explicit(&shim_real_ptrs[i], memory_order_acquire) == p)
            return shim_syms[i].hook;
    }
    return p;
}

static int compare_name(const void *key, const void *entry)
{
    return strcmp(key, ((const struct shim_sym_info *)entry)->name);
}

static const struct shim_sym_info *find_sym(const char *name)
{
    if (!name || (name[0] != 'c' && name[0] != 'n'))
        return NULL;
    return bsearch(name, shim_syms, SYM_COUNT, sizeof(shim_syms[0]), compare_name);
}

/* ---- dlsym ------------------------------------------------------------------ */

/*
 * RTLD_NEXT means "after the caller", and the caller is not us: passing it
 * through would search after libvgpu.so.  Walk the link maps that follow the
 * caller's object and take the first that defines the name itself (not
 * through one of its dependencies), which is what the dynamic linker does for
 * objects in the global scope.
 */
static void *dlsym_next(const void *caller, const char *name)
{
    Dl_info info;
    struct link_map *self = NULL;
    if (!shim_have_dl() || !dladdr1(caller, &info, (void **)&self, RTLD_DL_LINKMAP) || !self)
        return NULL;
    for (struct link_map *map = self->l_next; map; map = map->l_next) {
        /*
         * Only objects dlopen can name are searchable: the vDSO's link map,
         * for one, has no scope and would crash dlsym.  RTLD_NOLOAD turns
         * the name back into a proper handle without loading anything.
         */
        if (!map->l_name || !map->l_name[0])
            continue;
        void *handle = dlopen(map->l_name, RTLD_LAZY | RTLD_NOLOAD);
        if (!handle)
            continue;
        void *p = call_real_dlsym(handle, name);
        struct link_map *owner = NULL;
        bool defined_here = p && dladdr1(p, &info, (void **)&owner, RTLD_DL_LINKMAP) &&
                            owner == map;
        dlclose(handle);
        if (defined_here)
            return p;
    }
    return NULL;
}

SHIM_EXPORT void *dlsym(void *handle, const char *name)
{
    void *p = handle == RTLD_NEXT ? dlsym_next(__builtin_return_address(0), name)
                                  : call_real_dlsym(handle, name);
    if (!p || !shim.active || resolving)
        return p;
    const struct shim_sym_info *sym = find_sym(name);
    if (!sym || !sym->hook || p == sym->hook)
        return p;
    /*
     * Swap only the driver's own definition: a library of ours or the
     * application's that happens to define the same name is left alone.
     */
    load_library(sym->lib);
    if (atomic_load_explicit(&shim_real_ptrs[sym - shim_syms], memory_order_acquire) == p)
        return sym->hook;
    return p;
}

void shim_dispatch_init(void)
{
    if (shim_have_dl())
        real_dlsym();
    else
        shim_log(LOG_DEBUG, "no dlopen in this process (an old glibc without libdl): "
                            "CUDA cannot be loaded here, nothing to intercept");
}

/* ---- cuGetProcAddress -------------------------------------------------------- */

SHIM_EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion,
                                         cuuint64_t flags,
                                         CUdriverProcAddressQueryResult *symbolStatus)
{
    __typeof__(&cuGetProcAddress_v2) real = REAL(cuGetProcAddress_v2);
    if (!real)
        return CUDA_ERROR_NOT_FOUND;
    CUresult rc = real(symbol, pfn, cudaVersion, flags, symbolStatus);
    if (rc == CUDA_SUCCESS && pfn && shim.active)
        *pfn = shim_substitute(SHIM_LIB_CUDA, *pfn);
    return rc;
}

SHIM_EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion,
                                      cuuint64_t flags)
{
    __typeof__(&cuGetProcAddress) real = REAL(cuGetProcAddress);
    if (!real)
        return CUDA_ERROR_NOT_FOUND;
    CUresult rc = real(symbol, pfn, cudaVersion, flags);
    if (rc == CUDA_SUCCESS && pfn && shim.active)
        *pfn = shim_substitute(SHIM_LIB_CUDA, *pfn);
    return rc;
}
