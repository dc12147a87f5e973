#!/usr/bin/env bash
# Builds stock BVLC Caffe (Debian's source package caffe 1.0.0+git20180821.99bd997-8, i.e. upstream
# master of 2018-08-21 plus Debian's patches, plus tools/caffe/debian12.patch) with Python bindings
# for the given interpreter, into a cache directory keyed by a hash of everything that shapes the
# build, then points that interpreter's environment at it with a .pth file.
#
#   tools/caffe/build.sh PYTHON [--gpu]
#
# Environment: CAFFE_PRUNE_CACHE (default ~/.cache/caffe-prune) holds builds and the private apt state.
# Never touches /etc/apt: the bullseye deb-src line lives in tools/caffe/sources.list.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${1:?usage: build.sh PYTHON [--gpu]}"
CPU_ONLY=ON
[ "${2:-}" = "--gpu" ] && CPU_ONLY=OFF   # CUDA build: switch kept clean, made to work in a later issue

VERSION="1.0.0+git20180821.99bd997-8"
# Pinned sha256 of the source package's files (from its signed .dsc); a download must match them.
ORIG_TAR="caffe_1.0.0+git20180821.99bd997.orig.tar.gz"
ORIG_SHA256="e0eb3f06794f7402c77b7dec8e8480273ee1a1bb192e9122b621a69d4147ad0c"
DEB_TAR="caffe_${VERSION}.debian.tar.xz"
DEB_SHA256="07cf073227494a6b07234e40cb5df91db566616593eef9baafdc4d06ad159f21"

CACHE="${CAFFE_PRUNE_CACHE:-$HOME/.cache/caffe-prune}"
say() { echo "caffe: $*"; }
die() { echo "caffe: error: $*" >&2; exit 1; }

# --- the interpreter must be the one Debian's boost-python was built for -------------------------
PYVER="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
  || die "cannot run $PYTHON"
BOOST_PY="$(ls /usr/lib/*/libboost_python3*.so 2>/dev/null | head -n 1 || true)"
[ -n "$BOOST_PY" ] || die "boost-python not found; run tools/install-system-deps.sh"
BOOST_PYVER="$(basename "$BOOST_PY" .so | sed -E 's/libboost_python3([0-9]+)/3.\1/')"
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
KEY="$( { echo "$ORIG_SHA256 $DEB_SHA256"; cat "$HERE/debian12.patch"; echo "$OPTIONS";
          echo "python $PYVER numpy $NUMPY_MAJOR"; } | sha256sum | cut -c1-16)"
PREFIX="$CACHE/caffe-$KEY"
STAMP="$PREFIX/build-info.json"

link_into_env() {
  local site
  site="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # Debian's cmake-fix-python-module-installdir patch installs the module under lib/python3/dist-packages
  echo "$PREFIX/lib/python3/dist-packages" > "$site/caffe-prune-pycaffe.pth"
  say "pycaffe linked into $site (caffe-prune-pycaffe.pth)"
}

if [ -f "$STAMP" ]; then
  say "cache hit: $PREFIX (key $KEY), build skipped"
  link_into_env
  exit 0
fi

T0=$SECONDS
# --- fetch the source package through a private apt configuration -------------------------------
APT="$CACHE/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$CACHE/downloads"
APT_OPTS=(-o "Dir::Etc::SourceList=$HERE/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
          -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o "APT::Sandbox::User=root")
verify() { echo "$2  $CACHE/downloads/$1" | sha256sum --check --status 2>/dev/null; }
if ! verify "$ORIG_TAR" "$ORIG_SHA256" || ! verify "$DEB_TAR" "$DEB_SHA256"; then
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
dpkg-source --no-check -x "$CACHE/downloads/caffe_$VERSION.dsc" "$WORK/src" >/dev/null 2>&1 \
  || die "dpkg-source could not unpack caffe_$VERSION.dsc"
patch -s -p1 -d "$WORK/src" < "$HERE/debian12.patch"
say "configuring (key $KEY)"
cmake -S "$WORK/src" -B "$WORK/build" -DCMAKE_INSTALL_PREFIX="$PREFIX" \
  -DCPU_ONLY="$CPU_ONLY" -DBLAS=Open -DUSE_OPENCV=ON -DUSE_LMDB=ON -DUSE_LEVELDB=ON -DUSE_HDF5=ON \
  -DUSE_CUDNN=OFF -DBUILD_python=ON -DBUILD_python_layer=ON -DBUILD_docs=OFF -DBUILD_matlab=OFF \
  -DCMAKE_BUILD_TYPE=Release -Dpython_version="$PYVER" \
  -DPYTHON_EXECUTABLE="$PYTHON" -DPYTHON_INCLUDE_DIR="$PYINC" -DPYTHON_LIBRARY="$PYLIB" \
  -DCMAKE_INSTALL_RPATH="$PREFIX/lib" -DCMAKE_INSTALL_RPATH_USE_LINK_PATH=ON \
  > "$WORK/configure.log" 2>&1 || die "cmake configure failed; see $WORK/configure.log"
say "building with make -j$(nproc) (a few minutes; log: $WORK/build.log)"
T1=$SECONDS
make -C "$WORK/build" -j"$(nproc)" > "$WORK/build.log" 2>&1 || die "build failed; see $WORK/build.log"
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
rm -rf "$WORK"
say "built in ${T_BUILD}s: $PREFIX"
link_into_env
