/* Test library A: looks names up with RTLD_NEXT from inside itself. */
#include <dlfcn.h>

const char *fcsp_probe(void)
{
    return "A";
}

const char *a_next_probe(void)
{
    const char *(*next)(void) = (const char *(*)(void))dlsym(RTLD_NEXT, "fcsp_probe");
    return next ? next() : "NULL";
}

void *a_next_symbol(const char *name)
{
    /* Not a tail call: RTLD_NEXT is relative to the return address, which must be in A. */
    void *p = dlsym(RTLD_NEXT, name);
    __asm__ volatile("" : : "r"(p) : "memory");
    return p;
}
