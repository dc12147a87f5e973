#!/usr/bin/env bash
# Builds stock BVLC Caffe (Debian's source package caffe 1.0.0+git20180821.99bd997-8, i.e. upstream
# master of 2018-08-21 plus Debian's patches, plus tools/caffe/debian12.patch) with Python bindings
# for the given interpreter, into a cache directory keyed by a hash of everything that shapes the
# build, then points that interpreter's environment at it with a .pth file (the last build or cache
# hit wins: `make setup` points the venv at the CPU build, `make setup GPU=1` at the CUDA build).
#
#   tools/caffe/build.sh PYTHON [--gpu [--no-cudnn] [--allow-tf32] [--cuda-arch "80 90"]
#                                      [--cuda-root DIR]] [--print-key | --dry-run]
#
#   --gpu          CUDA build (CMake CPU_ONLY=OFF) of the same source plus tools/caffe/cuda13.patch,
#                  with cuDNN. CUDA comes from --cuda-root, $CUDA_HOME, /usr/local/cuda or an nvcc on
#                  PATH; without one, from the pinned wheels of cuda-wheels.txt (and cudnn-wheels.txt),
#                  pip-installed into PYTHON's environment ($CAFFE_PRUNE_WHEELS=DIR: from DIR, offline).
#   --no-cudnn     leave cuDNN out (Caffe's own CUDA kernels for every layer).
#   --allow-tf32   let cuBLAS and cuDNN use TF32 tensor cores (default: fp32-exact math).
#   --cuda-arch    real architectures to compile (default "80 90"); PTX is added for the last one.
#   --print-key    print the cache key and exit; --dry-run: say what would be built, build nothing.
#
# Environment: CAFFE_PRUNE_CACHE (default ~/.cache/caffe-prune) holds builds and the private apt state;
# CAFFE_PRUNE_DEPS=PREFIX adds libraries built from source there (tools/caffe/bundle.sh) to the search.
# Never touches /etc/apt: the bullseye deb-src line lives in tools/caffe/sources.list.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
USAGE="usage: build.sh PYTHON [--gpu [--no-cudnn] [--allow-tf32] [--cuda-arch LIST] [--cuda-root DIR]] [--print-key|--dry-run]"
PYTHON="${1:?$USAGE}"
shift
CPU_ONLY=ON
CUDNN=ON
TF32=OFF
CUDA_ARCH="80 90"
CUDA_ROOT_ARG=""
ACTION=build
GPU_ONLY_FLAGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) CPU_ONLY=OFF ;;
    --no-cudnn) CUDNN=OFF; GPU_ONLY_FLAGS+=("$1") ;;
    --allow-tf32) TF32=ON; GPU_ONLY_FLAGS+=("$1") ;;
    --cuda-arch) [ $# -ge 2 ] || { echo "caffe: error: --cuda-arch needs a list, e.g. \"80 90\"" >&2; exit 2; }
                 CUDA_ARCH="$(echo "$2" | tr ',' ' ' | tr -s ' ' | sed 's/^ //; s/ $//; s/sm_//g')"; GPU_ONLY_FLAGS+=("$1"); shift ;;
    --cuda-root) [ $# -ge 2 ] || { echo "caffe: error: --cuda-root needs a directory" >&2; exit 2; }
                 CUDA_ROOT_ARG="$2"; GPU_ONLY_FLAGS+=("$1"); shift ;;
    --print-key) ACTION=print-key ;;
    --dry-run) ACTION=dry-run ;;
    *) echo "caffe: error: unknown option $1; $USAGE" >&2; exit 2 ;;
  esac
  shift
