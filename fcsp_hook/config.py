"""/etc/fcsp/config.toml: host-wide defaults.  Loading is I/O; validation is pure.

Unknown sections and keys are errors, so that a typo never silently falls back to a
default.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fcsp_hook.errors import ConfigError
from fcsp_hook.hook import next_runtime
from fcsp_hook.slot import abi

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found]  # 3.10 only

DEFAULT_PATH = Path("/etc/fcsp/config.toml")

FAIL_CLOSED = "fail-closed"
FAIL_OPEN = "fail-open"

_MODES = {m.name.lower(): m for m in abi.IsolationMode}
_MEM_MODES = {m.name.lower(): m for m in abi.MemMode}


@dataclass(frozen=True)
class DefaultsConfig:
    mode: abi.IsolationMode = abi.IsolationMode.BALANCED
    mem_mode: abi.MemMode = abi.MemMode.HARD


@dataclass(frozen=True)
class HookConfig:
    # fail-closed: a container whose FCSP setup fails does not start.
    # fail-open: it starts without FCSP, and the failure is logged.
    failure_policy: str = FAIL_CLOSED
    library: Path = Path("/usr/local/lib/fcsp/libvgpu.so")
    log_file: Path = Path("/var/log/fcsp/hook.log")


@dataclass(frozen=True)
class PathsConfig:
    run_dir: Path = Path("/run/fcsp")
    # Where the host's /dev/nvidia<N> nodes are listed for NVIDIA_VISIBLE_DEVICES=all.
    dev_dir: Path = Path("/dev")
    # The driver's per-GPU files (gpus/<bus>/information): minor number -> UUID, read
    # without initialising NVML, so slots name GPUs by UUID whatever their CUDA order.
    driver_dir: Path = Path("/proc/driver/nvidia")
    # What the observer learns and keeps across restarts and reboots (clocks.json).
    state_dir: Path = Path("/var/lib/fcsp")


@dataclass(frozen=True)
class PolicyConfig:
    tenant_floor_pct: int = 20
    shared_pool_pct: int = 40
    burst_max_pct: int = 40


CLOCK_OFF = "off"
CLOCK_FULL_LOAD = "full-load"
MIN_TURN_CYCLE_MS = 10  # shorter turns switch as often as the driver does
OVER_QUOTA_WARN = "warn"
OVER_QUOTA_KILL = "kill"
# Where the observer serves its metrics unless config.toml says otherwise: tenant names
# and ids are not for the network at large.
METRICS_LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class ObserverConfig:
    # 50 ms: an idle tenant that starts is noticed within one tick, so it holds its
    # share again inside the 100 ms reclaim target, for < 2% of a core with 32 tenants.
    interval_ms: int = 50
    # A tenant with no launches, GPU time or throttled time for this long is idle.
    idle_window_ms: int = 500
    # What an idle tenant keeps (capped at its request), so its first launches run.
    idle_share_pct: int = 1
    # Below this fraction of a tick spent throttled, a tenant has no unmet demand.
    throttled_min_pct: int = 2
    # Adaptive mode: contention (unmet demand, % of the GPU) above high tightens
    # towards strict, below low relaxes again; the gap is the hysteresis.
    contention_high_pct: int = 50
    contention_low_pct: int = 20
    # How far adaptive moves between relaxed (0) and strict (100) per tick.
    adaptive_step_pct: int = 25
    # Prometheus metrics on <metrics_address>:<port>; 0 turns them off.
    metrics_port: int = 9401
    # The address the metrics listen on: an IPv4 or IPv6 address (0.0.0.0 or :: for all).
    metrics_address: str = METRICS_LOCALHOST
    # NVML process lists hold the driver's lock: polled at most once a second.
    nvml_interval_ms: int = 1000
    # A tenant over its hard memory quota by NVML's count (the quota plus each process's
    # context, measured): kill its processes on that GPU until it is back within it, or
    # only warn.  The shim's own accounting is the tenant's to forge; NVML's is not.
    over_quota_action: str = OVER_QUOTA_KILL
    # Device memory each of a tenant's processes may hold past its quota for what the
    # driver loads into it (modules of the libraries it uses), over the bare context the
    # observer measures on each GPU.
    process_allowance_mib: int = 256
    # A time-sliced tenant whose GPU time by NVML's count stays more than this many points
    # above its share in force, over backstop_window_s, is frozen (its cgroup) for part of
    # every backstop period until it is back at its share; 0: never.
    backstop_margin_pct: int = 3
    backstop_window_s: int = 5
    # How often slots of containers that are gone are looked for.
    reap_interval_ms: int = 2000
    # "full-load": a share is a share of the work the GPU does at full load (kernels are
    # charged for the speed-up a partly idle, power-limited GPU gives them), so a throttled
    # tenant does not do more than its share of what it does alone.  "off": a share of
    # the GPU's time.
    clock_normalise: str = CLOCK_FULL_LOAD
    # The most a kernel is taken to speed up on a partly idle GPU, in % of its full-load
    # speed.  A GEMM gains less than its clock does; 120 is what holds GEMMs of either
    # precision to their shares (bench/results/compute-diagnosis.md).
    clock_max_speedup_pct: int = 120
    # Tenants that keep a time-sliced GPU busy take turns of a cycle this long, each for
    # its share of it, rather than being switched by the driver every time slice (which
    # costs a few percent of the GPU's time).  A turn makes a throttled tenant's launches
    # wait up to one cycle; latency-priority tenants never take turns.  0: off.  It moves
    # within -20/+25 % so that windows hold whole kernels of tenants whose kernels are long
    # (policy.fit_cycle).
    turn_cycle_ms: int = 50


@dataclass(frozen=True)
class RuntimeConfig:
    # The OCI runtime fcsp-runtime hands every command to: "auto" (nvidia-container-runtime
    # on PATH or where the GPU Operator and the packages put it, else runc) or an absolute
    # path (next_runtime).
    next: str = next_runtime.NEXT_AUTO


ADMISSION_REFUSE = "refuse"
ADMISSION_WARN = "warn"
ADMISSION_OFF = "off"
ADMISSION_POLICIES = {p: p for p in (ADMISSION_REFUSE, ADMISSION_WARN, ADMISSION_OFF)}


@dataclass(frozen=True)
class AdmissionConfig:
    # A container whose strict share or hard memory quota would take a GPU's guarantees
    # past 100 % of its SMs or past its memory: "refuse" (it does not start; one line names
    # the GPU, the request and what is already promised), "warn" (it starts, the line is
    # logged) or "off" (not checked).
    policy: str = ADMISSION_REFUSE


BACKENDS = {b.name.lower(): b for b in abi.Backend}


@dataclass(frozen=True)
class BackendConfig:
    # How each GPU's time is shared: timeslice (the driver's time slices, FCSP throttles
    # launches) or mps (one MPS control daemon per GPU, run by fcsp-observer).
    default: abi.Backend = abi.Backend.TIMESLICE
    # Per GPU, by UUID ("GPU-...") or host index ("0"): overrides default.
    gpus: Mapping[str, abi.Backend] = field(default_factory=dict)
    # The MPS control program: a name looked up on PATH, or an absolute path.
    mps_control: str = "nvidia-cuda-mps-control"

    def for_gpu(self, uuid: str, host_index: int) -> abi.Backend:
        for key in (uuid, str(host_index)):
            if key and key in self.gpus:
                return self.gpus[key]
        return self.default

    @property
    def any_mps(self) -> bool:
        return self.default == abi.Backend.MPS or abi.Backend.MPS in self.gpus.values()


@dataclass(frozen=True)
class Config:
    defaults: DefaultsConfig = field(default_factory=DefaultsConfig)
    hook: HookConfig = field(default_factory=HookConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    observer: ObserverConfig = field(default_factory=ObserverConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)


def _choice(section: str, key: str, value: object, choices: Mapping[str, Any]) -> Any:
    if isinstance(value, str) and value in choices:
        return choices[value]
    raise ConfigError(
        f"[{section}] {key} = {value!r} is invalid: expected one of {', '.join(choices)}"
    )


def _path(section: str, key: str, value: object) -> Path:
    if isinstance(value, str) and value.startswith("/"):
        return Path(value)
    raise ConfigError(f"[{section}] {key} = {value!r} is invalid: expected an absolute path")


def _percent(section: str, key: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100:
        return value
    raise ConfigError(
        f"[{section}] {key} = {value!r} is invalid: expected an integer from 0 to 100"
    )


def _is_ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(
        p.isascii() and p.isdigit() and len(p) <= 3 and int(p) <= 255 for p in parts
    )


def _address(section: str, key: str, value: object) -> str:
    """An IP address to listen on (no name: nothing to resolve at every start)."""
    if isinstance(value, str) and (value == METRICS_LOCALHOST or _is_ipv4(value)):
        return value
    if isinstance(value, str) and ":" in value:
        import ipaddress  # noqa: PLC0415  # only when an IPv6 address is configured

        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            pass
        else:
            return value
    raise ConfigError(
        f"[{section}] {key} = {value!r} is invalid: expected an IPv4 or IPv6 address "
        "such as 127.0.0.1, 0.0.0.0 or ::"
    )


def _integer(section: str, key: str, value: object, low: int, high: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    raise ConfigError(
        f"[{section}] {key} = {value!r} is invalid: expected an integer from {low} to {high}"
    )


# Bounds of the [observer] integers; everything else there is a choice.
_OBSERVER_RANGES = {
    "interval_ms": (1, 10_000),
    "idle_window_ms": (1, 3_600_000),
    "idle_share_pct": (0, 100),
    "throttled_min_pct": (0, 100),
    "contention_high_pct": (0, 100),
    "contention_low_pct": (0, 100),
    "adaptive_step_pct": (1, 100),
    "metrics_port": (0, 65_535),
    "nvml_interval_ms": (1_000, 3_600_000),
    "reap_interval_ms": (100, 3_600_000),
    "clock_max_speedup_pct": (100, 200),
    "turn_cycle_ms": (0, 1000),
    "process_allowance_mib": (0, 1 << 20),
    "backstop_margin_pct": (0, 100),
    "backstop_window_s": (1, 600),
}


def _observer(data: Mapping[str, object]) -> ObserverConfig:
    o = _table(data, "observer", ObserverConfig)
    values: dict[str, Any] = {
        key: _integer("observer", key, o.get(key, getattr(ObserverConfig, key)), low, high)
        for key, (low, high) in _OBSERVER_RANGES.items()
    }
    values["over_quota_action"] = _choice(
        "observer",
        "over_quota_action",
        o.get("over_quota_action", OVER_QUOTA_KILL),
        {OVER_QUOTA_WARN: OVER_QUOTA_WARN, OVER_QUOTA_KILL: OVER_QUOTA_KILL},
    )
    values["metrics_address"] = _address(
        "observer", "metrics_address", o.get("metrics_address", METRICS_LOCALHOST)
    )
    values["clock_normalise"] = _choice(
        "observer",
        "clock_normalise",
        o.get("clock_normalise", CLOCK_FULL_LOAD),
        {CLOCK_OFF: CLOCK_OFF, CLOCK_FULL_LOAD: CLOCK_FULL_LOAD},
    )
    cfg = ObserverConfig(**values)
    if cfg.contention_low_pct > cfg.contention_high_pct:
        raise ConfigError("[observer] contention_low_pct must not exceed contention_high_pct")
    if 0 < cfg.turn_cycle_ms < MIN_TURN_CYCLE_MS:
        raise ConfigError(
            f"[observer] turn_cycle_ms must be 0 (off) or {MIN_TURN_CYCLE_MS}-1000, "
            f"got {cfg.turn_cycle_ms}"
        )
    return cfg


def _backend(data: Mapping[str, object]) -> BackendConfig:
    b = _table(data, "backend", BackendConfig)
    gpus = b.get("gpus", {})
    if not isinstance(gpus, dict):
        raise ConfigError('[backend] gpus must be a table such as { "0" = "mps" }')
    per_gpu = {}
    for key, value in gpus.items():
        if not (key.startswith("GPU-") or key.isdigit()):
            raise ConfigError(
                f"[backend] gpus key {key!r} is invalid: expected a GPU UUID or host index"
            )
        per_gpu[key] = _choice("backend", f"gpus.{key}", value, BACKENDS)
    control = b.get("mps_control", BackendConfig.mps_control)
    relative_path = isinstance(control, str) and "/" in control and control[0] != "/"
    if not isinstance(control, str) or not control or relative_path:
        raise ConfigError(
            f"[backend] mps_control = {control!r} is invalid: expected a name or absolute path"
        )
    return BackendConfig(
        default=_choice("backend", "default", b.get("default", "timeslice"), BACKENDS),
        gpus=per_gpu,
        mps_control=control,
    )


def _check_keys(section: str, table: Mapping[str, object], cls: type) -> None:
    allowed = {f.name for f in fields(cls)}
    for key in table:
        if key not in allowed:
            raise ConfigError(
                f"[{section}] {key} is unknown: expected one of {', '.join(sorted(allowed))}"
            )


def _table(data: Mapping[str, object], section: str, cls: type) -> Mapping[str, object]:
    table = data.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table")
    _check_keys(section, table, cls)
    return table


def from_mapping(data: Mapping[str, object]) -> Config:
    """Validate a parsed TOML document."""
    sections = {f.name for f in fields(Config)}
    for section in data:
        if section not in sections:
            raise ConfigError(
                f"[{section}] is unknown: expected one of {', '.join(sorted(sections))}"
            )

    d = _table(data, "defaults", DefaultsConfig)
    defaults = DefaultsConfig(
        mode=_choice("defaults", "mode", d.get("mode", "balanced"), _MODES),
        mem_mode=_choice("defaults", "mem_mode", d.get("mem_mode", "hard"), _MEM_MODES),
    )
    h = _table(data, "hook", HookConfig)
    hook = HookConfig(
        failure_policy=_choice(
            "hook",
            "failure_policy",
            h.get("failure_policy", FAIL_CLOSED),
            {FAIL_CLOSED: FAIL_CLOSED, FAIL_OPEN: FAIL_OPEN},
        ),
        library=_path("hook", "library", h.get("library", str(HookConfig.library))),
        log_file=_path("hook", "log_file", h.get("log_file", str(HookConfig.log_file))),
    )
    p = _table(data, "paths", PathsConfig)
    paths = PathsConfig(
        run_dir=_path("paths", "run_dir", p.get("run_dir", str(PathsConfig.run_dir))),
        dev_dir=_path("paths", "dev_dir", p.get("dev_dir", str(PathsConfig.dev_dir))),
        driver_dir=_path("paths", "driver_dir", p.get("driver_dir", str(PathsConfig.driver_dir))),
        state_dir=_path("paths", "state_dir", p.get("state_dir", str(PathsConfig.state_dir))),
    )
    q = _table(data, "policy", PolicyConfig)
    policy = PolicyConfig(
        **{
            f.name: _percent("policy", f.name, q.get(f.name, f.default))
            for f in fields(PolicyConfig)
        }
    )
    if policy.tenant_floor_pct + policy.shared_pool_pct + policy.burst_max_pct > 100:
        raise ConfigError(
            "[policy] tenant_floor_pct + shared_pool_pct + burst_max_pct must not exceed 100"
        )
    r = _table(data, "runtime", RuntimeConfig)
    # One check, shared with fcsp-runtime's fast path (which never imports this module).
    runtime_cfg = RuntimeConfig(next=next_runtime.parse_next(r.get("next", next_runtime.NEXT_AUTO)))
    a = _table(data, "admission", AdmissionConfig)
    admission = AdmissionConfig(
        policy=_choice("admission", "policy", a.get("policy", ADMISSION_REFUSE), ADMISSION_POLICIES)
    )
    return Config(
        defaults=defaults,
        hook=hook,
        paths=paths,
        policy=policy,
        observer=_observer(data),
        runtime=runtime_cfg,
        backend=_backend(data),
        admission=admission,
    )


# The last file read and what it gave: fcsp-hookd loads the config before it forks, so
# that each fork, which reads it again, parses it only when it changed (2 ms a parse).
_last_loaded: tuple[bytes, Config] | None = None


def load(path: Path = DEFAULT_PATH) -> Config:
    """Read and validate config.toml; a missing file means every default."""
    global _last_loaded  # noqa: PLW0603  # the one memo, keyed by the file's bytes
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    if _last_loaded is not None and _last_loaded[0] == raw:
        return _last_loaded[1]  # frozen: shared safely
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        cfg = from_mapping(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    _last_loaded = (raw, cfg)
    return cfg
