"""Downloads, checksums and the cache they land in, shared by the data (CIFAR-10 archive) and
the published weights.

A download goes through ``<dest>.part`` and is renamed only when complete, so an interrupted one
never looks finished; the caller verifies the checksum it expects before using the file.
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm


# One cache for everything fetched or built: the Caffe build (tools/caffe/build.sh reads the same
# variable), the CIFAR-10 download and LMDBs, and the published weights.
CACHE_ROOT = Path(os.environ.get("CAFFE_PRUNE_CACHE") or Path.home() / ".cache" / "caffe-prune")


class DownloadError(ValueError):
    """A download failed; the message is one line naming the URL and what to do instead."""


def digest(path, algorithm: str) -> str:
    """Hex digest of a file (md5, sha256, ...), read in 1 MiB chunks."""
    hasher = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


def download(url: str, dest: Path, progress: bool = True, instead: str = "download it elsewhere") -> Path:
    """Download `url` to `dest` with a progress bar; on failure say what to do `instead`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}",
                      disable=not progress, leave=False) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"cannot download {url} ({reason}); {instead}") from None
    part.replace(dest)
    return dest
