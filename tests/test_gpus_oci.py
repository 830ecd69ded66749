"""Finding a container's GPUs and reading the OCI state and bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fcsp_hook import gpus, oci
from fcsp_hook.errors import HookError
from fcsp_hook.gpus import Gpu
from fcsp_hook.oci import Device
from fcsp_hook.slot import abi

UUID = "GPU-8d3b1c52-5a2e-4f6b-9a1d-0c2e4f6a8b10"


HOST_UUIDS = {i: f"GPU-{i}{i}{i}{i}{i}{i}{i}{i}-5a2e-4f6b-9a1d-0c2e4f6a8b1{i}" for i in range(4)}
MIG_UUID = "MIG-3f0d3e55-6f4b-5c2e-9e1a-8c2b1a0d9e7f"
ROOT = "/var/run/nvidia-container-devices"  # the device plugin's volume-mounts path


def G(index: int) -> Gpu:
    """Host GPU `index`, named both ways as the driver's procfs files name it."""
    return Gpu(index, HOST_UUIDS[index])


def node(index: int) -> Device:
    return Device(f"/dev/nvidia{index}", gpus.NVIDIA_MAJOR, index)


CONTROL_NODES = (
    Device("/dev/nvidiactl", 195, 255),
    Device("/dev/nvidia-uvm", 510, 0),
    Device("/dev/nvidia-caps/nvidia-cap1", 237, 1),
)

# (env NVIDIA_VISIBLE_DEVICES or None, linux.devices, mount destinations) ->
# (GPUs in CUDA's order, source, a word of the disagreement line or "").
FORMS = {
    # The env strategy: indices and UUIDs, each once, in CUDA's (PCI, minor) order.
    "index": (("0", (), ()), ([G(0)], "env", "")),
    "indices in CUDA order": (("2,0", (), ()), ([G(0), G(2)], "env", "")),
    "uuid": ((HOST_UUIDS[1], (), ()), ([G(1)], "env", "")),
    "index and uuid of one GPU": ((f"1,{HOST_UUIDS[1]}", (), ()), ([G(1)], "env", "")),
    "uuid the driver does not name": (
        ("GPU-0000aaaa-0000", (), ()),
        ([Gpu(uuid="GPU-0000aaaa-0000")], "env", ""),
    ),
    # PASS_DEVICE_SPECS=true: the same GPU as a UUID and as its node, counted once.
    "env uuid and its device node": (
        (HOST_UUIDS[1], (node(1), *CONTROL_NODES), ()),
        ([G(1)], "device nodes", ""),
    ),
    "env indices and their nodes": (
        ("3,1", (node(1), node(3)), ()),
        ([G(1), G(3)], "device nodes", ""),
    ),
    # The volume-mounts strategy: one mount per device under the variable's path.
    "volume mounts by index": (
        (ROOT, (), ("/proc", f"{ROOT}/2", f"{ROOT}/0")),
        ([G(0), G(2)], "volume mounts", ""),
    ),
    "volume mounts by uuid": (
        (ROOT, (), (f"{ROOT}/{HOST_UUIDS[3]}",)),
        ([G(3)], "volume mounts", ""),
    ),
    "volume mounts and their nodes": (
        (ROOT, (node(2),), (f"{ROOT}/{HOST_UUIDS[2]}",)),
        ([G(2)], "device nodes", ""),
    ),
    "volume mounts path without mounts": ((ROOT, (), ()), ([], "none", "")),
    # CDI: the nodes are injected into the spec; the variable is void, unset, or the
    # image's own `all`.  The nodes win, whatever the image says.
    "cdi nodes, env void": (("void", (node(3), *CONTROL_NODES), ()), ([G(3)], "device nodes", "")),
    "cdi nodes, env unset": ((None, (node(2), node(0)), ()), ([G(0), G(2)], "device nodes", "")),
    "cdi nodes, env all from the image": (
        ("all", (node(3), *CONTROL_NODES), ()),
        ([G(3)], "device nodes", ""),
    ),
    # CDI names in the variable (the NVIDIA runtime's CDI mode, the device plugin's kind).
    "cdi name index": (("nvidia.com/gpu=1", (), ()), ([G(1)], "env", "")),
    "cdi name uuid": ((f"nvidia.com/gpu={HOST_UUIDS[2]}", (), ()), ([G(2)], "env", "")),
    "cdi name all": (("nvidia.com/gpu=all", (), ()), ([G(0), G(1), G(2), G(3)], "env", "")),
    "device plugin cdi kind": (
        (f"k8s.device-plugin.nvidia.com/gpu={HOST_UUIDS[0]},nvidia.com/gpu=3", (), ()),
        ([G(0), G(3)], "env", ""),
    ),
    "cdi mig index": (("nvidia.com/gpu=0:1", (), ()), ([Gpu(0, mig=1)], "env", "")),
    # MIG: MIG- UUIDs and <gpu>:<mig>; their GPU's node is a parent, not one more GPU.
    "mig uuid": ((MIG_UUID, (), ()), ([Gpu(uuid=MIG_UUID)], "env", "")),
    "mig indices in CUDA order": (
        ("1:0,0:2,0:1", (), ()),
        ([Gpu(0, mig=1), Gpu(0, mig=2), Gpu(1, mig=0)], "env", ""),
    ),
    "mig uuid with its parent's node": (
        (MIG_UUID, (node(0), *CONTROL_NODES), ()),
        ([Gpu(uuid=MIG_UUID)], "device nodes", ""),
    ),
    "mig index with its parent's node": (
        ("0:1", (node(0),), ()),
        ([Gpu(0, mig=1)], "device nodes", ""),
    ),
    # all: the host's GPUs, or with nodes only those.
    "all without nodes": (("all", (), ()), ([G(0), G(1), G(2), G(3)], "env", "")),
    "all with nodes": (("all", (node(1), node(0)), ()), ([G(0), G(1)], "device nodes", "")),
    # No GPU.
    "none": (("none", (), ()), ([], "none", "")),
    "void": (("void", (), ()), ([], "none", "")),
    "empty": (("", (), ()), ([], "none", "")),
    "unset": ((None, (), ()), ([], "none", "")),
    "control nodes only": ((None, CONTROL_NODES, ()), ([], "none", "")),
    # Disagreement: the nodes the container can open win, and it is said.
    "env names another GPU than the node": (
        ("0", (node(1),), ()),
        ([G(1)], "device nodes", f"names {HOST_UUIDS[0]}, which no node opens"),
    ),
    "node the env does not name": (
        ("1", (node(1), node(2)), ()),
        ([G(1), G(2)], "device nodes", "nodes open GPU 2, which it does not name"),
    ),
    "unknown uuids, other count": (
        ("GPU-0000aaaa-0000,GPU-0000bbbb-0000", (node(0),), ()),
        ([G(0)], "device nodes", "it names 2 GPUs, the nodes open 1"),
    ),
    "mig on a GPU without its node": (
        ("0:1,1:0", (node(1),), ()),
        ([Gpu(1, mig=0)], "device nodes", "names MIG 0:1, which no node opens"),
    ),
}


