"""The authors' trained caffemodels, fetched on demand and verified against models/published.json.

The manifest pins each file to the authors' repository at one commit, with its size and sha256.
A local mirror is used first (``$CAFFE_PRUNE_MODELS``: a directory holding the manifest's
``<dir>/original.caffemodel`` files), then the cache ($CAFFE_PRUNE_CACHE/models), then a download
into that cache. A file whose size or sha256 differs is never used: a bad download is moved aside as
``*.corrupt``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from caffe_prune.download import CACHE_ROOT, DownloadError, digest, download
from caffe_prune.errors import InputError

MANIFEST = Path(__file__).resolve().parents[1] / "models" / "published.json"
MODELS_ENV = "CAFFE_PRUNE_MODELS"
CACHE_DIR = CACHE_ROOT / "models"


def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def mirror_dir() -> Path | None:
    return Path(os.environ[MODELS_ENV]) if os.environ.get(MODELS_ENV) else None


def _mismatch(path: Path, entry: dict) -> str | None:
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{size} bytes, not {entry['bytes']}"
    sha = digest(path, "sha256")
    return None if sha == entry["sha256"] else f"sha256 {sha}, not {entry['sha256']}"


def caffemodel(name: str, cache_dir=None, progress: bool = True) -> Path:
    """Path to the verified published caffemodel of network `name` (LeNet-5, CIFAR10, NIN, ResNet-20)."""
    spec = manifest()
    if name not in spec["models"]:
        raise InputError(f"no published weights for {name!r}; the authors released "
                                 f"{', '.join(spec['models'])}")
    entry = spec["models"][name]
    mirrored = mirror_dir() / entry["dir"] / "original.caffemodel" if mirror_dir() else None
    if mirrored is not None and mirrored.is_file():
        why = _mismatch(mirrored, entry)
        if why:
            raise InputError(f"{mirrored} has {why}: not the published {name}; "
                                     f"replace it or unset {MODELS_ENV}")
        return mirrored
    cached = Path(cache_dir or CACHE_DIR) / entry["dir"] / "original.caffemodel"
    if not cached.is_file():
        url = spec["url"].format(commit=spec["commit"], dir=entry["dir"])
        try:
            download(url, cached, progress,
                     instead=f"fetch it by hand into {cached} or a mirror named by ${MODELS_ENV}")
        except DownloadError as exc:
            raise InputError(str(exc)) from None
    why = _mismatch(cached, entry)
    if why:
        corrupt = cached.with_name(cached.name + ".corrupt")
        cached.replace(corrupt)
        raise InputError(f"{cached} has {why}; moved aside to {corrupt.name}; run again to re-download")
    return cached
