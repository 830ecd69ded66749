"""Duty: decide every GPU's shares and turns, write them to the slots, and beat.

Each tick, per GPU: the policy (observer.policy) shares the GPU among the tenants that
see it, from their requests, modes, activity and unmet demand; the shares that changed
are written (slot.rules.grant_share: one aligned store each).  Busy time-sliced tenants
take turns: each gets a window of a repeating cycle in which it alone launches.  Then
every slot gets the heartbeat that says its shares are fresh.
"""

from __future__ import annotations

from fcsp_hook import config
from fcsp_hook.observer import policy
from fcsp_hook.observer.state import Duty, GpuShare, HostState, Tenant
from fcsp_hook.slot import abi, live, rules

Member = tuple[Tenant, int]  # a tenant and the index of one of its GPUs


class Shares(Duty):
    name = "shares"

    def __init__(self) -> None:
        # Per GPU: (signature of the policy's inputs, the allocation for them).
        self.decisions: dict[str, tuple[tuple[object, ...], policy.Allocation]] = {}
        self.decided_for: config.Config | None = None

    def run(self, state: HostState, now_ns: int) -> None:
        if state.cfg is not self.decided_for:  # a reload: new pools and thresholds
            self.decisions.clear()
            self.decided_for = state.cfg
        groups: dict[str, list[Member]] = {}
        for tenant in state.tenants.values():
            for i, device in enumerate(tenant.devices):
                groups.setdefault(device.grant.gpu, []).append((tenant, i))
        for gpu, members in groups.items():
            share = state.shares.setdefault(gpu, GpuShare())
            self.decide(state.cfg, gpu, share, members)
            share.turning = set_turns(members, state.cfg.observer.turn_cycle_ms * 1000)
        for gpu in set(state.shares) - set(groups):
            del state.shares[gpu]
            self.decisions.pop(gpu, None)
        beat = live.monotonic_ns()
        for tenant in state.tenants.values():
            rules.beat(tenant.limits, beat)

    def stop(self, state: HostState) -> None:
        """Tenants go back to their requests, heartbeat 0 ("no observer")."""
        for tenant in state.tenants.values():
            rules.restore_requests(tenant.limits, tenant.spec)

    def decide(self, cfg: config.Config, gpu: str, share: GpuShare, members: list[Member]) -> None:
        """Run the policy on one GPU and store the shares that changed.

        The policy looks at unmet demand only as "wants more or not", and at contention
        only as "above the high mark, below the low one, or between": when those, the
        requests and adaptive mode's state are what they were last tick, last tick's
        answer stands and the policy is not run (the common, steady case).
        """
        obs = cfg.observer
        devices = [t.devices[i] for t, i in members]
        signature = tuple((d.grant, d.active, d.unmet > 0) for d in devices)
        share.contention_pct = policy.contention_of(
            [d.unmet for d in devices if d.active and d.grant.mode != abi.IsolationMode.NONE]
        )
        key = (
            signature,
            share.policy_state,
            share.contention_pct >= obs.contention_high_pct,
            share.contention_pct <= obs.contention_low_pct,
        )
        cached = self.decisions.get(gpu)
        if cached is None or cached[0] != key:
            cached = (key, allocate(cfg, members, share.policy_state))
            self.decisions[gpu] = cached
        result = cached[1]
        share.policy_state = result.state
        for tenant, i in members:
            rules.grant_share(tenant.limits, i, result.shares[tenant.devices[i].grant.key])


def allocate(
    cfg: config.Config, members: list[Member], state: policy.GpuState
) -> policy.Allocation:
    obs = cfg.observer
    inputs = [
        policy.TenantInput(
            d.grant.key, d.grant.mode, d.grant.requested_centi, d.active, d.unmet, d.grant.priority
        )
        for d in (t.devices[i] for t, i in members)
    ]
    return policy.allocate(
        inputs,
        policy.Pools(**vars(cfg.policy)),
        obs.idle_share_pct * abi.CENTI_PER_PERCENT,
        state,
        policy.AdaptiveParams(
            obs.contention_high_pct, obs.contention_low_pct, obs.adaptive_step_pct
        ),
    )


def set_turns(members: list[Member], cycle_us: int) -> bool:
    """Windows of the cycle for the GPU's busy time-sliced tenants (policy.turns); True if
    any tenant takes turns.  Latency-priority tenants never wait for a turn; MPS runs
    clients side by side.  Busy: using at least 90 % of its share (unmet > 0), and a tenant
    that has a turn keeps it down to half, so that one filling its window about exactly
    does not make the turns come and go tick by tick.

    A tenant's launch size counts only spans measured while it takes turns: time-sliced,
    the time between its kernel's events holds its neighbour's slices, and a cycle fitted
    to those would move as turns begin.  Spans from earlier turns are kept: turns that
    lapse for a tick resume fitted."""
    inputs = []
    for tenant, i in members:
        device = tenant.devices[i]
        grant = device.grant
        may_take_turns = (
            grant.mode != abi.IsolationMode.NONE
            and grant.priority != abi.Priority.LATENCY
            and grant.backend == abi.Backend.TIMESLICE
        )
        effective = tenant.limits.effective(i)
        taking_turns = tenant.limits.turn(i) != 0
        if not taking_turns:
            device.restart_kernel_span()
        keeps = taking_turns and device.usage.demand_centi * 2 >= effective
        busy = may_take_turns and device.active and (device.unmet > 0 or keeps)
        inputs.append(policy.TurnInput(grant.key, effective, busy, device.kernel_us))
    current = max(abi.unpack_turn(tenant.limits.turn(i))[0] for tenant, i in members)
    words = policy.turns(inputs, cycle_us, current)
    for (tenant, i), turn_input in zip(members, inputs, strict=True):
        word = words[turn_input.key]
        if tenant.limits.turn(i) == word:
            continue
        tenant.limits.set_turn(i, word)
        cycle, start, length = abi.unpack_turn(word)
        if word:
            tenant.log.info("turn", device=i, cycle_ms=cycle / 1000,
                            start_ms=start / 1000, length_ms=length / 1000)  # fmt: skip
        else:  # why, for whoever tunes turn_cycle_ms or the thresholds
            device = tenant.devices[i]
            tenant.log.info("turns end", device=i, busy=turn_input.busy,
                            demand_centi=device.usage.demand_centi,
                            throttled_pct=device.throttled_pct)  # fmt: skip
    return any(words.values())