done
if [ "$CPU_ONLY" = ON ] && [ ${#GPU_ONLY_FLAGS[@]} -gt 0 ]; then
  echo "caffe: error: ${GPU_ONLY_FLAGS[0]} only applies to the CUDA build (--gpu)" >&2; exit 2
fi
echo "$CUDA_ARCH" | grep -Eq '^[0-9]+( [0-9]+)*$' \
  || { echo "caffe: error: --cuda-arch \"$CUDA_ARCH\": give compute capabilities like \"80 90\"" >&2; exit 2; }

VERSION="1.0.0+git20180821.99bd997-8"
# Pinned sha256 of the source package's files (from its signed .dsc); a download must match them.
ORIG_TAR="caffe_1.0.0+git20180821.99bd997.orig.tar.gz"
ORIG_SHA256="e0eb3f06794f7402c77b7dec8e8480273ee1a1bb192e9122b621a69d4147ad0c"
DEB_TAR="caffe_${VERSION}.debian.tar.xz"
DEB_SHA256="07cf073227494a6b07234e40cb5df91db566616593eef9baafdc4d06ad159f21"

CACHE="${CAFFE_PRUNE_CACHE:-$HOME/.cache/caffe-prune}"
say() { echo "caffe: $*"; }
die() { echo "caffe: error: $*" >&2; exit 1; }
verify() { echo "$2  $CACHE/downloads/$1" | sha256sum --check --status 2>/dev/null; }
# The system compiler, never an exported CC/CXX toolchain: one that links libstdc++ statically makes
# pycaffe crash inside glog. CAFFE_PRUNE_KEEP_CC=1 keeps CC/CXX as exported.
SYS_CC=gcc; SYS_CXX=g++
[ -x /usr/bin/gcc ] && SYS_CC=/usr/bin/gcc
[ -x /usr/bin/g++ ] && SYS_CXX=/usr/bin/g++
if [ "${CAFFE_PRUNE_KEEP_CC:-}" = 1 ]; then SYS_CC="${CC:-$SYS_CC}"; SYS_CXX="${CXX:-$SYS_CXX}"
elif [ -n "${CC:-}${CXX:-}" ]; then echo "caffe: ignoring CC=${CC:-} CXX=${CXX:-}: building with $SYS_CC / $SYS_CXX (CAFFE_PRUNE_KEEP_CC=1 keeps them)"; fi
export CC="$SYS_CC" CXX="$SYS_CXX"

# --- the interpreter must be the one Debian's boost-python was built for -------------------------
PYVER="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
  || die "cannot run $PYTHON"
DEPS="${CAFFE_PRUNE_DEPS:-}"
BOOST_PY="$(ls ${DEPS:+"$DEPS"/lib/libboost_python3*.so} /usr/lib/*/libboost_python3*.so 2>/dev/null | head -n 1 || true)"
[ -n "$BOOST_PY" ] || die "boost-python not found; run tools/install-system-deps.sh"
BOOST_PYVER="$(basename "$BOOST_PY" .so | sed -E 's/libboost_python3([0-9]+)/3.\1/')"
if [ -n "$DEPS" ]; then   # prefer the boost-python built for this interpreter under CAFFE_PRUNE_DEPS
  [ -f "$DEPS/lib/libboost_python${PYVER/./}.so" ] && BOOST_PYVER="$PYVER"
fi
[ "$PYVER" = "$BOOST_PYVER" ] || die "Python $PYVER at $PYTHON, but the system's boost-python is for \
Python $BOOST_PYVER; create the environment with python$BOOST_PYVER (make setup does)"
PYINC="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
PYLIB="$(ls /usr/lib/*/libpython"$PYVER".so 2>/dev/null | head -n 1 || true)"
[ -f "$PYINC/Python.h" ] && [ -n "$PYLIB" ] || die "Python $PYVER headers/library missing; apt-get install python3-dev"
NUMPY_MAJOR="$("$PYTHON" -c 'import numpy; print(numpy.__version__.split(".")[0])')" \
  || die "numpy is not installed for $PYTHON; pip install 'numpy>=2'"
# _caffe.so is compiled against numpy's C API: numpy 2 headers give a module that loads under 1.x and 2.x.
[ "$NUMPY_MAJOR" -ge 2 ] || die "numpy $NUMPY_MAJOR.x for $PYTHON: build against numpy >= 2"

# --- the cache key: source, patches, options, Python ---------------------------------------------
OPTIONS="CPU_ONLY=$CPU_ONLY BLAS=Open USE_OPENCV=ON USE_LMDB=ON USE_LEVELDB=ON USE_HDF5=ON \
BUILD_python=ON BUILD_python_layer=ON USE_CUDNN=OFF CMAKE_BUILD_TYPE=Release"
# The CPU build's key is exactly what it always was (an existing CPU cache keeps hitting); the CUDA
# build adds its own options, cuda13.patch and the toolkit's identity.
CUDA_PTX="${CUDA_ARCH##* }"
MATH="fp32"
[ "$TF32" = ON ] && MATH="tf32-allowed"
if [ "$CPU_ONLY" = OFF ]; then
  OPTIONS="CPU_ONLY=OFF BLAS=Open USE_OPENCV=ON USE_LMDB=ON USE_LEVELDB=ON USE_HDF5=ON \
BUILD_python=ON BUILD_python_layer=ON USE_CUDNN=$CUDNN CMAKE_BUILD_TYPE=Release \
CUDA_ARCH_BIN=${CUDA_ARCH// /,} CUDA_ARCH_PTX=$CUDA_PTX MATH=$MATH"
fi

# --- CUDA: a system toolkit, else the pinned wheels (resolved without installing anything) -------
CUDA_FROM=""; CUDA_ROOT=""; CUDA_ID=""; CUDNN_FROM=""; CUDNN_INC=""; CUDNN_LIB=""
wheel_pins() { grep -Ev '^\s*(#|$)' "$@" | tr '\n' ' ' | sed 's/ $//'; }
if [ "$CPU_ONLY" = OFF ]; then
  # a usable toolkit has nvcc, the runtime, cuBLAS and cuRAND (a partial one, e.g. nvcc alone, is skipped)
  toolkit_missing() {
    local root="$1" what=() lib f found
    [ -x "$root/bin/nvcc" ] || what+=(bin/nvcc)
    for lib in cudart cublas curand; do
      found=""
      for f in "$root"/lib64/lib$lib.so "$root"/lib/lib$lib.so "$root"/targets/*/lib/lib$lib.so; do
        [ -e "$f" ] && found=1
      done
      [ -n "$found" ] || what+=(lib$lib.so)
    done
    echo "${what[*]:-}"
  }
  CUDA_SKIPPED=""
  for candidate in "$CUDA_ROOT_ARG" "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda \
                   "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /nonexistent/bin/nvcc)")")"; do
    [ -n "$candidate" ] && [ -d "$candidate" ] || continue
    missing="$(toolkit_missing "$candidate")"
    if [ -z "$missing" ]; then CUDA_ROOT="$(cd "$candidate" && pwd)"; break; fi
    [ "$candidate" = "$CUDA_ROOT_ARG" ] && die "--cuda-root $CUDA_ROOT_ARG lacks $missing"
    [ -x "$candidate/bin/nvcc" ] && CUDA_SKIPPED="$CUDA_SKIPPED $candidate (lacks $missing)"
  done
  if [ -n "$CUDA_ROOT" ]; then
    CUDA_FROM=system
    CUDA_ID="system $("$CUDA_ROOT/bin/nvcc" --version | grep -o 'release [0-9.]*, V[0-9.]*' || echo unknown)"
  else
    CUDA_FROM=wheels
    CUDA_ID="wheels $(wheel_pins "$HERE/cuda-wheels.txt")"
  fi
  if [ "$CUDNN" = ON ]; then
    for inc in ${CUDA_ROOT:+"$CUDA_ROOT/include"} ${DEPS:+"$DEPS/include"} /usr/include /usr/include/x86_64-linux-gnu; do
      if [ "$CUDA_FROM" = system ] && [ -f "$inc/cudnn_version.h" ]; then CUDNN_INC="$inc"; break; fi
    done
    if [ -n "$CUDNN_INC" ]; then
      CUDNN_FROM=system
      CUDNN_ID="$(grep -E '#define CUDNN_(MAJOR|MINOR|PATCHLEVEL) ' "$CUDNN_INC/cudnn_version.h" | awk '{print $3}' | tr '\n' . | sed 's/\.$//')"
      CUDA_ID="$CUDA_ID cudnn system $CUDNN_ID"
    else
      CUDNN_FROM=wheels
      CUDA_ID="$CUDA_ID cudnn wheels $(wheel_pins "$HERE/cudnn-wheels.txt")"
    fi
  fi
  KEY="$( { echo "$ORIG_SHA256 $DEB_SHA256"; cat "$HERE/debian12.patch"; echo "$OPTIONS";
            echo "python $PYVER numpy $NUMPY_MAJOR"; cat "$HERE/cuda13.patch"; echo "cuda $CUDA_ID";
            [ -z "$DEPS" ] || echo "deps $DEPS"; } | sha256sum | cut -c1-16)"
else
  KEY="$( { echo "$ORIG_SHA256 $DEB_SHA256"; cat "$HERE/debian12.patch"; echo "$OPTIONS";
            echo "python $PYVER numpy $NUMPY_MAJOR"; [ -z "$DEPS" ] || echo "deps $DEPS"; } | sha256sum | cut -c1-16)"
fi
PREFIX="$CACHE/caffe-$KEY"
STAMP="$PREFIX/build-info.json"

if [ "$ACTION" = print-key ]; then
  echo "$KEY"
  exit 0
fi
if [ "$ACTION" = dry-run ]; then
  say "dry run: nothing is built, installed or linked"
  say "key $KEY -> $PREFIX ($([ -f "$STAMP" ] && echo "cached: a build would be a cache hit" || echo "not cached: would build"))"
  say "options: $OPTIONS"
  for f in "$ORIG_TAR:$ORIG_SHA256" "$DEB_TAR:$DEB_SHA256"; do
    verify "${f%%:*}" "${f##*:}" && say "source: $CACHE/downloads/${f%%:*} (sha256 ok)" \
      || say "source: $CACHE/downloads/${f%%:*} missing or wrong; would fetch caffe=$VERSION through $HERE/sources.list"
  done
  say "patches: debian12.patch$([ "$CPU_ONLY" = OFF ] && echo ", cuda13.patch")"
  say "python $PYVER ($PYTHON), numpy $NUMPY_MAJOR.x headers, boost-python $BOOST_PY"
  [ -z "$DEPS" ] || say "libraries built from source: $DEPS"
  if [ "$CPU_ONLY" = OFF ]; then
    say "compiler: $(command -v "$SYS_CC") / $(command -v "$SYS_CXX")"
    [ -z "$CUDA_SKIPPED" ] || say "CUDA: skipped incomplete toolkit(s):$CUDA_SKIPPED"
    if [ "$CUDA_FROM" = system ]; then say "CUDA: system toolkit $CUDA_ROOT ($CUDA_ID)"
    else say "CUDA: wheels into $PYTHON's environment${CAFFE_PRUNE_WHEELS:+ from $CAFFE_PRUNE_WHEELS}: $(wheel_pins "$HERE/cuda-wheels.txt")"; fi
    [ "$CUDNN" = OFF ] && say "cuDNN: left out (--no-cudnn)"
    [ "$CUDNN_FROM" = system ] && say "cuDNN: system $CUDNN_INC"
    [ "$CUDNN_FROM" = wheels ] && say "cuDNN: wheels $(wheel_pins "$HERE/cudnn-wheels.txt")"
    say "architectures: sm_${CUDA_ARCH// / sm_} + PTX compute_$CUDA_PTX; math: $MATH"
  fi
  exit 0
fi

link_into_env() {
  local site
  site="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # Debian's cmake-fix-python-module-installdir patch installs the module under lib/python3/dist-packages
  echo "$PREFIX/lib/python3/dist-packages" > "$site/caffe-prune-pycaffe.pth"
  say "pycaffe linked into $site (caffe-prune-pycaffe.pth)"
}

# The pinned CUDA/cuDNN wheels in PYTHON's environment, and $PREFIX/cuda: one toolkit directory of
# links to their files, with the unversioned library names Caffe's CMake (FindCUDA) looks for. The
# build's RPATH points there; a cache hit re-makes the links for this PYTHON's environment (and
# reinstalls the wheels if they went), so the build follows the venv that last linked it.
cuda_wheels() {
  local log="$1" reqs=() pip_src=() d f lib real
  SITE="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  [ -n "${CAFFE_PRUNE_WHEELS:-}" ] && pip_src=(--no-index --find-links "$CAFFE_PRUNE_WHEELS")
  [ "$CUDA_FROM" = wheels ] && reqs+=(-r "$HERE/cuda-wheels.txt")
  [ "$CUDNN_FROM" = wheels ] && reqs+=(-r "$HERE/cudnn-wheels.txt")
  [ ${#reqs[@]} -gt 0 ] || return 0
  mkdir -p "$(dirname "$log")"
  say "the pinned CUDA wheels in $SITE (pip install, a no-op when present)"
  "$PYTHON" -m pip install -q "${pip_src[@]}" "${reqs[@]}" > "$log" 2>&1 \
    || die "pip could not install the CUDA wheels; see $log"
  mkdir -p "$PREFIX/cuda/lib64"
  if [ "$CUDA_FROM" = wheels ]; then
    d="$SITE/nvidia/cu13"
    [ -x "$d/bin/nvcc" ] && [ -x "$d/nvvm/bin/cicc" ] \
      || die "the CUDA wheels are incomplete under $d (need bin/nvcc and nvvm/bin/cicc)"
    for f in bin include nvvm; do ln -sfn "$d/$f" "$PREFIX/cuda/$f"; done
    for f in "$d"/lib/*.so*; do ln -sf "$f" "$PREFIX/cuda/lib64/"; done
    for lib in cudart cublas cublasLt curand; do
      real="$(ls "$d"/lib/lib$lib.so.* | head -n 1)"
      ln -sf "$real" "$PREFIX/cuda/lib64/lib$lib.so"
    done
  fi
  if [ "$CUDNN_FROM" = wheels ]; then
    d="$SITE/nvidia/cudnn"
    [ -f "$d/include/cudnn.h" ] || die "the cuDNN wheel is incomplete under $d"
    for f in "$d"/lib/*.so*; do ln -sf "$f" "$PREFIX/cuda/lib64/"; done
    ln -sf "$(ls "$d"/lib/libcudnn.so.* | head -n 1)" "$PREFIX/cuda/lib64/libcudnn.so"
  fi
}

if [ -f "$STAMP" ]; then
  say "cache hit: $PREFIX (key $KEY), build skipped"
  [ "$CPU_ONLY" = ON ] || cuda_wheels "$PREFIX/pip.log"
  link_into_env
  exit 0
fi

T0=$SECONDS
# --- fetch the source package through a private apt configuration -------------------------------
APT="$CACHE/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$CACHE/downloads"
APT_OPTS=(-o "Dir::Etc::SourceList=$HERE/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o "APT::Sandbox::User=root")
if ! verify "$ORIG_TAR" "$ORIG_SHA256" || ! verify "$DEB_TAR" "$DEB_SHA256"; then
  command -v apt-get >/dev/null || die "caffe=$VERSION is not in $CACHE/downloads and there is no apt-get to fetch it \
(an offline machine: tools/caffe/bundle.sh packs it, offline-build.sh puts it there)"
  say "fetching Debian source package caffe=$VERSION (bullseye)"
  apt-get "${APT_OPTS[@]}" -qq update
  (cd "$CACHE/downloads" && apt-get "${APT_OPTS[@]}" -qq source --download-only "caffe=$VERSION")
fi
verify "$ORIG_TAR" "$ORIG_SHA256" || die "$CACHE/downloads/$ORIG_TAR does not match its pinned sha256; delete it and retry"
verify "$DEB_TAR" "$DEB_SHA256" || die "$CACHE/downloads/$DEB_TAR does not match its pinned sha256; delete it and retry"
# the .dsc must list the same checksums (dpkg-source checks the files against it again)
grep -q " $ORIG_SHA256 " "$CACHE/downloads/caffe_$VERSION.dsc" && grep -q " $DEB_SHA256 " "$CACHE/downloads/caffe_$VERSION.dsc" \
  || die "caffe_$VERSION.dsc does not list the pinned checksums"
T_FETCH=$((SECONDS - T0))

# --- unpack (applies Debian's patches), patch, configure, build, install -------------------------
WORK="$CACHE/work-$KEY"
rm -rf "$WORK" "$PREFIX"
mkdir -p "$WORK"
if command -v dpkg-source >/dev/null; then
  dpkg-source --no-check -x "$CACHE/downloads/caffe_$VERSION.dsc" "$WORK/src" >/dev/null 2>&1 \
    || die "dpkg-source could not unpack caffe_$VERSION.dsc"
else   # no dpkg-dev (a machine without apt): the same tree by hand, Debian's quilt series in order
  mkdir -p "$WORK/src"
  tar xzf "$CACHE/downloads/$ORIG_TAR" -C "$WORK/src" && tar xJf "$CACHE/downloads/$DEB_TAR" -C "$WORK/src" \
    || die "could not unpack $ORIG_TAR and $DEB_TAR"
  while read -r p _; do
    case "$p" in ''|'#'*) continue ;; esac
    patch -s -p1 -d "$WORK/src" < "$WORK/src/debian/patches/$p" || die "Debian's patch $p does not apply"
  done < "$WORK/src/debian/patches/series"
fi
patch -s -p1 -d "$WORK/src" < "$HERE/debian12.patch"
CMAKE_EXTRA=()
RPATH="$PREFIX/lib"
if [ -n "$DEPS" ]; then
  CMAKE_EXTRA+=(-DCMAKE_PREFIX_PATH="$DEPS" -DBOOST_ROOT="$DEPS" -DBoost_NO_SYSTEM_PATHS=ON)
  RPATH="$RPATH;$DEPS/lib"
  export PATH="$DEPS/bin:$PATH"   # protoc
fi
if [ "$CPU_ONLY" = OFF ]; then
  patch -s -p1 -d "$WORK/src" < "$HERE/cuda13.patch" || die "cuda13.patch does not apply"
  cuda_wheels "$WORK/pip.log"
  LINKS="$PREFIX/cuda"
  [ "$CUDA_FROM" = wheels ] && CUDA_ROOT="$LINKS"
  if [ "$CUDNN_FROM" = wheels ]; then
    CUDNN_INC="$SITE/nvidia/cudnn/include"
    CUDNN_LIB="$LINKS/lib64/libcudnn.so"
  elif [ "$CUDNN_FROM" = system ]; then
    CUDNN_LIB="$(ls "$CUDA_ROOT"/lib64/libcudnn.so "$CUDA_ROOT"/lib/libcudnn.so /usr/lib/*/libcudnn.so 2>/dev/null | head -n 1 || true)"
    [ -n "$CUDNN_LIB" ] || die "cudnn_version.h is in $CUDNN_INC but no libcudnn.so was found; or build --no-cudnn"
  fi
  CUDA_VERSION_FOUND="$("$CUDA_ROOT/bin/nvcc" --version | grep -o 'release [0-9.]*' | cut -d' ' -f2)"
  RPATH="$RPATH;$LINKS/lib64;$CUDA_ROOT/lib64"
  [ "$TF32" = ON ] && CMAKE_EXTRA+=(-DCMAKE_CXX_FLAGS=-DCAFFE_PRUNE_ALLOW_TF32)
  CMAKE_EXTRA+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DCUDA_HOST_COMPILER="$SYS_CXX"
                -DCUDA_ARCH_NAME=Manual -DCUDA_ARCH_BIN="$CUDA_ARCH" -DCUDA_ARCH_PTX="$CUDA_PTX" -DUSE_NCCL=OFF)
  [ "$CUDNN" = ON ] && CMAKE_EXTRA+=(-DCUDNN_INCLUDE="$CUDNN_INC" -DCUDNN_LIBRARY="$CUDNN_LIB")
fi
case "$(cmake --version | head -n 1)" in
  *" version "[4-9].*) CMAKE_EXTRA+=(-DCMAKE_POLICY_VERSION_MINIMUM=3.5) ;;   # CMake 4 refuses 2.8.7 otherwise
