"""CIFAR-10's records, got from wherever they are: the official binary release's layout (one label
byte followed by the R, G and B planes, 32x32 each), read as it is.

``fetch`` gets it from a local directory (binary or python-pickle batches), a local ``.tar.gz`` or
the official download (md5 checked; only the expected members extracted); ``read_split`` reads a
split's records (RGB planes, as the files hold them), ``summary`` counts them. What a network is fed
(which plane order, which transform) and the LMDBs Caffe's Data layer reads are made of these
records by caffe_prune.data.cifar10_convert; the validation split by caffe_prune.data.validation.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import tarfile
import urllib.parse
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from caffe_prune import fsio
from caffe_prune.download import CACHE_ROOT, DownloadError, digest, download
from caffe_prune.errors import DataError

RECORD_BYTES = 1 + 3 * 32 * 32
SPLIT_FILES = {
    "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
    "test": ["test_batch.bin"],
}
PY_FILES = {split: [name[:-len(".bin")] for name in names] for split, names in SPLIT_FILES.items()}
OFFICIAL_COUNTS = {"train": 50_000, "test": 10_000}
BIN_DIR = "cifar-10-batches-bin"
PY_DIR = "cifar-10-batches-py"          # the python release: the same records, pickled
DATA_ENV = "CAFFE_PRUNE_DATA"
CACHE_DIR = CACHE_ROOT / "data" / "cifar10"

# The official binary release (https://www.cs.toronto.edu/~kriz/cifar.html). Module constants, read
# at call time, so that tests can point the download at a local file.
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"     # 170,052,171 bytes
ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
# cifar-10-python.tar.gz is accepted too, so that a good python archive is never moved aside as corrupt
PY_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_MEMBERS = (
    {f"{BIN_DIR}/{name}" for name in sum(SPLIT_FILES.values(), ["batches.meta.txt", "readme.html"])}
    | {f"{PY_DIR}/{name}" for name in sum(PY_FILES.values(), ["batches.meta", "readme.html"])}
)
FETCHED = "fetched.json"                # in the cache: the md5 of the archive its batches came from
BATCH_RECORDS = OFFICIAL_COUNTS["train"] // len(SPLIT_FILES["train"])     # 10,000 per data_batch_b


def default_location() -> Path | None:
    """Where CIFAR-10 is looked for when no location is given: $CAFFE_PRUNE_DATA (a local mirror,
    e.g. a partial copy), then the user cache that a download fills."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return CACHE_DIR


def binary_dir(location=None) -> Path:
    """The directory holding the official binary batches, given it or its parent."""
    root = Path(location) if location is not None else default_location()
    for candidate in (root / BIN_DIR, root):
        if (candidate / SPLIT_FILES["test"][0]).is_file():
            return candidate
    raise DataError(f"no CIFAR-10 binary batches in {root} (expected {root / BIN_DIR}/test_batch.bin); "
                    f"pass --data DIR, set {DATA_ENV}, or fetch it with `caffe-prune data cifar10`")


def _split_paths(split: str, directory: Path) -> list[Path]:
    if split not in SPLIT_FILES:
        raise DataError(f"split {split!r} is not one of {sorted(SPLIT_FILES)}")
    paths = [directory / name for name in SPLIT_FILES[split]]
    for path in paths:
        if not path.is_file():
            raise DataError(f"{path} is missing from the CIFAR-10 directory {directory}")
    return paths


def _record_count(path: Path, size: int) -> int:
    if size == 0 or size % RECORD_BYTES:
        raise DataError(f"{path} has {size} bytes, not a whole number of {RECORD_BYTES}-byte "
                        f"records: the file is truncated or corrupt; fetch it again")
    return size // RECORD_BYTES


