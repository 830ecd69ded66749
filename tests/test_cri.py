"""Pods through containerd's CRI, end to end: a containerd of the tests' own (Debian's 1.6),
configured by `fcspctl install --engine containerd`, driven through its CRI v1 gRPC API as
a kubelet drives it, runs pods with runtime handler `fcsp` (fcsp-runtime -> runc -> the
hook).  Images are made locally, pods use host networking, and the simulated driver
stands in for the GPU, fake /dev/nvidia<N> nodes for the device plugin's device specs."""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found]  # 3.10 only

from fcsp_hook.slot import abi, files
from tests import containers
from tests.containers import (
    GLIBC_IN_ROOTFS,
    HOOK_CLIENT,
    NATIVE_RUNTIME,
    HookServer,
    HookSetup,
    forget_next_runtime,
)
from tests.cri import images
from tests.cri.client import Container, ContainerState, DeviceSpec, Mount, Pod
from tests.cri.containerd import (
    HANDLER,
    Containerd,
    base_config,
    containerd_usable,
    fcspctl_install,
)

pytestmark = pytest.mark.e2e

PAUSE = "fcsp.test/pause:1"
CUDA = "fcsp.test/cuda:1"  # like every CUDA image: NVIDIA_VISIBLE_DEVICES=all in its env
TOOL = "fcsp.test/tool:1"  # a sidecar's image: nothing about GPUs
LIB = "/run/fcsp/libvgpu.so"
CAT = str(GLIBC_IN_ROOTFS)
SLEEP = ("/bin/sleep", "3600")
UUIDS = {i: f"GPU-{i}{i}{i}{i}{i}{i}{i}{i}-5a2e-4f6b-9a1d-0c2e4f6a8b1{i}" for i in range(4)}
# The device plugin's volume-mounts strategy: the env names this directory, one mount
# per device under it.
VOLUME_MOUNTS_ROOT = "/var/run/nvidia-container-devices"
SANDBOX_EVENT = "pod sandbox container (io.kubernetes.cri.container-type=sandbox); left untouched"
NO_GPU_EVENT = "no GPU requested; container left untouched"


@dataclass
class Node:
    """The node under test: containerd, FCSP's config and logs, and the host's fake GPUs."""

    containerd: Containerd
    hook: HookSetup
    dev: Path
    base: Path

    def node(self, index: int) -> DeviceSpec:
        """/dev/nvidia<index> as the device plugin passes it (PASS_DEVICE_SPECS)."""
        return DeviceSpec(f"/dev/nvidia{index}", str(self.dev / f"nvidia{index}"))

    def pod(self, name: str, annotations: Mapping[str, str]) -> tuple[str, Pod]:
        logs = self.base / "logs" / name
        logs.mkdir(parents=True, exist_ok=True)
        config = Pod(
            name=name,
            uid=uuid.uuid4().hex,
            annotations=annotations,
            log_directory=str(logs),
            cgroup_parent=self.containerd.cgroup_parent,
        )
        return self.containerd.cri.run_pod(config, HANDLER), config

    def start(self, pod_id: str, pod: Pod, container: Container) -> str:
        cri = self.containerd.cri
        container_id = cri.create_container(pod_id, container, pod)
        cri.start_container(container_id)
        return container_id

    def remove_pod(self, pod_id: str) -> None:
        self.containerd.cri.stop_pod(pod_id)
        self.containerd.cri.remove_pod(pod_id)

    def records(self, container_id: str) -> list[dict[str, object]]:
        return [r for r in self.hook.log_records() if r.get("container_id") == container_id]

    def inside(self, container_id: str, *command: str) -> str:
        done = self.containerd.cri.exec_sync(container_id, list(command))
        assert done.exit_code == 0, (command, done.stderr)
        return done.stdout

    def slot_gpus(self, container_id: str) -> list[tuple[int, str]]:
        limits = files.read_limits(self.hook.run_dir / "tenants" / container_id / "limits")
        entries = [limits.device[i] for i in range(limits.device_count)]
        return [(e.host_index, e.uuid.decode()) for e in entries]