@pytest.fixture
def host_dev(tmp_path: Path) -> Path:
    """A /dev with four GPUs and the driver's other nodes."""
    for name in ("nvidia0", "nvidia1", "nvidia2", "nvidia3", "nvidiactl", "nvidia-uvm"):
        (tmp_path / name).touch()
    return tmp_path


@pytest.mark.parametrize(("given", "expected"), FORMS.values(), ids=FORMS.keys())
def test_every_form_yields_the_gpus_the_container_can_open(
    host_dev: Path,
    given: tuple[str | None, tuple[Device, ...], tuple[str, ...]],
    expected: tuple[list[Gpu], str, str],
) -> None:
    """Each way the NVIDIA stack passes GPUs (env indices/UUIDs, device specs, volume
    mounts, CDI nodes and names, MIG, all) yields the GPUs the container can open, each
    once, in CUDA's order; where the env and the nodes disagree the nodes win, and the
    disagreement is one line for the hook to log."""
    visible, devices, mounts = given
    gpus_expected, source, disagreement = expected
    found = gpus.discover(visible, devices, mounts, host_dev, HOST_UUIDS)
    assert list(found.gpus) == gpus_expected
    assert found.source == source
    if disagreement:
        assert disagreement in found.disagreement
        assert "\n" not in found.disagreement
        assert found.disagreement.endswith("using the device nodes")
    else:
        assert found.disagreement == ""


def test_without_the_drivers_files_gpus_keep_the_names_they_were_given(host_dev: Path) -> None:
    """No procfs files (a wedged or absent driver): indices stay indices, UUIDs UUIDs, and an
    env UUID with one node is still one GPU."""
    assert gpus.discover("2,0", (), (), host_dev, {}).gpus == (Gpu(0), Gpu(2))
    assert gpus.discover(HOST_UUIDS[1], (node(1),), (), host_dev, {}).gpus == (Gpu(1),)


@pytest.mark.parametrize(
    ("value", "mounts"),
    [
        ("gpu0", ()),
        ("0;1", ()),
        ("-1", ()),
        ("GPU-", ()),
        ("0,,1", ()),
        ("1:", ()),
        ("nvidia.com/gpu=", ()),
        ("example.com/gpu=0", ()),
        ("nvidia.com/nic=0", ()),
        (ROOT, (f"{ROOT}/bogus",)),
    ],
)
def test_malformed_visible_devices_is_a_one_line_error(
    host_dev: Path, value: str, mounts: tuple[str, ...]
) -> None:
    """Anything else is refused with one line naming the variable and the accepted forms."""
    with pytest.raises(HookError, match=r"^NVIDIA_VISIBLE_DEVICES") as raised:
        gpus.discover(value, (), mounts, host_dev, HOST_UUIDS)
    assert "\n" not in str(raised.value)
    assert "is invalid: expected " in str(raised.value)
    assert ("by its index or UUID" if mounts else "expected all, none, void") in str(raised.value)


