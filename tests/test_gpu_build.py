"""The CUDA build (tools/caffe/build.sh --gpu, `make setup GPU=1`).

Without a GPU (fast, CI-safe): the CPU build's cache key is the one it always was; the build
options give distinct keys; cuda13.patch applies to the unpacked source; a CUDA build found in the
cache imports here, runs CPU mode exactly as the CPU build does, and refuses GPU mode with one line.
Marked ``gpu`` (skipped unless a CUDA build is cached and the NVIDIA driver reports a device): the
published ResNet-20 on the GPU against the CPU build, top-1 within 0.1 point and logits within
tolerance, masks written into GPU blobs and restored bit for bit.
"""
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from caffe_prune import pycaffe

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools" / "caffe"
BUILD = TOOLS / "build.sh"
PYTHON = sys.executable
CACHE = Path(os.environ.get("CAFFE_PRUNE_CACHE", Path.home() / ".cache" / "caffe-prune"))
VERSION = "1.0.0+git20180821.99bd997-8"
ORIG_SHA256 = "e0eb3f06794f7402c77b7dec8e8480273ee1a1bb192e9122b621a69d4147ad0c"
DEB_SHA256 = "07cf073227494a6b07234e40cb5df91db566616593eef9baafdc4d06ad159f21"
# The CPU build's options exactly as build.sh has always hashed them: changing this string (or the
# way the key is made) would orphan every existing CPU cache.
CPU_OPTIONS = ("CPU_ONLY=ON BLAS=Open USE_OPENCV=ON USE_LMDB=ON USE_LEVELDB=ON USE_HDF5=ON "
               "BUILD_python=ON BUILD_python_layer=ON USE_CUDNN=OFF CMAKE_BUILD_TYPE=Release")


