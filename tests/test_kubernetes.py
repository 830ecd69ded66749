"""etc/kubernetes: the manifests parse, name each other consistently, install what the
node needs, and the example pod's annotations are ones the hook accepts."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import pytest

from fcsp_hook import annotations, config, gpus
from fcsp_hook.ctl import engines
from fcsp_hook.hook import admission
from fcsp_hook.observer import publish

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


def test_runtimeclass_schedules_only_where_the_daemonset_labelled_the_node() -> None:
    """Pods of the RuntimeClass land only on nodes labelled fcsp.io/ready=true (the label
    the DaemonSet sets once the node's runtime runs FCSP), tolerating the GPU nodes' taint
    as the DaemonSet does."""
    rc = _one("runtimeclass.yaml", "RuntimeClass")
    assert rc["scheduling"]["nodeSelector"] == {engines.READY_LABEL: "true"}
    assert rc["scheduling"]["tolerations"] == _daemonset_pod()["tolerations"]


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
    # k3s and RKE2 keep containerd's config and template here; CRI-O reads hooks.d.
    (install,) = pod["initContainers"]
    mounted = {m["mountPath"]: host_paths[m["name"]] for m in install["volumeMounts"]}
    for directory, _ in engines.DISTROS.values():
        assert mounted["/host" + str(directory)] == str(directory)
    assert mounted["/host" + str(engines.HOOKS_FILE.parent)] == str(engines.HOOKS_FILE.parent)
    for container in pod["initContainers"] + pod["containers"]:
        for mount in container.get("volumeMounts", []):  # hookd: the host's own mounts
            assert mount["name"] in host_paths


def test_daemonset_installs_containerd_then_runs_the_observer() -> None:
    """The privileged init container copies the library and runs `fcspctl install --engine
    <the node's engine>` against the host's files; the main container runs fcsp-observer with the
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
    assert '"$fcsp/fcspctl" install --engine "$engine" --root /host' in script
    assert "for f in libvgpu.so fcsp-hook fcsp-runtime.py; do" in script
    assert "/usr/local/lib/fcsp/$f /host/usr/local/lib/fcsp/$f" in script
    observer, hookd = pod["containers"]
    # fcsp-hookd runs the host's copy in the host's mount and cgroup namespaces.
    assert hookd["command"][:6] == ["nsenter", "-t", "1", "-m", "-C", "--"]
    assert hookd["command"][6] == "/opt/fcsp/venv/bin/fcsp-hookd"
    assert hookd["securityContext"]["privileged"] is True
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


def _init_script() -> str:
    (install,) = _daemonset_pod()["initContainers"]
    return "\n".join(install["args"])


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_daemonset_labels_the_node_once_the_runtime_runs_fcsp() -> None:
    """The init script labels the node after the install, but not while containerd still
    has to restart to read its new config; with ACTION=uninstall it removes the label
    before the engine's configuration; the observer removes it when its pod stops.  The
    engine is asked of the API server (ENGINE=auto: containerd or CRI-O)."""
    script = _init_script()
    env = _env(_daemonset_pod()["initContainers"][0])
    assert env["ENGINE"] == "auto" and env["ACTION"] == "install"
    assert '[ "$engine" != auto ] || engine=$(node node-engine)' in script
    assert 'node() { "$fcsp/python3" -m fcsp_hook.ctl.engines "$@"; }' in script
    install = script.index('"$fcsp/fcspctl" install --engine "$engine" --root /host')
    waiting = script.index("ready=false")
    assert install < waiting < script.index('[ "$ready" != true ] || node label-node set')
    uninstall = script.index('"$fcsp/fcspctl" uninstall --engine "$engine" --root /host')
    assert script.index("node label-node remove") < uninstall
    observer, _ = _daemonset_pod()["containers"]
    assert observer["lifecycle"]["preStop"]["exec"]["command"][-4:] == [
        "-m", "fcsp_hook.ctl.engines", "label-node", "remove"
    ]  # fmt: skip


def test_daemonset_may_label_its_node_and_nothing_more() -> None:
    """Its service account may get and patch nodes (the label, the node's runtime) and get
    pods in its own namespace (its node's name), bound to that account alone."""
    docs = _docs("daemonset.yaml")
    pod = _daemonset_pod()
    account = pod["serviceAccountName"]
    namespace = _one("daemonset.yaml", "DaemonSet")["metadata"]["namespace"]
    (sa,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert sa["metadata"] == {"name": account, "namespace": namespace}
    cluster_role = _one("daemonset.yaml", "ClusterRole")
    assert cluster_role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}
    ]
    role = _one("daemonset.yaml", "Role")
    assert role["metadata"]["namespace"] == namespace
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]
    for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = _one("daemonset.yaml", kind)
        assert binding["roleRef"]["kind"] == role_kind
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": namespace}
        ]