def test_more_gpus_than_a_slot_holds_is_an_error(tmp_path: Path) -> None:
    """A container that sees more GPUs than the slot ABI holds is refused in one line."""
    nodes = tuple(node(i) for i in range(abi.MAX_DEVICES + 1))
    with pytest.raises(HookError, match=f"at most {abi.MAX_DEVICES}"):
        gpus.discover(None, nodes, (), tmp_path, {})


def test_all_lists_host_device_nodes(tmp_path: Path) -> None:
    """`all` means the host's /dev/nvidia<N> nodes, not nvidiactl or nvidia-uvm."""
    for name in ("nvidia0", "nvidia2", "nvidia10", "nvidiactl", "nvidia-uvm", "nvidia-caps"):
        (tmp_path / name).touch()
    assert gpus.discover("all", (), (), tmp_path, {}).gpus == (Gpu(0), Gpu(2), Gpu(10))


def test_state_fields() -> None:
    """The hook takes id, status, pid, bundle and annotations from the state."""
    raw = json.dumps(
        {
            "ociVersion": "1.0.2",
            "id": "abc",
            "status": "creating",
            "pid": 42,
            "bundle": "/b",
            "annotations": {"fcsp.sm": "40"},
        }
    ).encode()
    state = oci.parse_state(raw)
    assert (state.id, state.status, state.pid, state.bundle) == ("abc", "creating", 42, Path("/b"))
    assert state.annotations == {"fcsp.sm": "40"}


def test_poststop_state_without_pid() -> None:
    """Poststop states carry no pid."""
    state = oci.parse_state(b'{"id": "abc", "status": "stopped", "bundle": "/b"}')
    assert state.pid is None
    assert state.annotations == {}


@pytest.mark.parametrize(
    "raw", [b"", b"[]", b"{", b'{"status": "creating"}', b'{"id": "a", "annotations": "x"}']
)
def test_bad_state_is_a_hook_error(raw: bytes) -> None:
    """Garbage on stdin is a one-line HookError."""
    with pytest.raises(HookError):
        oci.parse_state(raw)


def test_bundle_config(tmp_path: Path) -> None:
    """root.path is relative to the bundle; env, devices and mount destinations are read."""
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "root": {"path": "rootfs"},
                "process": {"env": ["A=1", "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_VISIBLE_DEVICES=1"]},
                "linux": {"devices": [{"path": "/dev/nvidia0", "major": 195, "minor": 0}]},
                "mounts": [
                    {"destination": "/proc", "type": "proc"},
                    {"destination": f"{ROOT}/0", "source": "/dev/null"},
                    {"type": "tmpfs"},
                ],
            }
        )
    )
    cfg = oci.read_bundle_config(tmp_path)
    assert cfg.readable
    assert cfg.root == tmp_path / "rootfs"
    assert oci.env_value(cfg.env, "NVIDIA_VISIBLE_DEVICES") == "1"
    assert cfg.devices == (Device("/dev/nvidia0", 195, 0),)
    assert cfg.mounts == ("/proc", f"{ROOT}/0")


@pytest.mark.parametrize("content", [None, "not json", "[1]"])
def test_unreadable_bundle_config_is_survived(tmp_path: Path, content: str | None) -> None:
    """A missing or corrupt config.json is reported, never raised."""
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    cfg = oci.read_bundle_config(tmp_path)
    assert not cfg.readable
    assert cfg.problem
    assert cfg.env == ()


INFORMATION = """Model: \t\t NVIDIA H200
IRQ:   \t\t 16
GPU UUID: \t GPU-8d3b1c52-5a2e-4f6b-9a1d-0c2e4f6a8b10
Video BIOS: \t 96.00.af.00.01
Bus Location: \t 0000:18:00.0
Device Minor: \t 2
GPU Excluded:\t No
"""


def test_driver_information_names_minor_and_uuid() -> None:
    """The driver's per-GPU procfs file gives the minor number and UUID."""
    assert gpus.parse_driver_information(INFORMATION) == (2, UUID)
    assert gpus.parse_driver_information("Model: x\n") is None


def test_gpus_chosen_by_index_are_named_by_uuid(tmp_path: Path) -> None:
    """With the driver's files present, index-selected GPUs carry their UUID (so the shim
    matches them whatever order CUDA enumerates them in) and UUID-selected ones their
    index; unknown minors and UUIDs keep what they had, a MIG device never takes its GPU's."""
    info = tmp_path / "gpus" / "0000:18:00.0" / "information"
    info.parent.mkdir(parents=True)
    info.write_text(INFORMATION)
    uuids = gpus.host_gpu_uuids(tmp_path)
    assert uuids == {2: UUID}
    assert gpus.with_uuids(
        [Gpu(2), Gpu(0), Gpu(uuid="GPU-x"), Gpu(uuid=UUID), Gpu(2, mig=1)], uuids
    ) == [Gpu(2, UUID), Gpu(0), Gpu(uuid="GPU-x"), Gpu(2, UUID), Gpu(2, mig=1)]
