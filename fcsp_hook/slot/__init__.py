"""The tenant slot: the contract between the host side and libvgpu.so.

abi    the layout, a mirror of shim/fcsp_slot.h that tests pin byte for byte
rules  what the live words mean: shares, the memory quota, the heartbeat
files  slots on the host: create, read whole, remove
live   slots while tenants run: the limits mapped, the usage file pread
"""
