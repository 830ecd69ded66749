/*
 * RTLD_NEXT must mean "after the caller" whoever interposes dlsym.  Linked
 * against librtld_a, librtld_b and libcuda.so.1 in that order; prints what
 * each lookup found, with and without libvgpu.so preloaded.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

const char *fcsp_probe(void);
const char *a_next_probe(void);
void *a_next_symbol(const char *name);

static const char *object_of(void *p)
{
    Dl_info info;
    if (!p || !dladdr(p, &info) || !info.dli_fname)
        return "NULL";
    const char *slash = strrchr(info.dli_fname, '/');
    return slash ? slash + 1 : info.dli_fname;
}

int main(void)
{
    printf("call %s\n", fcsp_probe());
    printf("next_from_a %s\n", a_next_probe());
    const char *(*from_main)(void) = (const char *(*)(void))dlsym(RTLD_NEXT, "fcsp_probe");
    printf("next_from_main %s\n", from_main ? from_main() : "NULL");
    const char *(*global)(void) = (const char *(*)(void))dlsym(RTLD_DEFAULT, "fcsp_probe");
    printf("default %s\n", global ? global() : "NULL");
    void *first = a_next_symbol("cuMemAlloc_v2");
    void *second = a_next_symbol("cuMemAlloc_v2");
    printf("cu_next %s %s %s\n", object_of(first), object_of(second),
           first == second ? "same" : "different");
    void *handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    void *by_handle = handle ? dlsym(handle, "cuMemAlloc_v2") : NULL;
    void *again = handle ? dlsym(handle, "cuMemAlloc_v2") : NULL;
    printf("cu_handle %s %s\n", object_of(by_handle), by_handle == again ? "same" : "different");
    void *unhooked = handle ? dlsym(handle, "cuDeviceGetName") : NULL;
    printf("unhooked %s\n", object_of(unhooked));
    printf("missing %s\n", object_of(a_next_symbol("fcsp_no_such_symbol")));
    return 0;
}
