"""A small CRI v1 client: the calls a kubelet makes to start and stop a pod, over the
runtime's unix socket with grpcio, each message built by hand (tests/cri/wire.py) with the
field numbers of k8s.io/cri-api's runtime/v1 api.proto.  Enough for host-network pods with
devices, mounts, env and annotations; nothing else of the API is modelled."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc

from tests.cri import wire

RUNTIME = "runtime.v1.RuntimeService"
IMAGES = "runtime.v1.ImageService"
CALL_TIMEOUT_S = 60.0


class NamespaceMode(enum.IntEnum):
    POD = 0
    CONTAINER = 1
    NODE = 2


class ContainerState(enum.IntEnum):
    CREATED = 0
    RUNNING = 1
    EXITED = 2
    UNKNOWN = 3


def _namespaces(number: int) -> bytes:
    """NamespaceOption as a kubelet sends it for a host-network pod, for the sandbox and
    each container alike: the node's network, a pid namespace per container."""
    return wire.message(
        number,
        wire.integer(1, NamespaceMode.NODE),  # network
        wire.integer(2, NamespaceMode.CONTAINER),  # pid
        wire.integer(3, NamespaceMode.POD),  # ipc
    )


@dataclass(frozen=True)
class Pod:
    """PodSandboxConfig: host network (no CNI), a pid namespace per container."""

    name: str
    uid: str
    namespace: str = "default"
    annotations: Mapping[str, str] = field(default_factory=dict)
    log_directory: str = ""
    cgroup_parent: str = ""

    def encode(self) -> bytes:
        return b"".join(
            (
                wire.message(  # metadata
                    1,
                    wire.string(1, self.name),
                    wire.string(2, self.uid),
                    wire.string(3, self.namespace),
                ),
                wire.string(3, self.log_directory),
                wire.string_map(6, {"io.kubernetes.pod.name": self.name}),  # labels
                wire.string_map(7, self.annotations),
                wire.message(  # linux: cgroup_parent, security_context
                    8, wire.string(1, self.cgroup_parent), wire.message(2, _namespaces(1))
                ),
            )
        )


@dataclass(frozen=True)
class Mount:
    container_path: str
    host_path: str
    readonly: bool = False

    def encode(self, number: int) -> bytes:
        return wire.message(
            number,
            wire.string(1, self.container_path),
            wire.string(2, self.host_path),
            wire.integer(3, self.readonly),
        )


@dataclass(frozen=True)
class DeviceSpec:
    """A host device node passed as the device plugin's device specs pass it."""

    container_path: str
    host_path: str
    permissions: str = "rw"

    def encode(self, number: int) -> bytes:
        return wire.message(
            number,
            wire.string(1, self.container_path),
            wire.string(2, self.host_path),
            wire.string(3, self.permissions),
        )


@dataclass(frozen=True)
class Container:
    """ContainerConfig: what a kubelet sends for one container of a pod."""

    name: str
    image: str
    command: tuple[str, ...] = ()
    envs: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    devices: tuple[DeviceSpec, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    stdin: bool = False

    def encode(self) -> bytes:
        return b"".join(
            (
                wire.message(1, wire.string(1, self.name)),  # metadata
                wire.message(2, wire.string(1, self.image)),  # image
                wire.strings(3, self.command),
                *(
                    wire.message(6, wire.string(1, k), wire.string(2, v))
                    for k, v in self.envs.items()
                ),
                *(m.encode(7) for m in self.mounts),
                *(d.encode(8) for d in self.devices),
                wire.string_map(9, {"io.kubernetes.container.name": self.name}),  # labels
                wire.string_map(10, self.annotations),
                wire.string(11, f"{self.name}.log"),
                wire.integer(12, self.stdin),
                wire.message(15, wire.message(2, _namespaces(3))),  # linux.security_context
            )
        )


@dataclass(frozen=True)
class Status:
    """The parts of ContainerStatus the tests read."""

    state: ContainerState
    exit_code: int
    reason: str
    message: str


@dataclass(frozen=True)
class Exec:
    stdout: str
    stderr: str
    exit_code: int


class Client:
    """RuntimeService and ImageService over one channel; CRI errors raise grpc.RpcError,
    whose details() is the runtime's message."""

    def __init__(self, socket: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket}")

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def call(
        self, service: str, method: str, request: bytes, timeout: float = CALL_TIMEOUT_S
    ) -> wire.Fields:
        """One unary call with raw bytes both ways (no serializer: the bytes are the message)."""
        stub: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(
            f"/{service}/{method}"
        )
        return wire.decode(stub(request, timeout=timeout))

    # ---- RuntimeService ------------------------------------------------------------------

    def version(self, timeout: float = CALL_TIMEOUT_S) -> str:
        """The runtime's name and version, e.g. 'containerd 1.6.20~ds1'."""
        reply = self.call(RUNTIME, "Version", wire.string(1, "v1"), timeout)
        return f"{wire.first_str(reply, 2)} {wire.first_str(reply, 3)}"

    def run_pod(self, pod: Pod, handler: str) -> str:
        reply = self.call(
            RUNTIME, "RunPodSandbox", wire.raw(1, pod.encode()) + wire.string(2, handler)
        )
        return wire.first_str(reply, 1)

    def stop_pod(self, pod_id: str) -> None:
        self.call(RUNTIME, "StopPodSandbox", wire.string(1, pod_id))

    def remove_pod(self, pod_id: str) -> None:
        self.call(RUNTIME, "RemovePodSandbox", wire.string(1, pod_id))

    def list_pods(self) -> list[str]:
        reply = self.call(RUNTIME, "ListPodSandbox", b"")
        return [
            wire.first_str(wire.decode(item), 1)
            for item in reply.get(1, [])
            if isinstance(item, bytes)
        ]

    def create_container(self, pod_id: str, container: Container, pod: Pod) -> str:
        request = (
            wire.string(1, pod_id) + wire.raw(2, container.encode()) + wire.raw(3, pod.encode())
        )
        return wire.first_str(self.call(RUNTIME, "CreateContainer", request), 1)

    def start_container(self, container_id: str) -> None:
        self.call(RUNTIME, "StartContainer", wire.string(1, container_id))

    def remove_container(self, container_id: str) -> None:
        self.call(RUNTIME, "RemoveContainer", wire.string(1, container_id))

    def container_status(self, container_id: str) -> Status:
        reply = self.call(RUNTIME, "ContainerStatus", wire.string(1, container_id))
        status = wire.decode(wire.first_bytes(reply, 1))
        return Status(
            state=ContainerState(wire.first_int(status, 3)),
            exit_code=wire.first_int(status, 7),
            reason=wire.first_str(status, 10),
            message=wire.first_str(status, 11),
        )

    def exec_sync(self, container_id: str, command: list[str], timeout_s: int = 30) -> Exec:
        request = (
            wire.string(1, container_id) + wire.strings(2, command) + wire.integer(3, timeout_s)
        )
        reply = self.call(RUNTIME, "ExecSync", request, timeout=timeout_s + 30)
        return Exec(
            stdout=wire.first_bytes(reply, 1).decode(errors="replace"),
            stderr=wire.first_bytes(reply, 2).decode(errors="replace"),
            exit_code=wire.first_int(reply, 3),
        )

    # ---- ImageService --------------------------------------------------------------------

    def image_present(self, image: str) -> bool:
        """ImageStatus: an image the runtime's CRI view knows (None when it does not)."""
        reply = self.call(IMAGES, "ImageStatus", wire.message(1, wire.string(1, image)))
        return bool(wire.first_bytes(reply, 1))