esac
say "configuring (key $KEY)"
cmake -S "$WORK/src" -B "$WORK/build" -DCMAKE_INSTALL_PREFIX="$PREFIX" \
  -DCPU_ONLY="$CPU_ONLY" -DBLAS=Open -DUSE_OPENCV=ON -DUSE_LMDB=ON -DUSE_LEVELDB=ON -DUSE_HDF5=ON \
  -DUSE_CUDNN="$([ "$CPU_ONLY" = OFF ] && echo "$CUDNN" || echo OFF)" -DBUILD_python=ON -DBUILD_python_layer=ON -DBUILD_docs=OFF -DBUILD_matlab=OFF \
  -DCMAKE_BUILD_TYPE=Release -Dpython_version="$PYVER" \
  -DPYTHON_EXECUTABLE="$PYTHON" -DPYTHON_INCLUDE_DIR="$PYINC" -DPYTHON_LIBRARY="$PYLIB" \
  -DCMAKE_INSTALL_RPATH="$RPATH" -DCMAKE_INSTALL_RPATH_USE_LINK_PATH=ON "${CMAKE_EXTRA[@]}" \
  > "$WORK/configure.log" 2>&1 || die "cmake configure failed; see $WORK/configure.log"
if [ "$CPU_ONLY" = OFF ]; then
  grep -q "CUDA detected" "$WORK/configure.log" || die "CMake did not find CUDA at $CUDA_ROOT; see $WORK/configure.log"
  if [ "$CUDNN" = ON ]; then
    grep -q "Found cuDNN" "$WORK/configure.log" || die "CMake did not find cuDNN ($CUDNN_INC, $CUDNN_LIB); see $WORK/configure.log"
  fi