def _fake_gpus(dev: Path, driver: Path) -> None:
    """Four GPUs' device nodes (major 195; opening one fails, as with no driver loaded) and
    the driver's procfs files naming each minor's UUID."""
    dev.mkdir()
    for minor in (*range(4), 255):
        name = f"nvidia{minor}" if minor < 255 else "nvidiactl"
        os.mknod(dev / name, stat.S_IFCHR | 0o666, os.makedev(195, minor))
    for minor, gpu_uuid in UUIDS.items():
        info = driver / "gpus" / f"0000:{minor + 1:02x}:00.0" / "information"
        info.parent.mkdir(parents=True)
        info.write_text(f"GPU UUID: \t {gpu_uuid}\nDevice Minor: \t {minor}\n")


def _images(base: Path) -> Path:
    rootfs = containers.build_base_rootfs(base / "rootfs")
    containers.add_cuda_sim(rootfs)
    pause = base / "pause"
    (pause / "bin").mkdir(parents=True)
    (pause / "bin" / "busybox").write_bytes(containers.BUSYBOX.read_bytes())
    (pause / "bin" / "busybox").chmod(0o755)
    archive = base / "images.tar"
    images.write_archive(
        [
            images.Image(PAUSE, pause, entrypoint=("/bin/busybox", "sleep", "2147483647")),
            images.Image(CUDA, rootfs, env={"NVIDIA_VISIBLE_DEVICES": "all"}),
            images.Image(TOOL, rootfs),
        ],
        archive,
    )
    return archive


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, e2e_ready: None, hook_python: Path
) -> Iterator[Node]:
    """containerd started on its own root, state and socket, its config made by
    `fcspctl install --engine containerd`, the images imported; stopped afterwards."""
    reason = containerd_usable()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the CRI tests cannot run in CI: {reason}")
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("cri")
    dev, driver = base / "dev", base / "driver"
    _fake_gpus(dev, driver)
    hook = HookSetup.create(
        base / "fcsp", hook_python, paths=f'dev_dir = "{dev}"\ndriver_dir = "{driver}"\n'
    )
    # As `make install` lays it out: the native launcher, the Python runtime it runs for
    # FCSP's creates naming the native hook client, and fcsp-hookd serving that client.
    python_runtime = base / "fcsp-runtime.py"
    python_runtime.write_text(
        f"#!{hook_python} -I\nimport sys\nfrom fcsp_hook.hook.runtime import main\n"
        f"sys.exit(main(hook_client={str(HOOK_CLIENT)!r}))\n"
    )
    python_runtime.chmod(0o755)
    launcher = base / "fcsp-runtime"
    launcher.write_text(
        "#!/bin/sh\n"
        f"export FCSP_CONFIG={hook.config_path} FCSP_RUNTIME_PYTHON={python_runtime}\n"
        f'exec {NATIVE_RUNTIME} "$@"\n'
    )
    launcher.chmod(0o755)
    config = base / "containerd.toml"
    config.write_text(base_config(base, PAUSE))
    installed = fcspctl_install(config, launcher)
    assert installed.returncode == 0, installed.stderr
    archive = _images(base)
    daemon = Containerd.start(base, config, cgroup_parent=f"/fcsp-cri-{uuid.uuid4().hex[:8]}")
    try:
        daemon.import_images(archive, [PAUSE, CUDA, TOOL])
        hookd = HookServer(hook).start(hook_python)
        try:
            yield Node(daemon, hook, dev, base)
        finally:
            hookd.stop()
    finally:
        daemon.stop()
        forget_next_runtime(hook.config_path)


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _gone(node: Node) -> None:
    _wait_for("every slot's removal", lambda: node.hook.slots() == [])


def _mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_installed_config_names_the_fcsp_handler(node: Node) -> None:
    """The file `fcspctl install` wrote is the one this containerd runs: a runtime `fcsp` on
    runc's shim running fcsp-runtime, pod annotations fcsp.* passed on, runc's own options
    (its Root here) kept."""
    doc = tomllib.loads(node.containerd.config.read_text())
    runtimes = doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    fcsp = runtimes[HANDLER]
    assert fcsp["runtime_type"] == "io.containerd.runc.v2"
    assert fcsp["pod_annotations"] == ["fcsp.*"]
    assert fcsp["options"]["BinaryName"] == str(node.base / "fcsp-runtime")
    assert fcsp["options"]["Root"] == str(node.base / "runc")
    assert node.containerd.cri.version().startswith("containerd ")


