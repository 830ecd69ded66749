"""bench/lib without a GPU: the report writer, the scene orchestrator, the sampler.

The scene runs real processes: Python children for results and failures, and a tenant
under libvgpu.so on the simulated driver (tests/build/sim) next to a real fcsp-observer.
The sampler reads the simulated NVML in a child process (NVML's library is chosen when
the process starts).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fcsp_hook import config
from fcsp_hook.slot import abi, files
from tests.shim.harness import PROG_DIR, SIM_DIR, build, sim_uuid

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

from lib import report, scene  # noqa: E402  # bench/ is not a package
from lib.gpu import Sample, Sampler, nvidia_smi  # noqa: E402

MiB = 1 << 20
META = {
    "gpus": {
        "source": "pynvml",
        "gpus": [
            {"index": 0, "name": "NVIDIA H200", "uuid": "GPU-a", "memory_total": 1},
            {"index": 1, "name": "NVIDIA H200", "uuid": "GPU-b", "memory_total": 1},
        ],
        "driver": "580.159.04",
        "cuda_driver": "13.0",
    },
    "commit": "abc1234",
    "command": "OUT=/x bash bench/gpu_compute.sh",
    "date": "2026-01-02 03:04 UTC",
}


def wait_for(what: str, predicate: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for: {what}")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No bench variable of the caller's leaks into a command line or a child."""
    for name in list(os.environ):
        if report._shown(name) or name == "BENCH_COMMAND" or name.startswith(("BUD_", "FCSP_")):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: MPS and observer socket paths must stay under 108 bytes."""
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    path = Path(tempfile.mkdtemp(prefix="fbl-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---- the report writer ---------------------------------------------------------------------


def test_header_names_what_it_measures_the_gpu_commit_command_and_date(tmp_path: Path) -> None:
    """The standard header, in order, then the bench's own lines and its tables."""
    doc = report.Report("compute", "Title", "What it measures.", tmp_path, meta=META)
    doc.extra.append("torch 2.11.0")
    doc.table(["size", "result"], [["20us", "PASS"], [500, "FAIL"]])
    path = doc.write()
    assert path == tmp_path / "compute.md"
    assert path.read_text().splitlines() == [
        "# Title",
        "",
        "What it measures.",
        "",
        "- GPU: 2 x NVIDIA H200, driver 580.159.04, CUDA 13.0",
        "- commit: abc1234",
        "- command: `OUT=/x bash bench/gpu_compute.sh`",
        "- date: 2026-01-02 03:04 UTC",
        "- torch 2.11.0",
        "",
        "| size | result |",
        "|---|---|",
        "| 20us | PASS |",
        "| 500 | FAIL |",
    ]


def test_header_says_when_no_gpu_was_found_or_none_is_used(tmp_path: Path) -> None:
    """A GPU-less host is named as such, with why; a bench that needs none says so."""
    meta = {**META, "gpus": {"source": "none", "gpus": [], "error": "pynvml: missing"}}
    found = report.Report("memory", "T", "M", tmp_path, meta=meta).header()
    assert "- GPU: none found (pynvml: missing)" in found
    unused = report.Report("hook-latency", "T", "M", tmp_path, meta=META, with_gpu=False)
    assert "- GPU: not used" in unused.header()


def test_a_document_must_be_one_of_the_living_results_files(tmp_path: Path) -> None:
    """Dated or per-backend names are refused: each bench has one file, updated in place."""
    with pytest.raises(ValueError, match="observer-mps"):
        report.Report("observer-mps", "T", "M", tmp_path, meta=META)