def _env(**extra):
    """This environment, less what would pick another pycaffe or toolkit (CAFFE_PRUNE_DEPS stays: on a
    machine built by offline-build.sh it is part of every key)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CAFFE_PRUNE_PYCAFFE", "CUDA_HOME", "CUDA_PATH")}
    env.update(extra)
    return env


def build_sh(*args, check=True):
    return subprocess.run(["bash", str(BUILD), PYTHON, *args], capture_output=True, text=True,
                          env=_env(), check=check, timeout=120)


def key(*flags) -> str:
    return build_sh(*flags, "--print-key").stdout.strip()


def prefix(*flags) -> Path:
    return CACHE / f"caffe-{key(*flags)}"


# ---- without a GPU ---------------------------------------------------------------------------------

def test_cpu_cache_key_is_unchanged():
    import numpy
    pyver = "%d.%d" % sys.version_info[:2]
    text = (f"{ORIG_SHA256} {DEB_SHA256}\n".encode() + (TOOLS / "debian12.patch").read_bytes()
            + f"{CPU_OPTIONS}\npython {pyver} numpy {numpy.__version__.split('.')[0]}\n".encode())
    if os.environ.get("CAFFE_PRUNE_DEPS"):      # libraries built from source (offline-build.sh)
        text += f"deps {os.environ['CAFFE_PRUNE_DEPS']}\n".encode()
    assert key() == hashlib.sha256(text).hexdigest()[:16]


def test_existing_cpu_build_still_hits():
    pyver = "%d.%d" % sys.version_info[:2]
    cpu_builds = [json.loads(p.read_text()) for p in CACHE.glob("caffe-*/build-info.json")]
    cpu_builds = [b for b in cpu_builds if "CPU_ONLY=ON" in b.get("options", "") and b.get("python") == pyver]
    if not cpu_builds:
        pytest.skip(f"no CPU build for Python {pyver} in {CACHE}")
    assert key() in {b["key"] for b in cpu_builds}
    out = build_sh("--dry-run").stdout
    assert "cached: a build would be a cache hit" in out


def test_build_options_give_distinct_keys():
    variants = [(), ("--gpu",), ("--gpu", "--no-cudnn"), ("--gpu", "--allow-tf32"),
                ("--gpu", "--no-cudnn", "--allow-tf32"), ("--gpu", "--cuda-arch", "75 80 90")]
    keys = [key(*v) for v in variants]
    assert len(set(keys)) == len(keys), dict(zip(map(" ".join, variants), keys))
    assert key("--gpu", "--allow-tf32") == key("--allow-tf32", "--gpu")      # order does not matter
    assert key("--gpu", "--cuda-arch", "80,90") == key("--gpu")               # the default, spelt out


@pytest.mark.parametrize("args, message", [
    (("--no-cudnn",), "--no-cudnn only applies to the CUDA build"),
    (("--allow-tf32",), "--allow-tf32 only applies to the CUDA build"),
    (("--gpu", "--cuda-arch", "sm_x"), "give compute capabilities"),
    (("--gpu", "--frobnicate"), "unknown option --frobnicate"),
])
def test_bad_options_are_refused(args, message):
    run = build_sh(*args, "--print-key", check=False)
    assert run.returncode == 2 and message in run.stderr and run.stdout == ""


def test_dry_run_says_what_the_cuda_build_would_do():
    before = sorted(CACHE.glob("caffe-*")) if CACHE.is_dir() else []
    out = build_sh("--gpu", "--dry-run").stdout
    assert f"key {key('--gpu')}" in out and "cuda13.patch" in out
    assert "architectures: sm_80 sm_90 + PTX compute_90; math: fp32" in out
    assert "CUDA: " in out and "cuDNN: " in out
    assert (sorted(CACHE.glob("caffe-*")) if CACHE.is_dir() else []) == before


def test_cuda_patch_explains_every_file_it_changes():
    patch = (TOOLS / "cuda13.patch").read_text()
    header = patch[:patch.index("\ndiff ")]
    files = [line.split(" b/", 1)[1] for line in patch.splitlines() if line.startswith("diff --git ")]
    assert files, "cuda13.patch changes no file"
    for path in files:
        assert path in header, f"cuda13.patch changes {path} without saying why in its header"


def test_wheel_pins_are_exact():
    for name in ("cuda-wheels.txt", "cudnn-wheels.txt"):
        pins = [ln for ln in (TOOLS / name).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        assert pins and all("==" in p for p in pins), name


def test_cuda_patch_applies_to_the_source(tmp_path):
    dsc = CACHE / "downloads" / f"caffe_{VERSION}.dsc"
    if not dsc.is_file():
        pytest.skip(f"the Caffe source package is not in {dsc.parent} (make setup fetches it)")
    src = tmp_path / "src"
    subprocess.run(["dpkg-source", "--no-check", "-x", str(dsc), str(src)], check=True, capture_output=True)
    for name, extra in (("debian12.patch", []), ("cuda13.patch", ["--dry-run"])):
        run = subprocess.run(["patch", "-p1", "-d", str(src), *extra], stdin=open(TOOLS / name),
                             capture_output=True, text=True)
        assert run.returncode == 0 and "FAILED" not in run.stdout and "offset" not in run.stdout, run.stdout


def test_bundle_dry_run_lists_the_pinned_pieces():
    run = subprocess.run(["bash", str(TOOLS / "bundle.sh"), "/nonexistent/bundle", "--python", "3.12", "--dry-run"],
                         capture_output=True, text=True, env=_env(), timeout=60)
    assert run.returncode == 0, run.stderr
    assert ORIG_SHA256 in run.stdout and DEB_SHA256 in run.stdout      # the same pins as build.sh
    for pin in ("nvidia-cuda-nvcc==13.0.88", "nvidia-cudnn-cu13==", "google-glog=0.6.0", "boost1.83=", "protobuf=3.21"):
        assert pin in run.stdout, pin
    assert not Path("/nonexistent/bundle").exists()


def test_offline_build_checks_the_bundle(tmp_path):
    """The script run on the offline machine verifies MANIFEST.sha256 first and refuses a changed file;
    its dry run reports what it would build (here: a bundle holding only itself and its manifest)."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "offline-build.sh").write_bytes((TOOLS / "offline-build.sh").read_bytes())
    (bundle / "manifest.json").write_text(json.dumps({"python": "%d.%d" % sys.version_info[:2]}))
    subprocess.run("sha256sum manifest.json offline-build.sh > MANIFEST.sha256", shell=True, cwd=bundle, check=True)
    run = subprocess.run(["bash", str(bundle / "offline-build.sh"), "--dry-run"], capture_output=True, text=True,
                         env=_env(), timeout=60)
    assert "bundle verified: 2 files match MANIFEST.sha256" in run.stdout
    assert "libraries to build from deps-src" in run.stdout and "dry run: nothing built" in run.stdout
    assert not (bundle / "deps").exists() and not (bundle / "project").exists()
    with open(bundle / "manifest.json", "a") as f:
        f.write(" ")
    run = subprocess.run(["bash", str(bundle / "offline-build.sh"), "--dry-run"], capture_output=True, text=True,
                         env=_env(), timeout=60)
    assert run.returncode == 1 and "does not match MANIFEST.sha256" in run.stderr