def test_pod_sandbox_and_sidecar_untouched_gpu_container_shimmed(node: Node) -> None:
    """A pod with fcsp.sm=30, fcsp.sm.0=30, fcsp.mem.0=1G, fcsp.tenant=a and handler fcsp:
    the sandbox (which gets the pod's annotations too) starts untouched, with one log line;
    the GPU container (the device plugin's UUID + device spec) gets its slot with those
    values and libvgpu.so mapped, and its CUDA process is charged there; a GPU-less
    sidecar starts untouched with one log line saying why; StopPodSandbox and
    RemovePodSandbox leave no slot."""
    annotations = {"fcsp.sm": "30", "fcsp.sm.0": "30", "fcsp.mem.0": "1G", "fcsp.tenant": "a"}
    pod_id, pod = node.pod("train-a", annotations)
    cd = node.containerd
    try:
        gpu = node.start(
            pod_id,
            pod,
            Container(
                "train",
                CUDA,
                command=("/usr/bin/fcsp-sim-client", "init", "alloc", "mem", "64M", "wait"),
                envs={"NVIDIA_VISIBLE_DEVICES": UUIDS[0]},
                devices=(node.node(0),),
                stdin=True,  # `wait` blocks on it: the CUDA process stays up
            ),
        )
        sidecar = node.start(pod_id, pod, Container("logs", TOOL, command=SLEEP))

        # The sandbox: no slot, no hook in its spec, nothing mounted into it; one log line.
        assert not (node.hook.run_dir / "tenants" / pod_id).exists()
        sandbox_spec = json.loads((cd.task_dir(pod_id) / "config.json").read_text())
        assert sandbox_spec["annotations"]["fcsp.sm.0"] == "30"  # containerd copied them
        assert "hooks" not in sandbox_spec
        sandbox_pid = cd.init_pid(pod_id)
        assert LIB not in _mapped(sandbox_pid)
        assert not Path(f"/proc/{sandbox_pid}/root/etc/ld.so.preload").exists()
        assert not Path(f"/proc/{sandbox_pid}/root/run/fcsp").exists()
        assert [r["event"] for r in node.records(pod_id)] == [SANDBOX_EVENT]

        # The GPU container: its slot, from the host...
        slot = node.hook.run_dir / "tenants" / gpu
        assert node.hook.slots() == [slot]
        limits = files.read_limits(slot / "limits")
        assert limits.tenant == b"a"
        assert limits.device_count == 1
        assert (limits.device[0].host_index, limits.device[0].uuid.decode()) == (0, UUIDS[0])
        assert limits.device[0].sm_requested_centi == 3000
        assert limits.device[0].mem_limit_bytes == 1 << 30
        assert limits.init_host_pid == cd.init_pid(gpu)
        assert LIB in _mapped(cd.init_pid(gpu))
        # fcsp-runtime gave it the native client as hook, which fcsp-hookd serves.
        hooks = json.loads((cd.task_dir(gpu) / "config.json").read_text())["hooks"]
        assert [h["path"] for h in hooks["createRuntime"]] == [str(HOOK_CLIENT)]

        def charged() -> bool:
            usage = files.read_usage(slot / "usage")
            return any(
                p.state == abi.ProcState.LIVE and p.pid == 1 and p.mem_used_bytes[0] == 64 << 20
                for p in usage.proc
            )

        _wait_for("the CUDA process's 64M in its slot", charged)
        # ... and from inside.
        assert LIB in node.inside(gpu, CAT, "/proc/1/maps")
        assert node.inside(gpu, CAT, "/etc/ld.so.preload") == f"{LIB}\n"
        assert "limits" in node.inside(gpu, "/bin/ls", "/run/fcsp")

        # The sidecar: untouched, from the host and from inside; one line says why.
        assert cd.cri.container_status(sidecar).state == ContainerState.RUNNING
        assert not (node.hook.run_dir / "tenants" / sidecar).exists()
        assert LIB not in node.inside(sidecar, CAT, "/proc/self/maps")
        assert cd.cri.exec_sync(sidecar, ["/bin/test", "-e", "/etc/ld.so.preload"]).exit_code
        assert [r["event"] for r in node.records(sidecar)] == [NO_GPU_EVENT]
    finally:
        node.remove_pod(pod_id)
    _gone(node)  # fcsp-hookd answers a removal at once and removes the slot just after
    _wait_for(
        "the removal's log line",
        lambda: "tenant slot removed" in [r["event"] for r in node.records(gpu)],
    )


