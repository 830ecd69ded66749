"""The slot's record of its container's Kubernetes identity (fcsp_hook.slot.kubernetes),
which labels the tenant's metrics."""

from __future__ import annotations

from pathlib import Path

from fcsp_hook.slot import kubernetes


def test_kubernetes_identity_is_recorded_bounded_and_plain(tmp_path: Path) -> None:
    """containerd's io.kubernetes.cri.* names (else CRI-O's io.kubernetes.*) become the
    slot's record; a value that cannot be a Kubernetes name (too long, other characters)
    is left out; none at all writes no file; the reader checks every value again and
    never follows a link."""
    record = kubernetes.record(
        {
            "io.kubernetes.cri.sandbox-name": "train-a",
            "io.kubernetes.pod.name": "ignored",
            "io.kubernetes.pod.namespace": "ml",
            "io.kubernetes.container.name": "x" * 254,
        }
    )
    assert record == {"kubernetes": (b"pod=train-a\nnamespace=ml\n", 0o644)}
    assert kubernetes.record({"io.kubernetes.pod.name": "evil\n{x}"}) == {}
    slot = tmp_path / "slot"
    slot.mkdir()
    (slot / "kubernetes").write_bytes(b"pod=a\nnamespace=b c\ncontainer=" + b"y" * 5000)
    assert kubernetes.read_record(slot) == {"pod": "a", "namespace": "", "container": ""}
    (slot / "kubernetes").unlink()
    (tmp_path / "elsewhere").write_text("pod=stolen\n")
    (slot / "kubernetes").symlink_to(tmp_path / "elsewhere")
    assert kubernetes.read_record(slot) == {"pod": "", "namespace": "", "container": ""}