# ---- a script run in its own interpreter with a chosen pycaffe -------------------------------------

LOGITS = textwrap.dedent("""
    import json, sys
    import numpy as np
    from caffe_prune import pycaffe, published_weights
    from caffe_prune.data import cifar10
    from caffe_prune.graph import build_graph
    from caffe_prune.masking import Masker
    mode, name, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    got = pycaffe.set_mode(mode)
    deploy = f"prototxt/{name}/deploy.prototxt"
    param = pycaffe.read_prototxt(deploy)
    head = [l for l in param.layer if l.type == "Softmax"][-1].bottom[0]
    transform = [l for l in pycaffe.read_prototxt(f"prototxt/{name}/train_test.prototxt").layer
                 if l.HasField("transform_param")][0].transform_param
    images, labels = cifar10.read_split("test", cifar10.fetch(None, progress=False))
    images, labels = images[:count], labels[:count]
    x = cifar10_convert.caffe_input(images, list(transform.mean_value), transform.scale)
    net = pycaffe.load_net(deploy, published_weights.caffemodel(name, progress=False))
    batch = 100
    net.blobs["data"].reshape(batch, *x.shape[1:])
    net.reshape()

    def logits():
        rows = []
        for i in range(0, len(x), batch):
            chunk = x[i:i + batch]
            net.blobs["data"].data[:len(chunk)] = chunk
            net.forward()
            rows.append(net.blobs[head].data[:len(chunk)].copy())
        return np.concatenate(rows)
    plain = logits()
    graph = build_graph(param)
    masker = Masker(graph, [net])
    ids = [g.id for g in graph.groups][:3]
    for g in ids:
        masker.mask(g)
    masked = logits()
    for g in ids:
        masker.restore(g)
    again = logits()
    np.savez(out, plain=plain, masked=masked, again=again, labels=labels)
    print(json.dumps({"mode": got, "versions": pycaffe.versions()}))
""")


