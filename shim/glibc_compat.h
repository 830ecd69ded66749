/*
 * libvgpu.so is loaded into whatever image a tenant runs, so it asks the C library
 * only for symbol versions that glibc 2.17 already had.  Built against a newer glibc,
 * dlopen and friends, pthread_once and the thread-specific keys would bind to
 * GLIBC_2.34 (when they moved from libdl and libpthread into libc), and every program
 * of an image with an older glibc (Ubuntu 20.04 and Debian 11 ship 2.31) would then
 * fail to start under /etc/ld.so.preload.  The old versions are still exported by new
 * glibc's libc.so.6, so the references below bind there.
 *
 * The library does not list libdl.so.2 or libpthread.so.0 as dependencies: ld.so
 * treats a preloaded object's missing dependency as fatal, and an image can have
 * glibc's libc.so.6 without them (hand-assembled images do; glibc >= 2.34 needs
 * neither).  Instead the functions that a glibc older than 2.34 keeps there are weak
 * references: resolved wherever the process has loaded libdl and libpthread (the
 * hook lists an old glibc's own copies in /etc/ld.so.preload, right after
 * libvgpu.so; every program that can dlopen anything, or links the CUDA runtime or
 * driver, loads them too), and NULL where it has not, where the shim does without
 * them (shim_have_dl, and each use of the pthread ones).  stat and fstat
 * (GLIBC_2.33) are not used at all: see shim_stat in slot.c.
 * tests/test_shim_exports.py checks every version the library needs and that these
 * stay weak.
 */
#ifndef FCSP_GLIBC_COMPAT_H
#define FCSP_GLIBC_COMPAT_H

#if defined(__GLIBC__)
#pragma weak dlopen
#pragma weak dlclose
#pragma weak dlerror
#pragma weak dlvsym
#pragma weak dladdr1
#pragma weak pthread_key_create
#pragma weak pthread_setspecific
#pragma weak pthread_create
#pragma weak pthread_attr_init
#pragma weak pthread_attr_setstacksize
#pragma weak pthread_attr_destroy
#endif

#if defined(__x86_64__) && defined(__GLIBC__)
__asm__(".symver dlopen,dlopen@GLIBC_2.2.5");
__asm__(".symver dlclose,dlclose@GLIBC_2.2.5");
__asm__(".symver dlerror,dlerror@GLIBC_2.2.5");
__asm__(".symver dlvsym,dlvsym@GLIBC_2.2.5");
__asm__(".symver dladdr1,dladdr1@GLIBC_2.3.3");
__asm__(".symver pthread_key_create,pthread_key_create@GLIBC_2.2.5");
__asm__(".symver pthread_setspecific,pthread_setspecific@GLIBC_2.2.5");
__asm__(".symver pthread_create,pthread_create@GLIBC_2.2.5");
__asm__(".symver pthread_attr_init,pthread_attr_init@GLIBC_2.2.5");
__asm__(".symver pthread_attr_setstacksize,pthread_attr_setstacksize@GLIBC_2.2.5");
__asm__(".symver pthread_attr_destroy,pthread_attr_destroy@GLIBC_2.2.5");
#endif

/* The dl functions the shim needs are there (always, with glibc >= 2.34). */
#define shim_have_dl() (dlopen && dlclose && dlerror && dlvsym && dladdr1)

#endif /* FCSP_GLIBC_COMPAT_H */