def test_live_header_takes_git_head_the_command_line_and_utc_now(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """Collected as the bench runs: the checkout's commit, the bench variables set in front
    of this process's command line, and the date in UTC."""
    clean_env.setenv("OUT", "/some dir")
    clean_env.setenv("BENCH_SECONDS", "2")
    clean_env.setattr(sys, "argv", [str(BENCH / "gpu_compute.py"), "run", "--x"])
    meta = report.collect_meta(with_gpu=False)
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if head:
        assert meta["commit"].split()[0] == head
    assert meta["command"] == "BENCH_SECONDS=2 OUT='/some dir' python3 bench/gpu_compute.py run --x"
    when = datetime.datetime.strptime(meta["date"], "%Y-%m-%d %H:%M UTC")
    assert abs((datetime.datetime.utcnow() - when).total_seconds()) < 3600
    assert "gpus" not in meta


def test_a_copy_without_git_names_fcsp_commit(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Carried to a GPU host without .git, the commit comes from FCSP_COMMIT."""
    clean_env.setattr(report, "REPO", tmp_path)
    assert report.commit().startswith("unknown")
    clean_env.setenv("FCSP_COMMIT", "1a2b3c4")
    assert report.commit() == "1a2b3c4"


def test_a_shell_bench_records_what_the_operator_typed(clean_env: pytest.MonkeyPatch) -> None:
    """`lib.report command` quotes the words and shows the bench variables (BENCH_COMMAND
    itself never); a Python bench started by that script reports that command."""
    clean_env.setenv("BENCH_SIZES", "1792,6144")
    clean_env.setenv("BENCH_COMMAND", "stale")
    line = report.shell_command(["bash", "bench/gpu_compute.sh", "a b"])
    assert line == "BENCH_SIZES=1792,6144 bash bench/gpu_compute.sh 'a b'"
    clean_env.setenv("BENCH_COMMAND", line)
    assert report.command_line(["whatever.py"]) == line


def test_header_command_for_shell_benches(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`python3 -m lib.report header` prints the same header a Python bench writes."""
    env = {**os.environ, "PYTHONPATH": str(BENCH), "BENCH_COMMAND": "bash bench/gpu_memory.sh"}
    done = subprocess.run(
        [sys.executable, "-m", "lib.report", "header", "--name", "memory", "--title", "T",
         "--measures", "M", "--no-gpu", "--extra", "torch 2.11"],
        env=env, capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    lines = done.stdout.splitlines()
    assert lines[:5] == ["# T", "", "M", "", "- GPU: not used"]
    assert "- command: `bash bench/gpu_memory.sh`" in lines
    assert lines[-1] == "- torch 2.11"


def test_plot_without_matplotlib_leaves_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No matplotlib on the host: no PNG, the document says why, the tables stay."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    doc = report.Report("compute", "T", "M", tmp_path, meta=META)
    assert doc.plot(lambda plt: plt.figure()) is None
    doc.write()
    assert "(no plot: matplotlib is not installed)" in doc.path.read_text()
    assert not list(tmp_path.glob("*.png"))


def test_plot_writes_a_png_beside_the_document(tmp_path: Path) -> None:
    """<name>-<what>.png next to <name>.md, linked from it."""
    pytest.importorskip("matplotlib")
    doc = report.Report("observer", "T", "M", tmp_path, meta=META)

    def draw(plt: object) -> object:
        fig, ax = plt.subplots()  # type: ignore[attr-defined]
        ax.plot([0, 1], [0, 1])
        return fig

    path = doc.plot(draw, "workday")
    assert path == tmp_path / "observer-workday.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![workday](observer-workday.png)" in doc.render()


def test_probes_sharing_a_document_replace_only_their_own_part(tmp_path: Path) -> None:
    """Two probes write one document; running one again replaces its part in place."""

    def write(part: str, body: str) -> str:
        doc = report.Report("compute-diagnosis", part, "M", tmp_path, meta=META, part=part)
        doc.add(body)
        doc.write()
        return doc.path.read_text()

    write("clock", "clock v1")
    write("turns", "turns v1")
    text = write("clock", "clock v2")
    assert text.startswith(f"# {report.DOCUMENTS['compute-diagnosis']}\n")
    assert "clock v1" not in text
    assert text.count("## clock") == 1
    assert text.index("clock v2") < text.index("turns v1")


def test_render_from_saved_raw_results(tmp_path: Path) -> None:
    """gpu_multigpu.py renders a saved results.json with the header it ran under; a section
    whose renderer breaks becomes one line, the others stay."""
    import gpu_multigpu  # noqa: PLC0415  # bench/, on sys.path above

    results = {
        "meta": {**{k: v for k, v in META.items() if k != "gpus"}, "seconds": 3, "build_ok": True},
        "gpus": META["gpus"],
        "pair": META["gpus"]["gpus"],  # type: ignore[index]
        "mapping": {"runs": "not a list"},
        "nccl": {"error": "needs 2 GPUs"},
    }
    text = gpu_multigpu.render(results)
    assert text.startswith(f"# {gpu_multigpu.TITLE}\n")
    assert "- commit: abc1234" in text
    assert "- used: GPU0 = A = host 0, GPU1 = B = host 1" in text
    assert "(render_mapping failed: " in text
    assert "## 2. Per-device shares: two tenants on two GPUs\n\nnot run" in text
    assert "| whole section | failed: needs 2 GPUs |" in text


# ---- the scene orchestrator -------------------------------------------------------------


def test_slots_carry_devices_mode_and_priority_and_go_like_after_poststop(tmp_path: Path) -> None:
    """Observed slots are where the observer looks, private ones are not; dropping one
    removes it."""
    s = scene.Scene(tmp_path / "work")
    device = scene.Device(host_index=1, uuid="GPU-abc", sm_centi=3000, mem_bytes=MiB)
    slot = s.slot("t1", [device], mode=abi.IsolationMode.STRICT, priority=abi.Priority.LATENCY)
    assert slot == files.slot_path(s.run_dir, "t1")
    limits = files.read_limits(slot / abi.LIMITS_FILE)
    assert (limits.device_count, limits.isolation_mode, limits.priority) == (
        1, abi.IsolationMode.STRICT, abi.Priority.LATENCY,
    )  # fmt: skip
    entry = limits.device[0]
    assert (entry.host_index, entry.uuid, entry.sm_requested_centi, entry.mem_limit_bytes) == (
        1, b"GPU-abc", 3000, MiB,
    )  # fmt: skip
    private = s.slot(
        "p1", observed=False, mem_mode=abi.MemMode.SPILL, spill_centi=5000, uvm_profile="training"
    )
    assert private.parent == s.work / "slots"
    spill = files.read_limits(private / abi.LIMITS_FILE)
    assert (spill.mem_mode, spill.device[0].mem_spill_centi, spill.uvm_profile) == (
        abi.MemMode.SPILL, 5000, abi.UvmProfile.TRAINING,
    )  # fmt: skip
    assert sorted(p.name for p in files.tenants_dir(s.run_dir).iterdir()) == ["t1"]
    s.drop_slot("t1")
    s.drop_slot("p1", observed=False)
    assert not slot.exists() and not private.exists()


def test_tenant_env_keeps_the_callers_shim_settings_out(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """BUD_*, FCSP_* and LD_PRELOAD of the caller never reach a tenant; its own slot and
    the shim do."""
    clean_env.setenv("BUD_SM_LIMIT", "10")
    clean_env.setenv("FCSP_SLOT_DIR", "/elsewhere")
    clean_env.setenv("LD_PRELOAD", "/other.so")
    s = scene.Scene(tmp_path, shim=tmp_path / "libvgpu.so")
    slot = s.slot("t1")
    env = s.env(slot, visible="GPU-1", extra={"NCCL_NVLS_ENABLE": "0"})
    assert "BUD_SM_LIMIT" not in env
    assert env["FCSP_SLOT_DIR"] == str(slot)
    assert env["LD_PRELOAD"] == str(tmp_path / "libvgpu.so")
    assert (env["CUDA_VISIBLE_DEVICES"], env["NCCL_NVLS_ENABLE"]) == ("GPU-1", "0")
    plain = s.env()
    assert "LD_PRELOAD" not in plain and "FCSP_SLOT_DIR" not in plain
    assert "LD_PRELOAD" not in s.env(slot, preload=False)


def test_collect_gives_each_result_or_why_there_is_none(tmp_path: Path) -> None:
    """A child's result is the last JSON line of its stdout; a failing child names its
    exception; a child past its time is killed; outputs stay in the raw directory."""
    s = scene.Scene(tmp_path / "work", tmp_path / "raw")
    ok = s.spawn("ok", [sys.executable, "-c", "print('warming up'); print('{\"ops\": 3}')"])
    bad = s.spawn("bad", [sys.executable, "-c", "raise RuntimeError('no CUDA')"])
    assert s.collect([ok, bad], timeout=60)[0] == {"ops": 3}
    assert (tmp_path / "raw" / "ok.out").read_text().startswith("warming up")
    with pytest.raises(scene.ChildFailed, match=r"^bad: exit 1: RuntimeError: no CUDA$"):
        raise s.collect([bad], timeout=60)[0]  # type: ignore[misc]
    slow = s.spawn("slow", [sys.executable, "-c", "import time; time.sleep(600)"])
    (late,) = s.collect([slow], timeout=1)
    assert isinstance(late, scene.ChildFailed)
    assert "killed after the time limit" in str(late)
    assert slow.proc.returncode is not None
    assert s.children == []


def test_barrier_holds_workers_until_all_are_ready(tmp_path: Path) -> None:
    """Each worker says it is ready and waits; none finishes before go."""
    s = scene.Scene(tmp_path)
    barrier = scene.Barrier(tmp_path / "barrier")
    code = (
        "import json, sys, time; from lib.scene import await_go; "
        "await_go(sys.argv[1], sys.argv[2]); print(json.dumps({'after_go': time.monotonic()}))"
    )
    env = {**s.env(), "PYTHONPATH": str(BENCH)}
    children = [
        s.spawn(f"w{i}", [sys.executable, "-c", code, str(barrier.directory), f"w{i}"], env=env)
        for i in range(2)
    ]
    assert barrier.wait(children, timeout=60) == 2
    assert all(c.proc.poll() is None for c in children)
    went = barrier.go()
    results = s.collect(children, timeout=60)
    assert all(isinstance(r, dict) and r["after_go"] >= went for r in results)


def test_fake_shim_counters_reach_the_usage_file(tmp_path: Path) -> None:
    """What a worker without a GPU reports is what the observer reads."""
    slot = scene.Scene(tmp_path).slot("t1")
    shim = scene.FakeShim(slot)
    shim.report(5, 7_000, 3_000)
    shim.close()
    device = scene.usage_snapshot(slot)["devices"][0]
    assert (device["launches"], device["busy_ns"], device["throttled_ns"]) == (5, 7_000, 3_000)


def test_observer_config_is_one_the_observer_accepts(tmp_path: Path) -> None:
    """The config a scene writes loads with fcsp_hook.config, settings as given."""
    text = scene.observer_config(
        tmp_path / "run", tmp_path / "state", interval_ms=20, clock_normalise="off",
        clock_max_speedup_pct=115, mps_gpus=["GPU-1"], mps_control="/usr/bin/mpsc",
    )  # fmt: skip
    path = tmp_path / "observer.toml"
    path.write_text(text)
    cfg = config.load(path)
    assert (cfg.paths.run_dir, cfg.paths.state_dir) == (tmp_path / "run", tmp_path / "state")
    assert (cfg.observer.interval_ms, cfg.observer.metrics_port) == (20, 0)
    assert (cfg.observer.clock_normalise, cfg.observer.clock_max_speedup_pct) == ("off", 115)
    assert cfg.backend.for_gpu("GPU-1", 0) == abi.Backend.MPS
    assert cfg.backend.mps_control == "/usr/bin/mpsc"
    defaults = scene.observer_config(tmp_path / "run", tmp_path / "state")
    assert "interval_ms" not in defaults and "[backend]" not in defaults


def test_scene_runs_a_tenant_under_the_shim_next_to_the_observer(
    clean_env: pytest.MonkeyPatch, short_tmp: Path
) -> None:
    """On the simulated driver: the observer (from this checkout) publishes the tenant, the
    shim in the tenant's process holds its quota, and close() ends the observer."""
    build()
    sim = {
        "LD_LIBRARY_PATH": str(SIM_DIR),
        "FCSP_SIM_STATE": str(short_tmp / "sim"),
        "FCSP_SIM_DEVICES": "1",
    }
    for key, value in sim.items():  # the observer inherits them; tenants get them as extra
        clean_env.setenv(key, value)
    with scene.Scene(short_tmp / "w") as s:
        slot = s.slot("t1", [scene.Device(mem_bytes=64 * MiB)])
        s.start_observer(interval_ms=20)
        observer = s.observer
        assert observer is not None
        wait_for(
            "t1 in the observer's state", lambda: "t1" in s.observer_state().get("tenants", {})
        )
        argv = [
            str(PROG_DIR / "drv_procaddr"),
            "init",
            "alloc",
            "mem",
            "48M",
            "alloc",
            "mem",
            "48M",
        ]
        client = s.spawn("client", argv, env=s.env(slot, extra=sim))
        assert client.proc.wait(timeout=60) == 0
        device = scene.usage_snapshot(slot)["devices"][0]
        assert (device["mem_peak"], device["mem_rejected"]) == (48 * MiB, 1)
        assert s.observer_cpu_s() >= 0
    assert observer.poll() is not None
    assert (s.raw / "observer.log").exists()


# ---- the sampler -------------------------------------------------------------------------------


def test_sampler_windows_means_and_drains() -> None:
    """Means over a window of monotonic time, per GPU; drain hands out each sample once."""
    sampler = Sampler(["GPU-a", 1])
    sampler.samples += [
        Sample(1.0, "GPU-a", 1000.0, 100.0),
        Sample(2.0, "GPU-a", 2000.0, 300.0),
        Sample(2.5, 1, 50.0, 50.0),
    ]
    assert sampler.mean("GPU-a") == {"mhz": 1500.0, "watts": 200.0, "samples": 2}
    assert sampler.mean("GPU-a", 1.5, 3.0) == {"mhz": 2000.0, "watts": 300.0, "samples": 1}
    assert sampler.mean(7) is None
    assert len(sampler.drain()) == 3
    assert sampler.drain() == []


def test_sampler_and_inventory_read_nvml(tmp_path: Path) -> None:
    """Through the simulated NVML: the GPU's UUID and power limit, and its SM clock, power
    and utilisation sampled in a thread."""
    build()
    clock = tmp_path / "clock"
    clock.write_text("1755 80 420 700\n")
    code = (
        "import json, time; from lib.gpu import Sampler, inventory; "
        "s = Sampler([0], period=0.01, util=True).start(); time.sleep(0.3); s.stop(); "
        "print(json.dumps({'inventory': inventory(), 'source': s.source, 'mean': s.mean(0)}))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(BENCH),
        "LD_LIBRARY_PATH": str(SIM_DIR),
        "FCSP_SIM_STATE": str(tmp_path / "sim"),
        "FCSP_SIM_DEVICES": "1",
        "FCSP_SIM_CLOCK_FILE": str(clock),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    got = json.loads(done.stdout)
    (gpu,) = got["inventory"]["gpus"]
    assert (gpu["uuid"], gpu["power_limit_w"]) == (sim_uuid(0), 700.0)
    assert got["source"] == "pynvml"
    assert got["mean"]["samples"] >= 1
    assert (got["mean"]["mhz"], got["mean"]["watts"], got["mean"]["util"]) == (1755, 420, 80)


def test_no_nvidia_smi_is_no_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The nvidia-smi fallback answers nothing, rather than failing, where there is none."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert nvidia_smi("index,name") == []