def test_daemonset_exposes_the_observers_metrics() -> None:
    """The observer serves metrics on its pod's network (FCSP_METRICS_ADDRESS overrides
    the node's metrics_address) at the configured port, declared as containerPort
    "metrics"."""
    observer, _ = _daemonset_pod()["containers"]
    assert _env(observer)[publish.METRICS_ADDRESS_ENV] == "0.0.0.0"  # noqa: S104  # the pod's network
    (port,) = observer["ports"]
    assert port == {
        "name": "metrics",
        "containerPort": config.ObserverConfig.metrics_port,
        "protocol": "TCP",
    }


def _pods(name: str) -> list[dict[str, Any]]:
    return [d for d in _docs(name) if d["kind"] == "Pod"]


def test_time_slicing_shares_a_gpu_and_refuses_two_replicas() -> None:
    """The device plugin's config hands each GPU out as several nvidia.com/gpu replicas
    and refuses a request for more than one (which could be one GPU twice)."""
    cm = _one("time-slicing.yaml", "ConfigMap")
    plugin = yaml.safe_load(cm["data"]["any"])
    slicing = plugin["sharing"]["timeSlicing"]
    assert slicing["failRequestsGreaterThanOne"] is True
    ((resource),) = slicing["resources"]
    assert resource["name"] == "nvidia.com/gpu" and resource["replicas"] >= 2


@pytest.mark.parametrize("name", ["pods-30-70.yaml", "dra-shared-gpu.yaml"])
def test_two_pods_share_one_gpu_at_30_70(name: str) -> None:
    """Both example pods use the RuntimeClass, share one GPU (a replica each, or one
    ResourceClaim both name), and ask for 30 % and 70 % strict: admission takes both; a
    third strict pod asking for any more of that GPU is refused."""
    pods = _pods(name)
    assert len(pods) == 2
    gpu = gpus.Gpu(host_index=0, uuid="GPU-00000000-0000-0000-0000-000000000000")
    held: dict[str, admission.Promised] = {}
    for pod in pods:
        assert pod["spec"]["runtimeClassName"] == "fcsp"
        request = annotations.parse(pod["metadata"]["annotations"], 1)
        (ask,) = admission.asks(request, [gpu])
        assert admission.problems([ask], held, {gpu.uuid: 80 << 30}) == []
        entry = held.setdefault(gpu.uuid, admission.Promised())
        entry.sm_centi += ask.sm_centi
        entry.mem_basis_points += ask.mem_basis_points
    assert held[gpu.uuid].sm_centi == 10_000
    third = annotations.parse({"fcsp.sm": "1", "fcsp.mode": "strict"}, 1)
    assert admission.problems(admission.asks(third, [gpu]), held, {})
    claims = {c.get("resourceClaimName") for p in pods for c in p["spec"].get("resourceClaims", [])}
    if name.startswith("dra"):
        assert claims == {_one(name, "ResourceClaim")["metadata"]["name"]}
    else:
        assert all(
            p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1 for p in pods
        )
