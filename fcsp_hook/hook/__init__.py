"""Container start: the OCI hook (podman, CRI-O) and fcsp-runtime (Docker, containerd).

oci_hook  fcsp-hook: prestart gives a container its slot and the shim, poststop removes it
prestart  the prestart steps; mounts, rootfs and preload do the symlink-safe rootfs work
runtime   fcsp-runtime: adds the hook to an FCSP container's spec, then execs the next runtime
hooksd    the hooks.d entry, generated

Kept empty of code: fcsp-runtime's pass-through path imports this package on every
container start.
"""
