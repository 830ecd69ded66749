"""Duty: clock normalisation ([observer] clock_normalise = "full-load").

A GPU that is partly idle runs its kernels at a higher clock than at full load, so a
share of its time is more than that share of the work it does at full load.  This duty
learns each GPU's full-load SM clock and publishes to its tenants how much faster the GPU
runs now (clock_scale_centi); the shims multiply measured kernel times by it.  What was
learned is kept across restarts (observer.clockstore).
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from fcsp_hook import config, nvml
from fcsp_hook.observer import clockstore, policy
from fcsp_hook.observer.state import Duty, GpuClock, HostState
from fcsp_hook.slot import abi, live

PERIOD_NS = 250_000_000  # clocks move over seconds
# The clock kernels run at is the highest read over the last second: a reading taken while
# a throttled GPU idles between kernels is lower.
WINDOW = 4
SAVE_PERIOD_NS = 10_000_000_000  # learned clocks are written at most this often


class Clocks(Duty):
    name = "clocks"

    def __init__(self) -> None:
        self.recent_mhz: dict[str, deque[int]] = {}
        self.full_load: dict[str, float] = {}  # per GPU UUID, learned so far
        self.saved: dict[str, float] | None = None  # what the state file holds; None: unread
        self.next_save_ns = 0

    def period_ns(self, state: HostState) -> int:
        return PERIOD_NS

    def run(self, state: HostState, now_ns: int) -> None:
        on = state.cfg.observer.clock_normalise == config.CLOCK_FULL_LOAD and state.nv.available
        readings = {}
        for gpu in state.gpus if on else ():
            reading = state.nv.clock(gpu)
            if reading is not None:
                readings[gpu.uuid] = reading
        self.apply(state, readings, on)

    def apply(self, state: HostState, readings: dict[str, nvml.ClockReading], on: bool) -> None:
        """Learn from this round's readings (per GPU UUID) and publish each GPU's scale to
        its tenants; with on False, take every scale back."""
        if not on and not state.clocks:
            return  # off, and no scale left in any slot to take back
        if on and self.saved is None:
            self.full_load, problem = clockstore.load(state.cfg.paths.state_dir)
            self.saved = dict(self.full_load)
            if problem:
                state.log.warning("full-load clocks not restored", reason=problem)
        for uuid, reading in readings.items():
            reference = policy.learn_full_load_clock(self.full_load.get(uuid, 0.0), reading)
            if reference > 0:
                self.full_load[uuid] = reference
            recent = self.recent_mhz.setdefault(uuid, deque(maxlen=WINDOW))
            recent.append(reading.sm_mhz)
            busy = replace(reading, sm_mhz=max(recent))
            scale = policy.clock_scale_centi(
                reference, busy, state.cfg.observer.clock_max_speedup_pct
            )
            share = state.shares.get(uuid)
            if scale and share is not None and share.turning:
                # Tenants taking turns keep the GPU busy: a clock above the full-load one
                # then comes from gaps between turns, which no tenant's share should pay.
                scale = abi.WHOLE_GPU_CENTI
            state.clocks[uuid] = GpuClock(reference, busy, scale)
        if on:
            self.save(state)
        for tenant in state.tenants.values():
            for i, device in enumerate(tenant.devices):
                known = state.clocks.get(device.grant.gpu)
                scale = known.scale_centi if on and known else 0
                if tenant.limits.clock_scale(i) != scale:
                    tenant.limits.set_clock_scale(i, scale)
        if not on:
            state.clocks.clear()
            self.recent_mhz.clear()

    def stop(self, state: HostState) -> None:
        """What was learned of full-load clocks is kept for the next observer."""
        self.next_save_ns = 0
        self.save(state)

    def save(self, state: HostState) -> None:
        """Keep the learned full-load clocks (at most every SAVE_PERIOD_NS, and only when
        one moved by more than 1 %), so that a restarted observer need not wait for the GPU
        to be saturated again before it can normalise."""
        now = live.monotonic_ns()
        saved = self.saved or {}
        moved = any(
            abs(mhz - saved.get(uuid, 0.0)) > mhz / 100 for uuid, mhz in self.full_load.items()
        )
        if not moved or now < self.next_save_ns:
            return
        self.next_save_ns = now + SAVE_PERIOD_NS
        problem = clockstore.save(state.cfg.paths.state_dir, self.full_load)
        if problem:
            state.log.warning("full-load clocks not saved", reason=problem)
        else:
            self.saved = dict(self.full_load)