fi
say "building with make -j$(nproc) (a few minutes; log: $WORK/build.log)"
T1=$SECONDS
make -C "$WORK/build" -j"$(nproc)" > "$WORK/build.log" 2>&1 || die "build failed; see $WORK/build.log (the work tree is kept)"
make -C "$WORK/build" install > "$WORK/install.log" 2>&1 || die "install failed; see $WORK/install.log"
T_BUILD=$((SECONDS - T1))
BLAS_LIB="$(grep -m1 -o 'OpenBLAS_LIB[^ ]*=[^ ]*' "$WORK/build/CMakeCache.txt" | cut -d= -f2 || true)"
cat > "$STAMP" <<JSON
{
  "version": "1.0.0",
  "source": "Debian source package caffe=$VERSION (BVLC master 2018-08-21 + Debian patches) + tools/caffe/debian12.patch",
  "source_sha256": {"$ORIG_TAR": "$ORIG_SHA256", "$DEB_TAR": "$DEB_SHA256"},
  "options": "$OPTIONS",
  "blas": "OpenBLAS ($BLAS_LIB)",
  "python": "$PYVER",
  "numpy_headers": "$NUMPY_MAJOR.x",
  "key": "$KEY",
  "fetch_seconds": $T_FETCH,
  "build_seconds": $T_BUILD
}
JSON
if [ "$CPU_ONLY" = OFF ]; then
  # what doctor reports for the CUDA build (JSON written by Python, merged into the stamp)
  CUDNN_VERSION_FOUND=""
  [ "$CUDNN" = ON ] && CUDNN_VERSION_FOUND="$(grep -E '#define CUDNN_(MAJOR|MINOR|PATCHLEVEL) ' "$CUDNN_INC/cudnn_version.h" | awk '{print $3}' | tr '\n' . | sed 's/\.$//')"
  STAMP="$STAMP" CUDA_ID="$CUDA_ID" CUDA_FROM="$CUDA_FROM" CUDA_ROOT="$CUDA_ROOT" CUDA_V="$CUDA_VERSION_FOUND" \
  CUDNN_V="$CUDNN_VERSION_FOUND" CUDNN_FROM="$CUDNN_FROM" ARCH="$CUDA_ARCH" PTX="$CUDA_PTX" TF32="$TF32" \
  CXX_USED="$SYS_CXX" "$PYTHON" - <<'PY' || die "could not write $STAMP"
