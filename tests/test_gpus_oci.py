"""Finding a container's GPUs and reading the OCI state and bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fcsp_hook import gpus, oci
from fcsp_hook.errors import HookError
from fcsp_hook.gpus import Gpu
from fcsp_hook.oci import Device

UUID = "GPU-8d3b1c52-5a2e-4f6b-9a1d-0c2e4f6a8b10"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", [Gpu(0)]),
        ("1,0", [Gpu(1), Gpu(0)]),
        (" 0 , 2 ", [Gpu(0), Gpu(2)]),
        (UUID, [Gpu(uuid=UUID)]),
        (f"0,{UUID}", [Gpu(0), Gpu(uuid=UUID)]),
        ("0,0", [Gpu(0)]),
        ("none", []),
        ("void", []),
        ("", []),
        ("all", [Gpu(0), Gpu(1), Gpu(3)]),
    ],
)
def test_visible_devices_forms(value: str, expected: list[Gpu]) -> None:
    """NVIDIA_VISIBLE_DEVICES: indices, UUIDs, all, none/void/empty, in the order given."""
    assert gpus.parse_visible_devices(value, [0, 1, 3]) == expected


@pytest.mark.parametrize("value", ["gpu0", "0;1", "-1", "GPU-", "0,,1"])
def test_malformed_visible_devices_is_an_error(value: str) -> None:
    """Anything else is refused with the accepted forms."""
    with pytest.raises(HookError, match="NVIDIA_VISIBLE_DEVICES"):
        gpus.parse_visible_devices(value, [])


def test_all_lists_host_device_nodes(tmp_path: Path) -> None:
    """`all` means the host's /dev/nvidia<N> nodes, not nvidiactl or nvidia-uvm."""
    for name in ("nvidia0", "nvidia2", "nvidia10", "nvidiactl", "nvidia-uvm", "nvidia-caps"):
        (tmp_path / name).touch()
    assert gpus.visible_gpus("all", (), tmp_path) == [Gpu(0), Gpu(2), Gpu(10)]


def test_device_nodes_add_gpus_the_env_did_not_name(tmp_path: Path) -> None:
    """linux.devices /dev/nvidia<N> (podman --device) counts as a GPU request."""
    devices = (
        Device("/dev/nvidia1", 195, 1),
        Device("/dev/nvidiactl", 195, 255),
        Device("/dev/null", 1, 3),
    )
    assert gpus.visible_gpus(None, devices, tmp_path) == [Gpu(1)]
    assert gpus.visible_gpus("0,1", devices, tmp_path) == [Gpu(0), Gpu(1)]


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
    """root.path is relative to the bundle; env and devices are read."""
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "root": {"path": "rootfs"},
                "process": {"env": ["A=1", "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_VISIBLE_DEVICES=1"]},
                "linux": {"devices": [{"path": "/dev/nvidia0", "major": 195, "minor": 0}]},
            }
        )
    )
    cfg = oci.read_bundle_config(tmp_path)
    assert cfg.readable
    assert cfg.root == tmp_path / "rootfs"
    assert oci.env_value(cfg.env, "NVIDIA_VISIBLE_DEVICES") == "1"
    assert cfg.devices == (Device("/dev/nvidia0", 195, 0),)


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
    matches them whatever order CUDA enumerates them in); unknown minors keep none."""
    info = tmp_path / "gpus" / "0000:18:00.0" / "information"
    info.parent.mkdir(parents=True)
    info.write_text(INFORMATION)
    uuids = gpus.host_gpu_uuids(tmp_path)
    assert uuids == {2: UUID}
    assert gpus.with_uuids([Gpu(2), Gpu(0), Gpu(uuid="GPU-x")], uuids) == [
        Gpu(2, UUID),
        Gpu(0),
        Gpu(uuid="GPU-x"),
    ]