def test_malformed_annotation_fails_only_the_gpu_container_with_one_line(node: Node) -> None:
    """A pod with fcsp.sm=150: its GPU container fails to start with the hook's one-line
    reason in the CRI error; its sandbox and sidecar run, another pod's GPU container keeps
    running with its slot (and a new one starts), and nothing of the bad pod is left under
    the run dir."""
    good_id, good = node.pod("good", {"fcsp.sm": "50"})
    gpu_container = Container(
        "train", CUDA, SLEEP, {"NVIDIA_VISIBLE_DEVICES": UUIDS[1]}, devices=(node.node(1),)
    )
    cri = node.containerd.cri
    bad_id = failing = ""
    try:
        running = node.start(good_id, good, gpu_container)
        good_slot = node.hook.run_dir / "tenants" / running
        before = sorted(p for p in node.hook.run_dir.rglob("*"))

        bad_id, bad = node.pod("bad", {"fcsp.sm": "150", "fcsp.tenant": "b"})
        sidecar = node.start(bad_id, bad, Container("logs", TOOL, command=SLEEP))
        failing = cri.create_container(bad_id, gpu_container, bad)
        with pytest.raises(grpc.RpcError) as raised:
            cri.start_container(failing)
        details = raised.value.details() or ""
        assert 'fcsp-runtime: annotation fcsp.sm="150" is invalid: expected a percentage' in details
        assert details.count("fcsp-runtime:") == 1
        assert "\n" not in details
        assert "Traceback" not in details
        assert cri.container_status(failing).state != ContainerState.RUNNING
        cri.remove_container(failing)

        # The pod's other containers and the node are unaffected.
        assert cri.container_status(sidecar).state == ContainerState.RUNNING
        assert node.inside(sidecar, "/bin/echo", "alive") == "alive\n"
        assert cri.container_status(running).state == ContainerState.RUNNING
        assert sorted(p for p in node.hook.run_dir.rglob("*")) == before
        assert node.hook.slots() == [good_slot]
        again_container = Container("again", CUDA, SLEEP, {"NVIDIA_VISIBLE_DEVICES": "3"})
        again = node.start(good_id, good, again_container)
        assert node.slot_gpus(again) == [(3, UUIDS[3])]
        assert [r["event"] for r in node.records(bad_id)] == [SANDBOX_EVENT]
    finally:
        node.remove_pod(good_id)
        if bad_id:
            node.remove_pod(bad_id)
    _gone(node)
    assert not [p for p in node.hook.run_dir.rglob("*") if bad_id in p.name or failing in p.name]


# The device plugin's forms, as it hands them to the kubelet (env, device specs, mounts)
# and as CDI leaves them in the spec: container name -> (image, env, device node minors,
# volume-mount names, the slot's GPUs).
FORMS: dict[str, tuple[str, dict[str, str], tuple[int, ...], tuple[str, ...], list[int]]] = {
    # envvar strategy + PASS_DEVICE_SPECS: UUIDs in the env and the same GPUs' nodes.
    "envvar": (CUDA, {"NVIDIA_VISIBLE_DEVICES": f"{UUIDS[3]},{UUIDS[1]}"}, (1, 3), (), [1, 3]),
    # volume-mounts strategy: the env names the directory, one mount per device in it.
    "volume-mounts": (CUDA, {"NVIDIA_VISIBLE_DEVICES": VOLUME_MOUNTS_ROOT}, (), (UUIDS[2],), [2]),
    # CDI: device nodes in the spec and the env void, unset, or the image's own `all`.
    "cdi-void": (CUDA, {"NVIDIA_VISIBLE_DEVICES": "void"}, (3, 255), (), [3]),
    "cdi-image-all": (CUDA, {}, (0,), (), [0]),
    "cdi-unset": (TOOL, {}, (2,), (), [2]),
    # A CDI name in the env (the NVIDIA runtime's CDI mode), no nodes.
    "cdi-name": (TOOL, {"NVIDIA_VISIBLE_DEVICES": "nvidia.com/gpu=1"}, (), (), [1]),
    # The env and the nodes disagree: the node the container can open wins (and is logged).
    "disagree": (CUDA, {"NVIDIA_VISIBLE_DEVICES": UUIDS[0]}, (2,), (), [2]),
}