import ctypes, ctypes.util, json, os
stamp = os.environ["STAMP"]
info = json.load(open(stamp))
tf32 = os.environ["TF32"] == "ON"
info["source"] += " + tools/caffe/cuda13.patch"
info["cuda"] = {"version": os.environ["CUDA_V"], "from": os.environ["CUDA_FROM"], "root": os.environ["CUDA_ROOT"],
                "identity": os.environ["CUDA_ID"],
                "architectures": ["sm_" + a for a in os.environ["ARCH"].split()] + ["compute_" + os.environ["PTX"]]}
info["cudnn"] = ({"version": os.environ["CUDNN_V"], "from": os.environ["CUDNN_FROM"]}
                 if os.environ["CUDNN_V"] else None)
info["math"] = ("TF32 allowed (--allow-tf32): cuBLAS CUBLAS_TF32_TENSOR_OP_MATH, cuDNN CUDNN_DEFAULT_MATH" if tf32 else
                "fp32-exact: cuBLAS CUBLAS_DEFAULT_MATH, cuDNN CUDNN_FMA_MATH (no TF32)")
info["compiler"] = os.environ["CXX_USED"]
# the GPU of the build machine, when one is usable (driver API: no toolkit needed)
try:
    cu = ctypes.CDLL("libcuda.so.1")
    count = ctypes.c_int()
    if cu.cuInit(0) == 0 and cu.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0:
        name = ctypes.create_string_buffer(256); mem = ctypes.c_size_t(); major = ctypes.c_int(); minor = ctypes.c_int()
        cu.cuDeviceGetName(name, 256, 0); cu.cuDeviceTotalMem_v2(ctypes.byref(mem), 0)
        cu.cuDeviceGetAttribute(ctypes.byref(major), 75, 0); cu.cuDeviceGetAttribute(ctypes.byref(minor), 76, 0)
        info["build_device"] = {"name": name.value.decode(), "memory_gib": round(mem.value / 2**30, 1),
                                "compute_capability": f"{major.value}.{minor.value}", "count": count.value}
except OSError:
    pass
json.dump(info, open(stamp, "w"), indent=2)
PY
fi
rm -rf "$WORK"
say "built in ${T_BUILD}s: $PREFIX"
link_into_env
