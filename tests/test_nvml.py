"""fcsp_hook.nvml against the simulated NVML library (tests/sim): the inventory and the
per-GPU process lists the observer cross-checks, read through the real pynvml; and a host
without NVML (this one) reported as unavailable with the reason, never an exception."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.shim.harness import PROG_DIR, SIM_DIR, Env, build, read_until_ready, sim_uuid

REPO = Path(__file__).resolve().parent.parent
GiB = 1 << 30
PROBE = """
import json
from fcsp_hook import nvml
nv = nvml.Nvml()
gpus = nv.inventory()
print(json.dumps({
    "available": nv.available,
    "reason": nv.reason,
    "gpus": [[g.index, g.uuid, g.minor, g.memory_total] for g in gpus],
    "processes": {
        u: [[p.host_pid, p.used_bytes] for p in ps] for u, ps in nv.processes(gpus).items()
    },
}))
nv.close()
"""


def _probe(env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    doc = json.loads(out)
    assert isinstance(doc, dict)
    return doc


def test_inventory_and_process_lists_from_the_driver(tmp_path: Path) -> None:
    """Two GPUs: UUIDs, minors and totals; a process with memory on GPU 1 is listed there
    with its host pid and bytes, and nowhere else."""
    build()
    env = Env(state=tmp_path / "sim", devices=2, mem_bytes=4 * GiB)
    client = subprocess.Popen(
        [str(PROG_DIR / "drv_procaddr"), "init", "device", "1", "alloc", "mem", "64M", "wait"],
        env=env.environ(preload=False),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        read_until_ready(client)
        doc = _probe({**env.environ(preload=False), "PYTHONPATH": str(REPO)})
    finally:
        client.kill()
        client.communicate()
    assert doc["available"] is True
    assert doc["gpus"] == [[0, sim_uuid(0), 0, 4 * GiB], [1, sim_uuid(1), 1, 4 * GiB]]
    processes = doc["processes"]
    assert isinstance(processes, dict)
    assert processes[sim_uuid(0)] == []
    assert [pid for pid, _ in processes[sim_uuid(1)]] == [client.pid]
    assert processes[sim_uuid(1)][0][1] >= 64 << 20


def test_a_host_without_nvml_is_unavailable_with_the_reason() -> None:
    """No driver library: available False, the loader's reason, empty views; no traceback."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    doc = _probe(env)
    assert doc["available"] is False
    assert "libnvidia-ml" in str(doc["reason"]) or "NVML" in str(doc["reason"])
    assert doc["gpus"] == [] and doc["processes"] == {}
    assert SIM_DIR.exists()  # the simulated library is there; only not on this path