def read_split(split: str, location=None):
    """Read all records of a split: images as uint8 (N, 3, 32, 32) in the file's RGB order, labels int64.

    A directory may hold fewer records than the official release; a file whose size is not a whole
    number of records is corrupt and rejected."""
    directory = binary_dir(location)
    chunks = []
    for path in _split_paths(split, directory):
        raw = np.fromfile(path, dtype=np.uint8)
        chunks.append(raw.reshape(_record_count(path, raw.size), RECORD_BYTES))
    records = np.concatenate(chunks)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{directory}: label {labels.max()} out of range 0..9: not CIFAR-10 binary records")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def summary(location=None) -> dict:
    """Images per split at `location` (from the record files' sizes). A partial copy (e.g. 5085 train
    / 1017 test images) is fine: callers report it against OFFICIAL_COUNTS and go on."""
    directory = binary_dir(location)
    return {split: sum(_record_count(p, p.stat().st_size) for p in _split_paths(split, directory))
            for split in SPLIT_FILES}


def record_sha256(split: str, location=None) -> dict:
    """sha256 of each record file of a split, by file name: what a converted LMDB was made from."""
    return {path.name: digest(path, "sha256") for path in _split_paths(split, binary_dir(location))}


# ---- getting the records: directory, archive or download -----------------------------------------

def fetch(source=None, cache_dir=None, expected_md5="official", progress=True) -> Path:
    """A directory holding ``cifar-10-batches-bin/`` (or the batches themselves), from `source`:

    - a directory with ``cifar-10-batches-bin/`` (used in place) or ``cifar-10-batches-py/``
      (converted into the cache);
    - a ``.tar.gz`` file: md5-checked, then its expected members extracted into the cache;
    - a URL (http, https, file): downloaded into the cache, then as an archive;
    - None: ``default_location()`` when it holds data, else the official download (``URL``).

    ``expected_md5`` is "official" (the binary or python release, ARCHIVE_MD5 / PY_ARCHIVE_MD5),
    another hex digest, or None to accept any archive (a test's small one). An archive that fails
    the check is renamed ``*.corrupt`` so that it is never used by mistake."""
    cache = Path(cache_dir) if cache_dir is not None else CACHE_DIR
    if source is None:
        local = default_location()
        if holds_batches(local):
            return _from_directory(local, cache)
        source = URL
    source = str(source)
    if "://" in source:
        return _from_url(source, cache, expected_md5, progress)
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_directory(path, cache)
    if path.is_file():
        if not tarfile.is_tarfile(path):   # a wrong file named by hand: say so, leave it where it is
            raise DataError(f"{path} is not a .tar.gz archive; pass the CIFAR-10 archive, its directory, or a URL")
        return _from_archive(path, cache, expected_md5)
    raise DataError(f"{path} does not exist; pass a CIFAR-10 directory, a .tar.gz or a URL as --source")


def names_cifar10(data) -> bool:
    """Whether a --data value names CIFAR-10: ``cifar10``, a URL, an archive, or a directory of its
    batches (what ``fetch`` reads)."""
    data = os.fsdecode(data)
    return data == "cifar10" or "://" in data or data.endswith((".tar.gz", ".tgz")) or \
        (Path(data).is_dir() and holds_batches(Path(data)))


def holds_batches(path: Path) -> bool:
    """Whether ``path`` holds CIFAR-10 batches (binary or python, in a sub-directory or itself)."""
    return any((path / sub / name).is_file() for sub, name in
               ((BIN_DIR, "test_batch.bin"), (".", "test_batch.bin"), (PY_DIR, "test_batch"), (".", "test_batch")))


def _from_directory(path: Path, cache: Path) -> Path:
    if (path / BIN_DIR / "test_batch.bin").is_file() or (path / "test_batch.bin").is_file():
        return path.parent if path.name == BIN_DIR else path
    for py_dir in (path / PY_DIR, path):
        if (py_dir / "test_batch").is_file():
            return convert_py(py_dir, cache)
    raise DataError(f"{path} holds neither {BIN_DIR}/ nor {PY_DIR}/; pass the directory that contains "
                    f"one, the .tar.gz, or a URL as --source")


