"""etc/kubernetes: the manifests parse, name each other consistently, install what the
node needs, and the example pod's annotations are ones the hook accepts."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import pytest

from fcsp_hook import annotations
from fcsp_hook.ctl import engines

yaml = pytest.importorskip("yaml")

K8S = Path(__file__).resolve().parent.parent / "etc" / "kubernetes"


def _docs(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    assert all(isinstance(d, dict) for d in docs)
    return docs


def _one(name: str, kind: str) -> dict[str, Any]:
    found = [d for d in _docs(name) if d["kind"] == kind]
    assert len(found) == 1, f"{name}: expected one {kind}"
    return found[0]


def _daemonset_pod() -> dict[str, Any]:
    spec: dict[str, Any] = _one("daemonset.yaml", "DaemonSet")["spec"]["template"]["spec"]
    return spec


def test_runtimeclass_handler_is_the_containerd_runtime_install_adds() -> None:
    """RuntimeClass fcsp (node.k8s.io/v1) names handler fcsp: the runtime name that
    `fcspctl install --engine containerd` writes."""
    rc = _one("runtimeclass.yaml", "RuntimeClass")
    assert rc["apiVersion"] == "node.k8s.io/v1"
    assert rc["metadata"]["name"] == "fcsp"
    assert rc["handler"] == engines.RUNTIME_NAME


def test_runtimeclass_schedules_only_where_the_daemonset_runs() -> None:
    """Pods of the RuntimeClass land only on nodes the DaemonSet installs FCSP on."""
    rc = _one("runtimeclass.yaml", "RuntimeClass")
    assert rc["scheduling"]["nodeSelector"] == _daemonset_pod()["nodeSelector"]
    assert rc["scheduling"]["nodeSelector"]


def test_example_pod_uses_the_runtimeclass_and_valid_annotations() -> None:
    """The example pod names the RuntimeClass, asks for a GPU, and every fcsp.* annotation
    parses as the hook parses it (one GPU) and passes containerd's pod_annotations filter."""
    pod = _one("pod-example.yaml", "Pod")
    assert (
        pod["spec"]["runtimeClassName"]
        == _one("runtimeclass.yaml", "RuntimeClass")["metadata"]["name"]
    )
    notes = pod["metadata"]["annotations"]
    assert all(isinstance(v, str) for v in notes.values())
    request = annotations.parse(notes, 1)
    assert request.devices[0].sm_centi == 4000
    assert request.devices[0].mem.bytes == 8 << 30
    fcsp_keys = [k for k in notes if k.startswith("fcsp.")]
    assert fcsp_keys
    for key in fcsp_keys:
        assert any(fnmatch.fnmatchcase(key, p) for p in engines.POD_ANNOTATIONS)
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1


def test_daemonset_mounts_the_host_paths_fcsp_lives_in() -> None:
    """hostPath volumes for the slots, the library, the config and containerd's config;
    every mount names a declared volume."""
    pod = _daemonset_pod()
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    paths = ("/run/fcsp", "/var/lib/fcsp", "/usr/local/lib/fcsp", "/etc/fcsp", "/etc/containerd")
    for path in (*paths, "/opt/fcsp"):
        assert path in host_paths.values()
    for container in pod["initContainers"] + pod["containers"]:
        for mount in container["volumeMounts"]:
            assert mount["name"] in host_paths


def test_daemonset_installs_containerd_then_runs_the_observer() -> None:
    """The privileged init container copies the library and runs `fcspctl install --engine
    containerd` against the host's files; the main container runs fcsp-observer with the
    host's PID namespace and /run/fcsp; both are pinned to GPU nodes."""
    ds = _one("daemonset.yaml", "DaemonSet")
    assert ds["apiVersion"] == "apps/v1"
    pod = _daemonset_pod()
    assert (
        ds["spec"]["selector"]["matchLabels"].items()
        <= ds["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pod["hostPID"] is True
    (install,) = pod["initContainers"]
    assert install["securityContext"]["privileged"] is True
    script = "\n".join(install["args"])
    assert "fcspctl install --engine containerd --root /host" in script
    assert "libvgpu.so /host/usr/local/lib/fcsp/libvgpu.so" in script
    (observer,) = pod["containers"]
    assert observer["command"][0].endswith("/fcsp-observer")
    mounts = {m["mountPath"] for m in observer["volumeMounts"]}
    assert {"/run/fcsp", "/var/lib/fcsp"} <= mounts
    namespaces = [d for d in _docs("daemonset.yaml") if d["kind"] == "Namespace"]
    assert [n["metadata"]["name"] for n in namespaces] == [ds["metadata"]["namespace"]]


def test_daemonset_runs_the_image_make_image_builds() -> None:
    """Both containers run one image: the one `make image` tags by default (image/Containerfile;
    tests/test_node_image.py builds it and runs the init script in it)."""
    pod = _daemonset_pod()
    images = {c["image"] for c in pod["initContainers"] + pod["containers"]}
    makefile = (K8S.parent.parent / "Makefile").read_text().splitlines()
    default = [ln.split("?=", 1)[1].strip() for ln in makefile if ln.startswith("IMAGE ")]
    assert images == set(default)
    assert len(default) == 1
