"""Unified-memory profiles: the named sets of knobs a spill-mode tenant runs with.

FCSP_UVM_PROFILES in shim/fcsp_slot.h is the same table for the shim (bare processes pick
a profile with BUD_UVM_PROFILE); tests/test_abi.py pins the two together.  The hook
resolves a tenant's profile and its single-knob overrides into the slot (fcsp_limits'
uvm_profile, pressure_pct, prefetch_bytes, evict_policy), so that the shim and the
observer read the same values.
"""

from __future__ import annotations

from dataclasses import dataclass

from fcsp_hook.slot import abi, rules

MiB = 1 << 20


@dataclass(frozen=True)
class UvmKnobs:
    profile: abi.UvmProfile
    pressure_pct: tuple[int, int, int]  # warning, high, critical: percent of the quota
    prefetch_bytes: int  # the largest range moved back to the device at once
    evict_policy: abi.EvictPolicy

    def pressure_word(self) -> int:
        return rules.pack_pressure(*self.pressure_pct)


PROFILES: dict[str, UvmKnobs] = {
    "default": UvmKnobs(
        abi.UvmProfile.DEFAULT, rules.DEFAULT_PRESSURE_PCT, 16 * MiB, abi.EvictPolicy.LRU
    ),
    "llm_inference": UvmKnobs(
        abi.UvmProfile.LLM_INFERENCE, (70, 85, 95), 64 * MiB, abi.EvictPolicy.LRU
    ),
    "training": UvmKnobs(abi.UvmProfile.TRAINING, (80, 90, 97), 32 * MiB, abi.EvictPolicy.FIFO),
}
PROFILE_FORM = " or ".join(PROFILES)
