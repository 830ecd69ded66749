"""Containers of a pod that are not FCSP's: the CRI runtimes copy a pod's annotations into
every container's spec, the pause (sandbox) container and GPU-less sidecars included.
fcsp-runtime and the hook leave those untouched with one log line, without checking the
fcsp.* values (per-GPU keys name GPUs they do not have), and still refuse malformed values
for the containers that see GPUs.  In-process, on bundles as containerd writes them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from fcsp_hook import config, oci
from fcsp_hook.errors import AnnotationError
from fcsp_hook.hook import prestart, runtime
from fcsp_hook.log import HookLogger

POD = {"fcsp.sm": "30", "fcsp.sm.0": "30", "fcsp.mem.0": "1G", "fcsp.tenant": "a"}
SANDBOXES = {
    "containerd": {"io.kubernetes.cri.container-type": "sandbox"},
    "cri-o": {"io.kubernetes.cri-o.ContainerType": "sandbox"},
    "cri-dockerd": {"io.kubernetes.docker.type": "podsandbox"},
}
CONTAINERD_CONTAINER = {"io.kubernetes.cri.container-type": "container"}
UUID = "GPU-8d3b1c52-5a2e-4f6b-9a1d-0c2e4f6a8b10"


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    """config.toml with a library, a log, and a host with GPUs 0 and 1 (GPU 1 named)."""
    dev, driver = tmp_path / "dev", tmp_path / "driver"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl"):
        (dev / name).touch()
    info = driver / "gpus" / "0000:02:00.0" / "information"
    info.parent.mkdir(parents=True)
    info.write_text(f"GPU UUID: \t {UUID}\nDevice Minor: \t 1\n")
    (tmp_path / "libvgpu.so").touch()
    path = tmp_path / "config.toml"
    path.write_text(
        f'[hook]\nlibrary = "{tmp_path}/libvgpu.so"\nlog_file = "{tmp_path}/hook.log"\n'
        f'[paths]\nrun_dir = "{tmp_path}/run"\ndev_dir = "{dev}"\ndriver_dir = "{driver}"\n'
    )
    return path


def _bundle(
    tmp_path: Path,
    annotations: dict[str, str],
    env: list[str] | None = None,
    devices: list[dict[str, Any]] | None = None,
) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs").mkdir(parents=True)
    doc = {
        "ociVersion": "1.0.2-dev",
        "process": {"args": ["/pause"], "env": ["PATH=/bin", *(env or [])]},
        "root": {"path": "rootfs", "readonly": True},
        "annotations": annotations,
        "linux": {"devices": devices or []},
    }
    (bundle / "config.json").write_text(json.dumps(doc))
    return bundle


def _prepare(bundle: Path, cfg_path: Path) -> str:
    raw = (bundle / "config.json").read_bytes()
    return runtime.prepare_bundle(str(bundle), raw, str(cfg_path), config.load(cfg_path))


def _records(cfg_path: Path) -> list[dict[str, Any]]:
    log = cfg_path.parent / "hook.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _plan(bundle: Path, cfg_path: Path) -> prestart.Setup | None:
    annotations = json.loads((bundle / "config.json").read_text())["annotations"]
    state = oci.State("ctr-1", "creating", os.getpid(), bundle, annotations)
    cfg = config.load(cfg_path)
    return prestart.plan_setup(state, cfg, HookLogger(path=cfg.hook.log_file))


@pytest.mark.parametrize("marks", SANDBOXES.values(), ids=SANDBOXES.keys())
@pytest.mark.parametrize("values", [POD, {**POD, "fcsp.sm": "abc"}], ids=["per-gpu", "malformed"])
def test_runtime_leaves_a_pod_sandbox_untouched(
    tmp_path: Path, cfg_path: Path, marks: dict[str, str], values: dict[str, str]
) -> None:
    """A sandbox spec with the pod's fcsp.* annotations (per-GPU keys, even a malformed
    value) and the image's NVIDIA_VISIBLE_DEVICES=all: config.json is not rewritten, the
    values are not checked, and the reason is the one line returned for the log."""
    bundle = _bundle(tmp_path, {**values, **marks}, ["NVIDIA_VISIBLE_DEVICES=all"])
    before = (bundle / "config.json").read_bytes()
    ((key, value),) = marks.items()
    assert _prepare(bundle, cfg_path) == f"pod sandbox container ({key}={value}); left untouched"
    assert (bundle / "config.json").read_bytes() == before


@pytest.mark.parametrize(
    "env", [[], ["NVIDIA_VISIBLE_DEVICES=void"], ["NVIDIA_VISIBLE_DEVICES="]], ids=str
)
@pytest.mark.parametrize("values", [POD, {**POD, "fcsp.mem": "8GB?"}], ids=["per-gpu", "malformed"])
def test_runtime_leaves_a_gpu_less_sidecar_untouched(
    tmp_path: Path, cfg_path: Path, env: list[str], values: dict[str, str]
) -> None:
    """A container of the pod that sees no GPU: not rewritten, not checked, one line why."""
    bundle = _bundle(tmp_path, {**values, **CONTAINERD_CONTAINER}, env)
    before = (bundle / "config.json").read_bytes()
    assert _prepare(bundle, cfg_path) == "no GPU requested; container left untouched"
    assert (bundle / "config.json").read_bytes() == before


def test_runtime_adds_the_hooks_to_the_pods_gpu_container(tmp_path: Path, cfg_path: Path) -> None:
    """The same pod annotations on a container with a GPU (the device plugin's UUID and
    device spec): valid for its one GPU, so the hooks go into config.json."""
    node = {"path": "/dev/nvidia1", "type": "c", "major": 195, "minor": 1}
    bundle = _bundle(
        tmp_path, {**POD, **CONTAINERD_CONTAINER}, [f"NVIDIA_VISIBLE_DEVICES={UUID}"], [node]
    )
    assert _prepare(bundle, cfg_path) == "FCSP hooks added to config.json"
    hooks = json.loads((bundle / "config.json").read_text())["hooks"]
    assert set(hooks) == {"createRuntime", "poststop"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"fcsp.sm": "abc"}, 'annotation fcsp.sm="abc" is invalid'),
        ({"fcsp.sm.1": "30"}, "GPU index 1 is out of range"),
    ],
)
def test_runtime_still_refuses_malformed_values_where_there_is_a_gpu(
    tmp_path: Path, cfg_path: Path, values: dict[str, str], message: str
) -> None:
    """A container that sees a GPU is checked as before: a malformed value or a per-GPU key
    past its GPUs is one error line, config.json untouched."""
    bundle = _bundle(tmp_path, {**values, **CONTAINERD_CONTAINER}, ["NVIDIA_VISIBLE_DEVICES=0"])
    before = (bundle / "config.json").read_bytes()
    with pytest.raises(AnnotationError, match=message):
        _prepare(bundle, cfg_path)
    assert (bundle / "config.json").read_bytes() == before


def test_hook_leaves_a_pod_sandbox_untouched_with_one_line(tmp_path: Path, cfg_path: Path) -> None:
    """The hook (run from hooks.d under CRI-O, or where a runtime added it): a sandbox is
    not planned, whatever its values, and one info line names the annotation that says so."""
    annotations = {**POD, "fcsp.sm": "abc", **SANDBOXES["cri-o"]}
    bundle = _bundle(tmp_path, annotations, ["NVIDIA_VISIBLE_DEVICES=all"])
    assert _plan(bundle, cfg_path) is None
    (record,) = _records(cfg_path)
    assert record["event"] == "pod sandbox container; left untouched"
    assert record["sandbox"] == "io.kubernetes.cri-o.ContainerType=sandbox"
    assert record["level"] == "info"


def test_hook_leaves_a_gpu_less_sidecar_untouched_with_one_line(
    tmp_path: Path, cfg_path: Path
) -> None:
    """A sidecar with per-GPU keys it has no GPU for: not planned, one info line why."""
    bundle = _bundle(tmp_path, {**POD, **CONTAINERD_CONTAINER})
    assert _plan(bundle, cfg_path) is None
    (record,) = _records(cfg_path)
    assert record["event"] == "no GPU requested; container left untouched"


def test_hook_plans_the_gpu_container_and_logs_a_disagreement(
    tmp_path: Path, cfg_path: Path
) -> None:
    """The env names GPU 0 but the only node is GPU 1's: the hook plans GPU 1 (what the
    container can open, named by the driver's UUID) with the pod's values, and logs one
    warning saying the two disagree."""
    node = {"path": "/dev/nvidia1", "type": "c", "major": 195, "minor": 1}
    bundle = _bundle(
        tmp_path, {**POD, **CONTAINERD_CONTAINER}, ["NVIDIA_VISIBLE_DEVICES=0"], [node]
    )
    setup = _plan(bundle, cfg_path)
    assert setup is not None
    assert [(g.host_index, g.uuid) for g in setup.gpus] == [(1, UUID)]
    assert [d.sm_centi for d in setup.request.devices] == [3000]
    assert [d.mem.bytes for d in setup.request.devices] == [1 << 30]
    (record,) = _records(cfg_path)
    assert record["level"] == "warning"
    assert "NVIDIA_VISIBLE_DEVICES='0' and the spec's device nodes disagree" in record["event"]
    assert record["gpus"] == [UUID]
