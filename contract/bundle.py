"""Load and verify a bundle (DESIGN.md §3): manifest schema, sha256 of every file, shapes that chain.

Every refusal is a :class:`~contract.errors.BundleError` whose message names the file and the field.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from contract.errors import BundleError
from contract.manifest import MANIFEST_FILE, Manifest, read_manifest


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest

    def path(self, segment: str, variant: str) -> Path:
        seg = next(s for s in self.manifest.segments if s.name == segment)
        return self.root / seg.variants[variant].file

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest.tasks)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_shapes(manifest: Manifest, where: str = MANIFEST_FILE) -> None:
    """The first segment takes ``input.size``; each segment's output is the next one's input."""
    first = manifest.segments[0]
    if tuple(first.input_shape) != tuple(manifest.input.size):
        raise BundleError(
            f"{where}: field segments[0].input_shape {list(first.input_shape)} "
            f"!= input.size {list(manifest.input.size)}"
        )
    for i, (a, b) in enumerate(zip(manifest.segments, manifest.segments[1:], strict=False)):
        if tuple(a.output_shape) != tuple(b.input_shape):
            raise BundleError(
                f"{where}: field segments[{i}].output_shape {list(a.output_shape)} ({a.name}) does not "
                f"chain into segments[{i + 1}].input_shape {list(b.input_shape)} ({b.name})"
            )


def check_files(root: Path, manifest: Manifest, verify_sha256: bool = True) -> None:
    resolved_root = root.resolve()
    for i, seg in enumerate(manifest.segments):
        for vid, spec in seg.variants.items():
            field = f"segments[{i}].variants.{vid}"
            path = (root / spec.file).resolve()
            if not path.is_relative_to(resolved_root):
                raise BundleError(
                    f"{MANIFEST_FILE}: field {field}.file {spec.file!r} points outside the bundle"
                )
            if not path.is_file():
                raise BundleError(
                    f"{root / spec.file}: missing (named by {MANIFEST_FILE} field {field}.file)"
                )
            if verify_sha256 and (digest := sha256_file(path)) != spec.sha256:
                raise BundleError(
                    f"{root / spec.file}: sha256 {digest} does not match {MANIFEST_FILE} field "
                    f"{field}.sha256 {spec.sha256}"
                )


def load_bundle(root: str | Path, verify_sha256: bool = True) -> Bundle:
    """Read and verify a bundle; raise BundleError naming the file and the field on any problem."""
    root = Path(root)
    manifest = read_manifest(root)
    check_shapes(manifest, str(root / MANIFEST_FILE))
    check_files(root, manifest, verify_sha256)
    return Bundle(root, manifest)
