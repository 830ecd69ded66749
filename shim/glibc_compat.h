/*
 * libvgpu.so is loaded into whatever image a tenant runs, so it asks the C library
 * only for symbol versions that glibc 2.17 already had.  Built against a newer glibc,
 * dlopen and friends, pthread_once and the thread-specific keys would bind to
 * GLIBC_2.34 (when they moved from libdl and libpthread into libc), and every program
 * of an image with an older glibc (Ubuntu 20.04 and Debian 11 ship 2.31) would then
 * fail to start under /etc/ld.so.preload.  The old versions are still exported by new
 * glibc; the library links libdl and libpthread so that old glibc finds them where they
 * lived (every glibc image has both: glibc >= 2.34 still ships them, empty).  stat and
 * fstat (GLIBC_2.33) are not used at all: see shim_stat in slot.c.
 * tests/test_shim_exports.py checks every version the library needs.
 */
#ifndef FCSP_GLIBC_COMPAT_H
#define FCSP_GLIBC_COMPAT_H

#if defined(__x86_64__) && defined(__GLIBC__)
__asm__(".symver dlopen,dlopen@GLIBC_2.2.5");
__asm__(".symver dlclose,dlclose@GLIBC_2.2.5");
__asm__(".symver dlerror,dlerror@GLIBC_2.2.5");
__asm__(".symver dlvsym,dlvsym@GLIBC_2.2.5");
__asm__(".symver dladdr1,dladdr1@GLIBC_2.3.3");
__asm__(".symver pthread_once,pthread_once@GLIBC_2.2.5");
__asm__(".symver pthread_key_create,pthread_key_create@GLIBC_2.2.5");
__asm__(".symver pthread_setspecific,pthread_setspecific@GLIBC_2.2.5");
#endif

#endif /* FCSP_GLIBC_COMPAT_H */