def run_logits(pycaffe_prefix: Path, mode: str, name: str, count: int, out: Path) -> dict:
    run = subprocess.run([PYTHON, "-c", LOGITS, mode, name, str(count), str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=900,
                         env=_env(CAFFE_PRUNE_PYCAFFE=str(pycaffe_prefix / "lib" / "python3" / "dist-packages")))
    assert run.returncode == 0, f"{mode} run with {pycaffe_prefix} failed ({run.returncode}): {run.stderr[-2000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def cached(*flags) -> Path:
    where = prefix(*flags)
    if not (where / "build-info.json").is_file():
        pytest.skip(f"no build for `build.sh PYTHON {' '.join(flags)}` in the cache ({where})")
    return where


def test_cuda_build_refuses_gpu_mode_without_a_gpu_and_runs_cpu_mode():
    """`make setup GPU=1` on a machine without a GPU: pycaffe imports, GPU mode is one InputError
    line (not a glog abort), 'auto' falls back to the CPU, and CPU mode computes what the CPU build
    computes (cuDNN layers are only made in GPU mode: cuda13.patch, change 5)."""
    gpu_prefix = cached("--gpu")
    if pycaffe._cuda_devices()[0]:
        pytest.skip("a CUDA device is present: the gpu-marked tests cover this build")
    script = textwrap.dedent("""
        import json
        from caffe_prune import pycaffe
        from caffe_prune.errors import InputError
        caffe = pycaffe.caffe()          # CAFFE_PRUNE_PYCAFFE: this one, not the venv's .pth
        out = {"built": pycaffe.gpu_built(), "pycaffe": caffe.__file__}
        try:
            pycaffe.set_mode("gpu")
        except InputError as exc:
            out["gpu"] = str(exc)
        out["auto"] = pycaffe.set_mode("auto")
        out["versions"] = pycaffe.versions()
        print(json.dumps(out))
    """)
    run = subprocess.run([PYTHON, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=_env(CAFFE_PRUNE_PYCAFFE=str(gpu_prefix / "lib" / "python3" / "dist-packages")))
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["built"] and got["pycaffe"].startswith(str(gpu_prefix))
    assert got["gpu"].startswith("GPU mode asked for, but no usable CUDA device:") and "\n" not in got["gpu"]
    assert got["auto"] == "CPU"
    v = got["versions"]
    assert v["gpu"].startswith("none usable") and v["cuda"].startswith("13.") and "fp32-exact" in v["math"]


def test_cuda_build_in_cpu_mode_matches_the_cpu_build(tmp_path):
    gpu_prefix, cpu_prefix = cached("--gpu"), cached()
    if pycaffe._cuda_devices()[0]:
        pytest.skip("a CUDA device is present: the gpu-marked tests cover this build")
    run_logits(cpu_prefix, "cpu", "LeNet-5", 200, tmp_path / "cpu.npz")
    run_logits(gpu_prefix, "cpu", "LeNet-5", 200, tmp_path / "gpu-build.npz")
    a, b = np.load(tmp_path / "cpu.npz"), np.load(tmp_path / "gpu-build.npz")
    for k in ("plain", "masked", "again"):
        assert np.abs(a[k] - b[k]).max() <= 1e-5, k
    assert np.array_equal(b["plain"], b["again"])


# ---- on a GPU ----------------------------------------------------------------------------------

def gpu_ready() -> tuple:
    """(CUDA build prefix, CPU build prefix), or skip."""
    devices, why, _ = pycaffe._cuda_devices()
    if not devices:
        pytest.skip(f"no GPU: {why}")
    return cached("--gpu"), cached()


@pytest.mark.gpu
def test_resnet20_on_the_gpu_matches_the_cpu(tmp_path):
    gpu_prefix, cpu_prefix = gpu_ready()
    gpu = run_logits(gpu_prefix, "gpu", "ResNet-20", 10000, tmp_path / "gpu.npz")
    run_logits(cpu_prefix, "cpu", "ResNet-20", 10000, tmp_path / "cpu.npz")
    assert gpu["mode"] == "GPU 0"
    g, c = np.load(tmp_path / "gpu.npz"), np.load(tmp_path / "cpu.npz")
    labels = c["labels"]
    top1 = {k: 100.0 * float((v["plain"].argmax(1) == labels).mean()) for k, v in (("gpu", g), ("cpu", c))}
    assert abs(top1["gpu"] - top1["cpu"]) <= 0.1, top1
    tf32 = "TF32 allowed" in gpu["versions"]["math"]
    tolerance = 5e-2 if tf32 else 1e-3       # measured on an H100: TF32 cuDNN 1e-2, fp32 1.5e-5
    for k in ("plain", "masked"):
        deviation = float(np.abs(g[k] - c[k]).max())
        assert deviation <= tolerance, f"{k} logits: GPU - CPU up to {deviation:.2e} (math: {gpu['versions']['math']})"
    assert np.array_equal(g["plain"], g["again"]) or np.abs(g["plain"] - g["again"]).max() <= 1e-6, \
        "restoring the masks on GPU blobs did not give back the unmasked logits"
    assert gpu["versions"]["gpu"].split(": ", 1)[1] and "GiB" in gpu["versions"]["gpu"]


@pytest.mark.gpu
def test_gpu_device_ids_are_checked():
    gpu_prefix, _ = gpu_ready()
    script = textwrap.dedent("""
        import json
        from caffe_prune import pycaffe
        from caffe_prune.errors import InputError
        n = len(pycaffe._cuda_devices()[0])
        out = {"ok": pycaffe.set_mode("gpu", 0)}
        for bad in (n, -1):
            try:
                pycaffe.set_mode("gpu", bad)
            except InputError as exc:
                out[str(bad)] = str(exc)
        print(json.dumps(out))
    """)
    run = subprocess.run([PYTHON, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=_env(CAFFE_PRUNE_PYCAFFE=str(gpu_prefix / "lib" / "python3" / "dist-packages")))
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["ok"] == "GPU 0"
    assert "out of range" in [v for k, v in got.items() if k not in ("ok", "-1")][0]
    assert "not a non-negative integer" in got["-1"]