def _from_url(url: str, cache: Path, expected_md5, progress: bool) -> Path:
    archive = cache / (PurePosixPath(urllib.parse.urlparse(url).path).name or "cifar-10-binary.tar.gz")
    if not archive.is_file():
        if _fetched_md5(cache) in _accepted_md5(expected_md5) and holds_batches(cache):
            return _from_directory(cache, cache)     # extracted before, archive since deleted
        try:
            download(url, archive, progress, instead="download it elsewhere and pass the .tar.gz as --source")
        except DownloadError as exc:
            raise DataError(str(exc)) from None
    return _from_archive(archive, cache, expected_md5, ours=True)


def _from_archive(archive: Path, cache: Path, expected_md5, ours: bool = False) -> Path:
    md5 = verify_md5(archive, expected_md5, move_aside=ours)
    if _fetched_md5(cache) != md5 or not holds_batches(cache):
        extract_archive(archive, cache)
        fsio.write_json(cache / FETCHED, {"archive": archive.name, "md5": md5}, indent=None)
    return _from_directory(cache, cache)


def _fetched_md5(cache: Path) -> str | None:
    try:
        return json.loads((cache / FETCHED).read_text()).get("md5")
    except (OSError, ValueError, AttributeError):
        return None


def _accepted_md5(expected_md5) -> set:
    if expected_md5 == "official":
        return {ARCHIVE_MD5, PY_ARCHIVE_MD5}
    return {expected_md5} if expected_md5 else set()


def verify_md5(archive, expected_md5="official", move_aside: bool = False) -> str:
    """The archive's md5, after checking it (see fetch). A mismatch moves a file the toolkit
    downloaded (``move_aside``) to ``*.corrupt``; a file the user named is left where it is."""
    archive = Path(archive)
    md5 = digest(archive, "md5")
    accepted = _accepted_md5(expected_md5)
    if not accepted or md5 in accepted:
        return md5
    moved = "left it where it is"
    if move_aside:
        corrupt = archive.with_name(archive.name + ".corrupt")
        try:
            archive.replace(corrupt)
            moved = f"moved it aside to {corrupt}"
        except OSError as exc:
            moved = f"could not move it aside ({exc.strerror})"
    want = "the official CIFAR-10 archive's " + ARCHIVE_MD5 if expected_md5 == "official" else expected_md5
    raise DataError(f"{archive}: md5 {md5} is not {want} (corrupt or incomplete); {moved}; "
                    f"download it again with `caffe-prune data cifar10` or pass another --source")


def _unsafe(member: tarfile.TarInfo) -> str | None:
    path = PurePosixPath(member.name)
    if member.name.startswith("/") or path.is_absolute():
        return "an absolute path"
    if ".." in path.parts:
        return "a path with '..'"
    if member.issym() or member.islnk():
        return "a link"
    if not (member.isfile() or member.isdir()):
        return "a device or fifo"
    return None


def extract_archive(archive, dest) -> list[str]:
    """Extract the CIFAR-10 batches of `archive` into `dest` (replacing any there) and return their
    names. Every member is checked before anything is written: an absolute path, a '..' component,
    a link or a device refuses the whole archive (the official one holds none); members other than
    ARCHIVE_MEMBERS are skipped, so nothing else lands on disk."""
    archive, dest = Path(archive), Path(dest)
    partial = dest / ".extract.partial"
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                why = _unsafe(member)
                if why:
                    raise DataError(f"{archive}: member {member.name!r} is {why}; refusing the archive "
                                    f"(the official CIFAR-10 release holds none); get it from {URL}")
            wanted = [m for m in members if m.isfile() and str(PurePosixPath(m.name)) in ARCHIVE_MEMBERS]
            names = {str(PurePosixPath(m.name)) for m in wanted}
            if not names & {f"{BIN_DIR}/test_batch.bin", f"{PY_DIR}/test_batch"}:
                raise DataError(f"{archive} holds no {BIN_DIR}/test_batch.bin: not a CIFAR-10 archive")
            shutil.rmtree(partial, ignore_errors=True)
            for member in wanted:
                target = partial / PurePosixPath(member.name)
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"{archive} is not a readable .tar.gz ({exc}); fetch it again") from None
    for top in (BIN_DIR, PY_DIR):
        shutil.rmtree(dest / top, ignore_errors=True)
    for top in partial.iterdir():
        top.rename(dest / top.name)
    partial.rmdir()
    return sorted(names)


