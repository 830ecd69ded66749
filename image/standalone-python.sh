#!/bin/sh
# standalone-python.sh PREFIX: Debian's python3, made to run from PREFIX on any Linux host.
#
# Copies the interpreter to PREFIX/bin and its standard library to PREFIX/lib, with every
# shared library the interpreter and its extension modules load, glibc and its loader
# included, into PREFIX/lib; then points the binary at them: ELF interpreter
# PREFIX/lib/ld-linux-*.so, DT_RPATH PREFIX/lib (the executable's DT_RPATH serves every
# library the process loads, dlopen included).  The result needs nothing from the machine
# it runs on but the kernel, so the fcsp-node image can copy it to the host's /opt/fcsp,
# where containerd runs fcsp-runtime and the hook under it.  It must stay at PREFIX.
#
# Runs in the image's build stage (Debian with python3 and patchelf), as root.
set -eu
prefix=${1:?usage: standalone-python.sh PREFIX}
ver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
python=/usr/bin/python$ver
stdlib=$prefix/lib/python$ver

mkdir -p "$prefix/bin" "$prefix/lib"
cp "$python" "$prefix/bin/"
ln -sf "python$ver" "$prefix/bin/python3"
cp -a "/usr/lib/python$ver" "$prefix/lib/"
# Debian's stdlib links out of itself: sitecustomize.py to /etc (apport's hook) and config-*
# to the system's libpython and Makefile.  Nothing here needs either.
rm -rf "$stdlib/sitecustomize.py" "$stdlib"/config-*
# Test modules (Debian's testsuite package is not installed, these are leftovers).
rm -f "$stdlib"/lib-dynload/_test*.so "$stdlib"/lib-dynload/_xxtestfuzz*.so

# What the interpreter and its extension modules link, as the build machine resolves it.
deps=$(for elf in "$python" "$stdlib"/lib-dynload/*.so; do ldd "$elf"; done)
if echo "$deps" | grep -q 'not found'; then
    echo "standalone-python: unresolved libraries:" >&2
    echo "$deps" | grep 'not found' | sort -u >&2
    exit 1
fi
interp=$(patchelf --print-interpreter "$python")
# All of glibc, not only what python links: a library the process loads later from the host
# (ctypes, NVML's libnvidia-ml.so.1) may need libpthread.so.0, libdl.so.2, librt.so.1 or
# NSS modules, which must be this glibc's, never the host's.  libgcc_s: glibc loads it
# itself to unwind a thread at pthread_exit or cancel.
glibc=$(dpkg -L libc6 | grep -E '^/(usr/)?lib/[^/]+/[^/]+\.so(\.[0-9]+)*$')
libgcc=$(ldconfig -p | awk '$1 == "libgcc_s.so.1" {print $NF; exit}')
for lib in $(echo "$deps" | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u) \
           "$interp" $glibc ${libgcc:+"$libgcc"}; do
    cp -L "$lib" "$prefix/lib/$(basename "$lib")"
done
# A library's own DT_RUNPATH would switch the executable's DT_RPATH off for its lookups.
for lib in "$prefix"/lib/*.so*; do
    if [ -n "$(patchelf --print-rpath "$lib")" ]; then patchelf --remove-rpath "$lib"; fi
done
patchelf --set-interpreter "$prefix/lib/$(basename "$interp")" \
    --force-rpath --set-rpath "$prefix/lib" "$prefix/bin/python$ver"

# Proof: every extension module imports, and no library comes from outside PREFIX.
"$prefix/bin/python3" -I -W ignore - "$prefix" <<'PY'
import ctypes, importlib, pathlib, pwd, sys

prefix = sys.argv[1]
dynload = pathlib.Path(prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                       "lib-dynload")
for so in sorted(dynload.glob("*.so")):
    importlib.import_module(so.name.split(".")[0])
for name in ("libpthread.so.0", "libdl.so.2", "librt.so.1", "libutil.so.1"):
    ctypes.CDLL(name)  # as libraries linked against an older glibc ask for them
pwd.getpwuid(0)  # NSS
with open("/proc/self/maps") as maps:
    mapped = {line.split()[-1] for line in maps if "/" in line and ".so" in line}
outside = sorted(p for p in mapped if not p.startswith(prefix + "/"))
if outside or sys.prefix != prefix:
    sys.exit(f"standalone-python: prefix {sys.prefix}, libraries outside {prefix}: {outside}")
print(f"standalone-python: {sys.version.split()[0]} in {prefix}, {len(mapped)} libraries")
PY
