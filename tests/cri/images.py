"""OCI image archives made from local directories, for `ctr images import`: one
uncompressed layer per rootfs tree, a config (env, entrypoint) per image, and an index
naming each image.  No registry, no build tool."""

from __future__ import annotations

import hashlib
import io
import json
import platform
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
# containerd's importer names an image by this annotation of its index entry.
NAME_ANNOTATION = "io.containerd.image.name"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}


@dataclass(frozen=True)
class Image:
    """One image: a name, the rootfs tree of its single layer, its config's env/entrypoint."""

    name: str
    rootfs: Path
    env: Mapping[str, str] = field(default_factory=dict)
    entrypoint: Sequence[str] = ()


@dataclass(frozen=True)
class _Blob:
    digest: str
    data: bytes

    @classmethod
    def of(cls, data: bytes) -> _Blob:
        return cls("sha256:" + hashlib.sha256(data).hexdigest(), data)

    def descriptor(self, media_type: str) -> dict[str, object]:
        return {"mediaType": media_type, "digest": self.digest, "size": len(self.data)}


def layer_tar(rootfs: Path) -> bytes:
    """The tree as a layer: paths relative to /, owned by root, reproducible mtimes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(rootfs.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(rootfs)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            if info.isreg():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buffer.getvalue()


def _json(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def write_archive(images: Sequence[Image], archive: Path) -> None:
    """An OCI image layout (oci-layout, index.json, blobs/sha256/...) as one tar file;
    images with the same rootfs share its layer blob."""
    arch = _GOARCH.get(platform.machine(), platform.machine())
    blobs: dict[str, bytes] = {}
    layers: dict[Path, _Blob] = {}
    manifests = []
    for image in images:
        layer = layers.get(image.rootfs) or _Blob.of(layer_tar(image.rootfs))
        layers[image.rootfs] = layer
        env = {"PATH": PATH, **image.env}
        config = _Blob.of(
            _json(
                {
                    "architecture": arch,
                    "os": "linux",
                    "config": {
                        "Env": [f"{k}={v}" for k, v in env.items()],
                        "Entrypoint": list(image.entrypoint) or None,
                    },
                    "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
                }
            )
        )
        manifest = _Blob.of(
            _json(
                {
                    "schemaVersion": 2,
                    "mediaType": MANIFEST_TYPE,
                    "config": config.descriptor(CONFIG_TYPE),
                    "layers": [layer.descriptor(LAYER_TYPE)],
                }
            )
        )
        for blob in (layer, config, manifest):
            blobs[blob.digest] = blob.data
        entry = manifest.descriptor(MANIFEST_TYPE)
        entry["annotations"] = {NAME_ANNOTATION: image.name}
        entry["platform"] = {"architecture": arch, "os": "linux"}
        manifests.append(entry)
    files = {
        "oci-layout": _json({"imageLayoutVersion": "1.0.0"}),
        "index.json": _json({"schemaVersion": 2, "manifests": manifests}),
        **{f"blobs/sha256/{d.removeprefix('sha256:')}": data for d, data in blobs.items()},
    }
    with tarfile.open(archive, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