# ---- the python release: pickles, read without running arbitrary code ---------------------------

# numpy 2 renamed numpy.core to numpy._core; old pickles (the official ones) name the old module
_NUMPY_CORE = "numpy._core" if importlib.util.find_spec("numpy._core") else "numpy.core"
_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
                   ("numpy", "ndarray"), ("numpy", "dtype"),
                   ("_codecs", "encode")}   # how Python 3 writes bytes at protocol 2


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch (a dict of bytes, lists and one uint8 array) and nothing else:
    a pickle may name any callable, so only the numpy pieces an array needs are resolved."""

    def find_class(self, module, name):
        canonical = module.replace("numpy._core", "numpy.core")
        if (canonical, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch never "
                                         f"does; refusing to unpickle it")
        return super().find_class(canonical.replace("numpy.core", _NUMPY_CORE), name)


def read_py_batch(path):
    """One batch of the python release: images uint8 (N, 3, 32, 32) in RGB order, labels int64.
    Its rows are the binary records without the label byte (R, G, B planes, row-major)."""
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            batch = _BatchUnpickler(stream, encoding="bytes").load()
    except Exception as exc:   # a pickle can fail in many ways; each means "not a CIFAR-10 batch"
        raise DataError(f"{path} is not a CIFAR-10 python batch: {exc}") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch dict")
    data, labels = (batch.get(key.encode(), batch.get(key)) for key in ("data", "labels"))
    data, labels = np.asarray(data), np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != RECORD_BYTES - 1 \
            or labels.shape != (len(data),) or len(data) == 0 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: data {data.dtype}{data.shape}, labels {labels.shape}: "
                        f"not a CIFAR-10 batch (uint8 (N, 3072) and N labels 0..9)")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def label_names(py_dir) -> list[str]:
    """The class names in a python release's batches.meta (airplane, automobile, ...)."""
    path = Path(py_dir) / "batches.meta"
    try:
        with open(path, "rb") as stream:
            meta = _BatchUnpickler(stream, encoding="bytes").load()
        names = meta.get(b"label_names", meta.get("label_names"))
        return [name.decode() if isinstance(name, bytes) else str(name) for name in names]
    except Exception as exc:
        raise DataError(f"{path} is not a CIFAR-10 batches.meta: {exc}") from None


def convert_py(py_dir, cache_dir=None) -> Path:
    """Write the python batches in `py_dir` as binary batches under the cache and return the
    directory holding them. It is named by the pickles' content, so a second call reuses it."""
    py_dir, cache = Path(py_dir), Path(cache_dir) if cache_dir is not None else CACHE_DIR
    names = sum(PY_FILES.values(), [])
    missing = [name for name in names if not (py_dir / name).is_file()]
    if missing:
        raise DataError(f"{py_dir} lacks {', '.join(missing)}: an incomplete {PY_DIR}; fetch it again")
    content = hashlib.sha256("".join(digest(py_dir / name, "sha256") for name in names).encode()).hexdigest()
    root = cache / f"from-py-{content[:12]}"
    if (root / BIN_DIR / "test_batch.bin").is_file():
        return root
    partial = cache / f".from-py-{content[:12]}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / BIN_DIR).mkdir(parents=True)
    for name in tqdm(names, desc="convert python batches", leave=False):
        images, labels = read_py_batch(py_dir / name)
        records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1)
        records.tofile(partial / BIN_DIR / f"{name}.bin")
    if (py_dir / "batches.meta").is_file():
        (partial / BIN_DIR / "batches.meta.txt").write_text("".join(f"{name}\n" for name in label_names(py_dir)))
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    return root


def train_batch_counts(location=None) -> list:
    """Records present in data_batch_1..5 at `location` (10,000 each in the official release)."""
    directory = binary_dir(location)
    return [_record_count(p, p.stat().st_size) for p in _split_paths("train", directory)]