def test_device_plugin_forms_give_the_gpus_the_container_can_open(node: Node) -> None:
    """Each form the device plugin (or CDI) passes GPUs in gives a slot with the GPUs the
    container can open, each once, by index and UUID; inside, the container has those
    nodes and libvgpu.so; where the env and the nodes disagree the hook logs it."""
    pod_id, pod = node.pod("forms", {"fcsp.sm": "40", "fcsp.mem": "2G", "fcsp.tenant": "forms"})
    try:
        for name, (image, env, minors, mounted, expected) in FORMS.items():
            control = DeviceSpec("/dev/nvidiactl", str(node.dev / "nvidiactl"))
            devices = tuple(node.node(m) if m < 255 else control for m in minors)
            mounts = tuple(Mount(f"{VOLUME_MOUNTS_ROOT}/{m}", "/dev/null", True) for m in mounted)
            cid = node.start(pod_id, pod, Container(name, image, SLEEP, env, mounts, devices))
            assert node.slot_gpus(cid) == [(i, UUIDS[i]) for i in expected], name
            inside = node.inside(cid, "/bin/ls", "/dev").split()
            assert sorted(n for n in inside if n[6:].isdigit() and n.startswith("nvidia")) == [
                f"nvidia{m}" for m in minors if m < 255
            ], name
            assert LIB in node.inside(cid, CAT, "/proc/self/maps"), name
            warnings = [r for r in node.records(cid) if r["level"] == "warning"]
            if name == "disagree":
                assert len(warnings) == 1
                assert "and the spec's device nodes disagree" in str(warnings[0]["event"])
            else:
                assert warnings == [], name
    finally:
        node.remove_pod(pod_id)
    _gone(node)


def test_admission_refuses_a_strict_share_past_the_gpu_and_one_racer_wins(node: Node) -> None:
    """Strict shares on one GPU add up to at most 100 % under the CRI too: with 60 % held, a
    second pod's 60 % fails at start with the admission line in the CRI error; of three
    pods racing for the last 40 %, exactly one starts; their slots go with their pods."""
    cri = node.containerd.cri

    def strict_pod(name: str, share: str) -> tuple[str, Pod, str]:
        pod_id, pod = node.pod(name, {"fcsp.mode": "strict", "fcsp.sm": share})
        container = Container(
            "train", CUDA, SLEEP, {"NVIDIA_VISIBLE_DEVICES": UUIDS[2]}, devices=(node.node(2),)
        )
        return pod_id, pod, cri.create_container(pod_id, container, pod)

    pods: list[str] = []
    try:
        held_pod, _, held = strict_pod("held", "60")
        pods.append(held_pod)
        cri.start_container(held)
        over_pod, _, over = strict_pod("over", "60")
        pods.append(over_pod)
        with pytest.raises(grpc.RpcError) as raised:
            cri.start_container(over)
        details = raised.value.details() or ""
        assert "admission: GPU 2" in details and "cannot guarantee fcsp.sm=60%" in details
        assert "Traceback" not in details

        racers = [strict_pod(f"racer-{i}", "40") for i in range(3)]
        pods += [pod_id for pod_id, _, _ in racers]
        outcomes: dict[str, bool] = {}

        def start(container_id: str) -> None:
            try:
                cri.start_container(container_id)
                outcomes[container_id] = True
            except grpc.RpcError:
                outcomes[container_id] = False

        threads = [threading.Thread(target=start, args=(c,)) for _, _, c in racers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert sorted(outcomes.values()) == [False, False, True]
        winner = next(c for c, won in outcomes.items() if won)
        assert sorted(node.hook.slots()) == sorted(
            node.hook.run_dir / "tenants" / c for c in (held, winner)
        )
    finally:
        for pod_id in pods:
            node.remove_pod(pod_id)
    _gone(node)
