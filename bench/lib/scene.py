"""Tenants as a bench runs them, without containers: the one way benches set up a scene.

A Scene owns a work directory: the run_dir fcsp-observer watches (<work>/run), the
observer's state_dir, private slots (<work>/slots) for tenants the observer must not
count, and a raw directory for every child's stdout (its result: the last JSON line) and
stderr.  Where MPS runs, keep the work directory's path short: the daemon's socket
<work>/run/mps/<uuid>/pipe/control_privileged must fit in 107 bytes, or it cannot be told
to quit.  Tenants are processes with LD_PRELOAD=libvgpu.so and FCSP_SLOT_DIR, as the hook
would set them up; fcsp-observer runs from this checkout on a config of the scene's own;
MPS daemons are the observer's, and the scene ends them.  close() kills every child,
stops the observer and ends the MPS daemons, also when the bench failed half-way.

The shell benches use two pieces of it:

    python3 -m lib.scene slot DIR [--mem BYTES] [--sm-centi N]     (PYTHONPATH=bench)
    python3 -m lib.scene usage DIR FIELD                           (device 0's counter)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcsp_hook import mps
from fcsp_hook.slot import abi, files, uvm
from lib import REPO, SHIM

GRACE_S = 10.0  # how long siblings of a failed child may still finish (a collective hangs)
OBSERVER_STOP_S = 20.0  # SIGTERM: the observer hands tenants their requests back first
OBSERVER_STATE = "observer.json"  # <run_dir>/observer.json, the observer's published state
_ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b")


class ChildFailed(Exception):
    """A child process failed; the message names it and says why."""


@dataclass(frozen=True)
class Device:
    """One entry of a slot: a GPU the tenant sees and what it is granted there."""

    host_index: int = 0
    uuid: str = ""
    sm_centi: int = abi.WHOLE_GPU_CENTI
    mem_bytes: int = 0
    backend: abi.Backend = abi.Backend.TIMESLICE
    mps_threads_centi: int = 0


@dataclass
class Child:
    """A process the scene started; `out` is None for an interactive one (stdin and
    stdout are pipes the bench talks through)."""

    tag: str
    proc: subprocess.Popen[str]
    out: Path | None
    err: Path

    def result(self) -> dict[str, Any]:
        """The last line of its stdout that is a JSON object."""
        text = self.out.read_text(errors="replace") if self.out else ""
        for line in reversed(text.splitlines()):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
        raise ChildFailed(f"{self.tag}: no JSON result on stdout")

    def why(self) -> str:
        return last_error(self.err)


def last_error(path: Path) -> str:
    """The line that says why a child failed: its exception, else its last line."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no stderr"
    for line in reversed(lines):
        if _ERROR_LINE.match(line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def pythonpath() -> str:
    """The checkout first, then whatever the caller set (wheels carried to a GPU host, such
    as structlog for the observer, arrive that way)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def python(script: Path | str, *args: str) -> list[str]:
    """argv of a bench script run by this interpreter."""
    return [sys.executable, str(script), *args]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def observer_config(
    run_dir: Path,
    state_dir: Path,
    *,
    interval_ms: int = 0,
    clock_normalise: str = "",
    clock_max_speedup_pct: int = 0,
    mps_gpus: Sequence[str] = (),
    mps_control: str = "",
) -> str:
    """fcsp-observer's config over a bench's slots: no metrics port, a state_dir of the
    bench's own; what is left empty or 0 keeps the observer's default."""
    lines = ["[paths]", f'run_dir = "{run_dir}"', f'state_dir = "{state_dir}"']
    lines += ["[observer]", "metrics_port = 0"]
    if interval_ms:
        lines.append(f"interval_ms = {interval_ms}")
    if clock_normalise:
        lines.append(f'clock_normalise = "{clock_normalise}"')
    if clock_max_speedup_pct:
        lines.append(f"clock_max_speedup_pct = {clock_max_speedup_pct}")
    if mps_gpus:
        gpus = ", ".join(f'"{uuid}" = "mps"' for uuid in mps_gpus)
        lines += ["[backend]", f"gpus = {{ {gpus} }}"]
        if mps_control:
            lines.append(f'mps_control = "{mps_control}"')
    return "\n".join(lines) + "\n"


def usage_snapshot(slot: Path) -> dict[str, Any]:
    """Per-device counters and live process records of a slot's usage file."""
    count = min(int(files.read_limits(slot / abi.LIMITS_FILE).device_count), abi.MAX_DEVICES)
    usage = files.read_usage(slot / abi.USAGE_FILE)
    devices = [
        {
            "mem_used": int(d.mem_used_bytes),
            "mem_peak": int(d.mem_peak_bytes),
            "mem_rejected": int(d.mem_rejected),
            "launches": int(d.launches),
            "busy_ns": int(d.busy_ns),
            "throttled_ns": int(d.throttled_ns),
        }
        for d in list(usage.device)[:count]
    ]
    procs = [
        {"pid": int(p.pid), "mem_used": [int(v) for v in list(p.mem_used_bytes)[:count]]}
        for p in usage.proc
        if p.state == abi.ProcState.LIVE
    ]
    return {"devices": devices, "procs": procs}


class Barrier:
    """Workers that start measuring together: each touches ready-<tag> once warmed up and
    waits for `go` (see await_go), so no worker measures while another still starts up."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def wait(self, children: Sequence[Child], timeout: float) -> int:
        """Until every child is ready, one exited, or `timeout`: how many are ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = len(list(self.directory.glob("ready-*")))
            if ready >= len(children) or any(c.proc.poll() is not None for c in children):
                return ready
            time.sleep(0.01)
        return len(list(self.directory.glob("ready-*")))

    def go(self) -> float:
        (self.directory / "go").touch()
        return time.monotonic()


def await_go(directory: Path | str, tag: str, timeout: float = 180.0) -> None:
    """The worker's side of a Barrier."""
    Path(directory, f"ready-{tag}").touch()
    go = Path(directory, "go")
    deadline = time.monotonic() + timeout
    while not go.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no go signal within {timeout:.0f} s")
        time.sleep(0.002)


class FakeShim:
    """libvgpu.so's part in a usage file, played by a process without a GPU, so that the
    observer sees a tenant's launches, GPU time and unmet demand."""

    _DEVICE = struct.Struct("<9Q")  # fcsp_usage_device up to demand_centi

    def __init__(self, slot: Path) -> None:
        self.fd = os.open(slot / abi.USAGE_FILE, os.O_RDWR)

    def report(self, launches: int, busy_ns: int, throttled_ns: int) -> None:
        data = self._DEVICE.pack(0, 0, 0, 0, launches, launches, busy_ns, throttled_ns, 0)
        os.pwrite(self.fd, data, abi.Usage.device.offset)

    def close(self) -> None:
        os.close(self.fd)


class Scene:
    """Slots, tenant processes, fcsp-observer and MPS daemons of one bench run."""

    def __init__(
        self,
        work: Path,
        raw: Path | None = None,
        *,
        shim: Path = SHIM,
        state_dir: Path | None = None,
        name: str = "",
    ) -> None:
        self.work = work
        self.raw = raw or work
        self.shim = shim
        self.name = name  # tells this scene's observer log from others' in a shared raw dir
        self.run_dir = work / "run"
        self.state_dir = state_dir or work / "state"
        self.config_path = work / "observer.toml"
        self.children: list[Child] = []
        self.observer: subprocess.Popen[bytes] | None = None
        self.mps_control = ""
        self.mps_gpus: tuple[str, ...] = ()
        for directory in (self.work, self.raw):
            directory.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- slots ---------------------------------------------------------------------

    def slot_dir(self, name: str, observed: bool = True) -> Path:
        if observed:
            return files.slot_path(self.run_dir, name)
        return self.work / "slots" / name

    def slot(
        self,
        name: str,
        devices: Sequence[Device] | None = None,
        *,
        mode: abi.IsolationMode = abi.IsolationMode.BALANCED,
        priority: abi.Priority = abi.Priority.BEST_EFFORT,
        mem_mode: abi.MemMode = abi.MemMode.HARD,
        spill_centi: int = 0,
        uvm_profile: str = "default",
        observed: bool = True,
    ) -> Path:
        """A fresh slot, as the hook writes it.  observed: in the run_dir the observer
        watches; a private slot is one the observer must not count (strict requests of
        tenants it cannot see would otherwise add up past 100 % and scale every one down)."""
        if observed:
            files.ensure_tenants_dir(self.run_dir)
        directory = self.slot_dir(name, observed)
        directory.parent.mkdir(parents=True, exist_ok=True)
        limits = tuple(
            files.DeviceLimits(
                host_index=d.host_index,
                uuid=d.uuid,
                mem_limit_bytes=d.mem_bytes,
                sm_requested_centi=d.sm_centi,
                backend=d.backend,
                mps_threads_centi=d.mps_threads_centi,
                mem_spill_centi=spill_centi,
            )
            for d in devices or (Device(),)
        )
        spec = files.SlotSpec(
            container_id=name,
            tenant=name,
            isolation_mode=mode,
            mem_mode=mem_mode,
            priority=priority,
            devices=limits,
            uvm=uvm.PROFILES[uvm_profile],
        )
        files.write_slot(directory, spec, {})
        return directory

    def drop_slot(self, name: str, observed: bool = True) -> None:
        """Gone, as after its container's poststop."""
        if observed:
            files.remove_slot(self.run_dir, name)
        else:
            shutil.rmtree(self.slot_dir(name, observed), ignore_errors=True)

    # ---- processes -------------------------------------------------------------------

    def env(
        self,
        slot: Path | None = None,
        *,
        visible: str | None = None,
        preload: bool = True,
        extra: dict[str, str] | None = None,
    ) -> dict[str, str]:
        """A tenant's environment: the caller's without BUD_*, FCSP_* and LD_PRELOAD (they
        would configure the shim behind the bench's back), then the slot and the shim."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("BUD_", "FCSP_")) and k != "LD_PRELOAD"
        }
        env["PYTHONUNBUFFERED"] = "1"
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        if slot is not None:
            env["FCSP_SLOT_DIR"] = str(slot)
            if preload:
                env["LD_PRELOAD"] = str(self.shim)
        env.update(extra or {})
        return env

    def spawn(
        self,
        tag: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        interactive: bool = False,
        pass_fds: Sequence[int] = (),
    ) -> Child:
        """Start a child, stdout to RAW/<tag>.out (or a pipe if interactive), stderr to
        RAW/<tag>.err."""
        err = self.raw / f"{tag}.err"
        out: Path | None = None if interactive else self.raw / f"{tag}.out"
        with contextlib.ExitStack() as stack:
            stderr = stack.enter_context(err.open("w"))
            stdout: Any = subprocess.PIPE
            if out is not None:
                stdout = stack.enter_context(out.open("w"))
            proc = subprocess.Popen(
                argv,
                env=self.env() if env is None else env,
                stdin=subprocess.PIPE if interactive else subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                text=True,
                bufsize=1 if interactive else -1,
                pass_fds=tuple(pass_fds),
            )
        child = Child(tag, proc, out, err)
        self.children.append(child)
        return child

    def collect(
        self, children: Sequence[Child], timeout: float, grace: float = GRACE_S
    ) -> list[dict[str, Any] | Exception]:
        """Wait for all; once one fails, the others get `grace` seconds; then each one's
        result, or the exception saying why it has none."""
        end = time.monotonic() + max(1.0, timeout)
        while time.monotonic() < end and any(c.proc.poll() is None for c in children):
            if any(c.proc.poll() not in (None, 0) for c in children):
                end = min(end, time.monotonic() + grace)
            time.sleep(0.05)
        results: list[dict[str, Any] | Exception] = []
        for c in children:
            timed_out = c.proc.poll() is None
            if timed_out:
                c.proc.kill()
                c.proc.wait()
            with contextlib.suppress(ValueError):
                self.children.remove(c)
            if timed_out:
                results.append(ChildFailed(f"{c.tag}: killed after the time limit"))
            elif c.proc.returncode != 0:
                results.append(ChildFailed(f"{c.tag}: exit {c.proc.returncode}: {c.why()}"))
            else:
                try:
                    results.append(c.result())
                except ChildFailed as exc:
                    results.append(exc)
        return results

    def collect_one(self, child: Child, timeout: float) -> dict[str, Any]:
        (result,) = self.collect([child], timeout)
        if isinstance(result, Exception):
            raise result
        return result

    def kill_all(self) -> None:
        for c in self.children:
            if c.proc.poll() is None:
                c.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(timeout=5)
        self.children.clear()

    # ---- fcsp-observer ------------------------------------------------------------------

    def start_observer(
        self,
        *,
        interval_ms: int = 0,
        clock_normalise: str = "",
        clock_max_speedup_pct: int = 0,
        mps_gpus: Sequence[str] = (),
        mps_control: str = "",
    ) -> None:
        """fcsp-observer from this checkout over the scene's run_dir (once per scene).
        `python -m` puts the working directory first on the path: run from the checkout,
        so that a bench of another checkout never starts this one's observer."""
        if self.observer is not None:
            return
        files.ensure_tenants_dir(self.run_dir)
        self.config_path.write_text(
            observer_config(
                self.run_dir,
                self.state_dir,
                interval_ms=interval_ms,
                clock_normalise=clock_normalise,
                clock_max_speedup_pct=clock_max_speedup_pct,
                mps_gpus=mps_gpus,
                mps_control=mps_control,
            )
        )
        self.mps_gpus, self.mps_control = tuple(mps_gpus), mps_control
        log = self.raw / (f"observer-{self.name}.log" if self.name else "observer.log")
        with log.open("wb") as out:
            self.observer = subprocess.Popen(
                [sys.executable, "-m", "fcsp_hook.observer", "--config", str(self.config_path)],
                env={**os.environ, "PYTHONPATH": pythonpath()},
                stdout=out,
                stderr=out,
                cwd=REPO,
            )

    def stop_observer(self) -> int | None:
        """SIGTERM, and wait for it; its exit status (None if none ran)."""
        proc, self.observer = self.observer, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=OBSERVER_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def observer_state(self) -> dict[str, Any]:
        """The observer's published state (<run_dir>/observer.json); {} before its first."""
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads((self.run_dir / OBSERVER_STATE).read_text())
            if isinstance(doc, dict):
                return doc
        return {}

    def observer_cpu_s(self) -> float:
        """User + system CPU seconds the observer has used; nan without one."""
        if self.observer is None:
            return float("nan")
        return sum(cpu_seconds(self.observer.pid))

    # ---- MPS -------------------------------------------------------------------------------

    def mps_threads(
        self,
        name: str,
        uuid: str,
        sm_centi: int,
        mode: abi.IsolationMode,
        priority: abi.Priority,
    ) -> int:
        """The thread percentage the hook grants a new MPS tenant: latency tenants' shares
        are kept free for them."""
        reserved = mps.latency_reserve(files.tenants_dir(self.run_dir), uuid, name)
        return mps.threads_centi(sm_centi, mode, priority, reserved)

    def wait_mps(self, uuid: str, timeout: float = 30.0) -> None:
        """Until the observer's daemon for `uuid` serves clients: an MPS client must find
        it when CUDA initialises, or it runs without MPS."""
        deadline = time.monotonic() + timeout
        while not mps.ready(self.run_dir, uuid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no MPS daemon: {mps.read_state(self.run_dir, uuid)}")
            time.sleep(0.02)

    def link_mps(self, slot: Path, uuid: str) -> None:
        """What the hook mounts into a container, as a link for a bare process, and the
        thread ceiling it sets for the GPU's clients before the tenant runs."""
        (slot / abi.MPS_DIR).symlink_to(mps.client_dir(self.run_dir, uuid))
        with files.slots_locked(self.run_dir):
            mps.hold_ceiling(self.run_dir, uuid, self.mps_control)

    def mps_state(self, uuid: str) -> dict[str, object]:
        """The observer's account of its daemon: pid, restarts, faults, the last error."""
        return mps.read_state(self.run_dir, uuid)

    def mps_ready(self, uuid: str) -> bool:
        return mps.ready(self.run_dir, uuid)

    def stop_mps(self) -> None:
        """The observer leaves its daemons to clients that still run; a bench ends them."""
        from fcsp_hook.observer import mpsd  # noqa: PLC0415  # only for MPS scenes

        program = self.mps_control or "nvidia-cuda-mps-control"
        for uuid in self.mps_gpus:
            with contextlib.suppress(ValueError):  # not a GPU UUID: the observer started none
                daemon = mpsd.Daemon(self.run_dir, uuid, program)
                # The daemon's own pid file: if `quit` cannot reach it, it is killed.
                pid_file = mps.gpu_dir(self.run_dir, uuid) / "pipe" / mpsd.PID_FILE
                with contextlib.suppress(OSError):
                    daemon.state.pid = int(pid_file.read_text().strip() or 0)
                daemon.stop()
        self.mps_gpus = ()

    def close(self) -> None:
        self.kill_all()
        self.stop_observer()
        if self.mps_gpus:
            self.stop_mps()


# ---- the command line of the shell benches --------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m lib.scene",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("slot", help="write a one-GPU slot (host index 0) to DIR")
    s.add_argument("dir", type=Path)
    s.add_argument("--mem", type=int, default=0, help="memory quota in bytes; 0: none")
    s.add_argument("--sm-centi", type=int, default=abi.WHOLE_GPU_CENTI, help="1/100 %%")
    s.add_argument("--id", default="bench", help="container id in the limits")
    u = sub.add_parser("usage", help="print one counter of device 0 in DIR's usage file")
    u.add_argument("dir", type=Path)
    u.add_argument("field", help="mem_used_bytes, mem_peak_bytes, launches, throttled_ns, ...")
    args = parser.parse_args(argv)
    if args.cmd == "slot":
        device = files.DeviceLimits(
            host_index=0, mem_limit_bytes=args.mem, sm_requested_centi=args.sm_centi
        )
        args.dir.mkdir(parents=True, exist_ok=True)
        files.write_slot(args.dir, files.SlotSpec(container_id=args.id, devices=(device,)), {})
        print(args.dir)
    else:
        device0 = files.read_usage(args.dir / abi.USAGE_FILE).device[0]
        print(getattr(device0, args.field))
    return 0


if __name__ == "__main__":
    sys.exit(main())
