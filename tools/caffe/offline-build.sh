#!/usr/bin/env bash
# Builds caffe-prune's CUDA Caffe on a GPU machine that has neither apt nor internet, from a bundle
# made by tools/caffe/bundle.sh (this script is copied to the bundle's top directory). One command:
#
#   bash BUNDLE/offline-build.sh [--dry-run] [--python PYTHON3] [--no-cudnn] [--allow-tf32]
#                                [--cuda-arch "80 90"] [--jobs N] [--no-cpu]
#                                [--force-deps "gflags google-glog boost protobuf"] [--deps-only]
#
# It checks the bundle against MANIFEST.sha256, finds what the machine has and lacks, builds the
# lacking glog / gflags / boost (python, system, thread, filesystem) / protobuf from the bundled
# Debian sources into BUNDLE/deps, creates BUNDLE/project/.venv from the machine's python3 with the
# bundled wheels (CUDA and cuDNN included), then runs tools/caffe/build.sh there: the CPU build
# (what the GPU tests compare with; --no-cpu skips it) and the CUDA build, which the venv then uses.
# Always with the system compiler (/usr/bin/gcc, g++): an exported CC/CXX toolchain that links
# libstdc++ statically makes pycaffe crash inside glog, so CC and CXX are ignored.
#   --dry-run    verify the bundle and list what would be built, build nothing
#   --force-deps build these bundled libraries even where the machine has them; --deps-only: stop
#                after building the libraries (both also serve to try the recipes on any machine)
# Needs on the machine: gcc/g++, make, python3 with its headers (Python.h) and libpython3.X.so,
# tar/xz/patch, and the libraries Caffe links that are not bundled: HDF5, LMDB, LevelDB, Snappy,
# OpenBLAS, OpenCV (the dry run says which are missing). CMake comes from the bundle when absent.
set -euo pipefail

BUNDLE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROJECT="$BUNDLE/project"
DEPS="$BUNDLE/deps"
WORK="$BUNDLE/work"
DRY=OFF; SYSPY=""; CPU=ON; JOBS="$(nproc)"; GPU_FLAGS=(); FORCE=""; DEPS_ONLY=OFF
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=ON ;;
    --python) SYSPY="$2"; shift ;;
    --no-cudnn|--allow-tf32) GPU_FLAGS+=("$1") ;;
    --cuda-arch) GPU_FLAGS+=("$1" "$2"); shift ;;
    --jobs) JOBS="$2"; shift ;;
    --no-cpu) CPU=OFF ;;
    --force-deps) FORCE="$2"; shift ;;
    --deps-only) DEPS_ONLY=ON ;;
    *) echo "offline-build: error: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
say() { echo "offline-build: $*"; }
die() { echo "offline-build: error: $*" >&2; exit 1; }
unset CC CXX CFLAGS CXXFLAGS LDFLAGS CPATH LIBRARY_PATH
export CC=/usr/bin/gcc CXX=/usr/bin/g++

# --- the bundle is whole -------------------------------------------------------------------------
[ -f "$BUNDLE/MANIFEST.sha256" ] && [ -f "$BUNDLE/manifest.json" ] || die "$BUNDLE is not a bundle (no MANIFEST.sha256)"
(cd "$BUNDLE" && sha256sum --check --quiet MANIFEST.sha256) || die "the bundle does not match MANIFEST.sha256: copy it again"
say "bundle verified: $(wc -l < "$BUNDLE/MANIFEST.sha256") files match MANIFEST.sha256"
WANT_PY="$(sed -n 's/.*"python": "\([0-9.]*\)".*/\1/p' "$BUNDLE/manifest.json")"

# --- what the machine has ------------------------------------------------------------------------
MISSING=(); BUILD=()
have() { command -v "$1" >/dev/null 2>&1; }
any() { local f; for f in "$@"; do [ -e "$f" ] && return 0; done; return 1; }
lib() { any /usr/lib/*/"$1" /usr/lib/"$1" /usr/lib64/"$1" /usr/local/lib/"$1" "$DEPS/lib/$1"; }
hdr() { any /usr/include/"$1" /usr/include/*/"$1" /usr/local/include/"$1" "$DEPS/include/$1"; }
for tool in /usr/bin/gcc /usr/bin/g++ make tar xz patch sha256sum; do have "$tool" || MISSING+=("$tool"); done
# the distribution's interpreter first (its headers and libpython are what Caffe links)
[ -n "$SYSPY" ] || SYSPY="$(ls /usr/bin/python"$WANT_PY" 2>/dev/null || command -v "python$WANT_PY" || command -v python3 || true)"
[ -n "$SYSPY" ] || MISSING+=("python$WANT_PY")
if [ -n "$SYSPY" ]; then
  PYVER="$("$SYSPY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  [ "$PYVER" = "$WANT_PY" ] || die "the bundle's wheels are for Python $WANT_PY, $SYSPY is $PYVER: make the bundle with --python $PYVER"
  PYINC="$("$SYSPY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
  [ -f "$PYINC/Python.h" ] || MISSING+=("Python.h (python$PYVER headers)")
  any /usr/lib/*/libpython"$PYVER".so /usr/lib/libpython"$PYVER".so || MISSING+=("libpython$PYVER.so")
  "$SYSPY" -c 'import venv, ensurepip' 2>/dev/null || MISSING+=("python$PYVER venv/ensurepip")
fi
{ lib libhdf5.so || any /usr/lib/*/hdf5/serial/libhdf5.so; } \
  && { hdr hdf5.h || hdr hdf5/serial/hdf5.h; } || MISSING+=("HDF5 (libhdf5.so, hdf5.h: libhdf5-dev)")
lib liblmdb.so && hdr lmdb.h || MISSING+=("LMDB (liblmdb.so, lmdb.h: liblmdb-dev)")
lib libleveldb.so && hdr leveldb/db.h || MISSING+=("LevelDB (libleveldb.so, leveldb/db.h: libleveldb-dev)")
lib libsnappy.so && hdr snappy.h || MISSING+=("Snappy (libsnappy.so, snappy.h: libsnappy-dev)")
{ lib libopenblas.so || any /usr/lib/*/openblas*/libopenblas.so; } && { hdr cblas.h || hdr openblas/cblas.h; } \
  || MISSING+=("OpenBLAS (libopenblas.so, cblas.h: libopenblas-dev)")
any /usr/lib/*/cmake/opencv4/OpenCVConfig.cmake /usr/share/OpenCV/OpenCVConfig.cmake /usr/local/lib/cmake/opencv4/OpenCVConfig.cmake \
  || MISSING+=("OpenCV (OpenCVConfig.cmake: libopencv-dev)")
# in dependency order; names as in the bundle's deps-src (Debian source packages)
lib libgflags.so && hdr gflags/gflags.h && [[ " $FORCE " != *" gflags "* ]] || BUILD+=(gflags)
lib libglog.so && hdr glog/logging.h && [[ " $FORCE " != *" google-glog "* ]] || BUILD+=(google-glog)
{ lib libprotobuf.so && hdr google/protobuf/message.h && have protoc; } && [[ " $FORCE " != *" protobuf "* ]] \
  || BUILD+=(protobuf)
[ -n "${PYVER:-}" ] && { lib "libboost_python${PYVER/./}.so" && lib libboost_system.so && lib libboost_thread.so \
  && lib libboost_filesystem.so && hdr boost/version.hpp; } && [[ " $FORCE " != *" boost "* ]] || BUILD+=(boost)
CMAKE_FROM=system; have cmake || CMAKE_FROM="bundled wheel (cmake<4, into the venv)"

say "python: ${SYSPY:-none} (${PYVER:-?}); cmake: $CMAKE_FROM; jobs: $JOBS; compiler: $CC / $CXX"
say "libraries to build from deps-src into $DEPS: ${BUILD[*]:-none}"
[ ${#MISSING[@]} -eq 0 ] || say "missing on this machine (not in the bundle): ${MISSING[*]}"
say "then: venv $PROJECT/.venv from the bundled wheels; tools/caffe/build.sh$([ "$CPU" = ON ] && echo " (CPU), then") --gpu ${GPU_FLAGS[*]:-}"
if [ "$DRY" = ON ]; then
  say "dry run: nothing built"
  [ ${#MISSING[@]} -eq 0 ] || exit 1
  exit 0
fi
[ ${#MISSING[@]} -eq 0 ] || die "install the missing pieces above first (the bundle does not carry them)"

# --- libraries from Debian's source packages -----------------------------------------------------
mkdir -p "$WORK" "$DEPS"
orig_of() { ls "$BUNDLE"/deps-src/"$1"_*.orig.tar.* "$BUNDLE"/deps-src/"$1"1.*_*.orig.tar.* 2>/dev/null | head -n 1; }
unpack() {   # unpack the orig tarball of source package $1 (boost: boost1.NN) into $WORK/$1, print the directory
  local orig dir
  orig="$(orig_of "$1")"
  [ -n "$orig" ] || die "the bundle has no source of $1 in deps-src/"
  rm -rf "$WORK/$1" && mkdir -p "$WORK/$1"
  tar xf "$orig" -C "$WORK/$1"
  dir="$(find "$WORK/$1" -mindepth 1 -maxdepth 1 -type d | head -n 1)"
  echo "${dir:-$WORK/$1}"
}
export PATH="$DEPS/bin:$PATH"
if [ "$CMAKE_FROM" != system ]; then   # CMake from its wheel, before the project's venv exists
  "$SYSPY" -m venv "$WORK/cmake-venv"
  "$WORK/cmake-venv/bin/pip" install -q --no-index --find-links "$BUNDLE/wheels" "cmake<4"
  export PATH="$WORK/cmake-venv/bin:$PATH"
fi
CM=(-DCMAKE_INSTALL_PREFIX="$DEPS" -DCMAKE_PREFIX_PATH="$DEPS" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON
    -DCMAKE_INSTALL_LIBDIR=lib -DCMAKE_INSTALL_RPATH="$DEPS/lib" -DCMAKE_POSITION_INDEPENDENT_CODE=ON -DBUILD_TESTING=OFF)
for dep in "${BUILD[@]}"; do
  T0=$SECONDS
  src="$(unpack "$dep")"
  log="$WORK/$dep.log"
  say "building $dep from $(basename "$(orig_of "$dep")") (log $log)"
  case "$dep" in
    gflags)
      { cmake -S "$src" -B "$src/build" "${CM[@]}" -DBUILD_STATIC_LIBS=OFF && make -C "$src/build" -j"$JOBS" install; } > "$log" 2>&1 ;;
    google-glog)
      { cmake -S "$src" -B "$src/build" "${CM[@]}" -DWITH_GFLAGS=ON -DWITH_GTEST=OFF -DWITH_UNWIND=OFF \
          && make -C "$src/build" -j"$JOBS" install; } > "$log" 2>&1 ;;
    protobuf)
      top="$src"; [ -f "$src/CMakeLists.txt" ] || top="$src/cmake"
      { cmake -S "$top" -B "$src/build" "${CM[@]}" -Dprotobuf_BUILD_TESTS=OFF -Dprotobuf_BUILD_SHARED_LIBS=ON \
          -Dprotobuf_WITH_ZLIB=OFF && make -C "$src/build" -j"$JOBS" install; } > "$log" 2>&1 ;;
    boost)   # b2's parser, generated by bundle.sh with bison as debian/rules does
      { tar xzf "$BUNDLE/deps-src/boost-b2-jamgram.tar.gz" -C "$src" && cd "$src" && ./bootstrap.sh --with-libraries=python,system,thread,filesystem --with-python="$SYSPY" \
          --with-python-version="$PYVER" --prefix="$DEPS" \
          && ./b2 -j"$JOBS" -q variant=release link=shared threading=multi runtime-link=shared \
               python="$PYVER" cxxflags=-fPIC install; } > "$log" 2>&1 ;;
  esac || die "$dep did not build; see $log"
  say "$dep built in $((SECONDS - T0))s"
done
cd "$BUNDLE"
if [ "$DEPS_ONLY" = ON ]; then say "libraries in $DEPS; stopping there (--deps-only)"; exit 0; fi

# --- the project's venv ---------------------------------------------------------------------------
VPY="$PROJECT/.venv/bin/python"
if [ ! -x "$VPY" ]; then
  "$SYSPY" -m venv "$PROJECT/.venv"
fi
say "installing the project and its dependencies into $PROJECT/.venv from the bundled wheels"
"$VPY" -m pip install -q --no-index --find-links "$BUNDLE/wheels" "numpy>=2" -e "$PROJECT[test]"
[ "$CMAKE_FROM" = system ] || "$VPY" -m pip install -q --no-index --find-links "$BUNDLE/wheels" "cmake<4"
export PATH="$PROJECT/.venv/bin:$PATH"

# --- Caffe: the source where build.sh looks for it, then the builds ------------------------------
CACHE="${CAFFE_PRUNE_CACHE:-$HOME/.cache/caffe-prune}"
mkdir -p "$CACHE/downloads"
cp "$BUNDLE"/caffe/* "$CACHE/downloads/"
export CAFFE_PRUNE_WHEELS="$BUNDLE/wheels"
[ ${#BUILD[@]} -eq 0 ] || export CAFFE_PRUNE_DEPS="$DEPS"
cd "$PROJECT"
T0=$SECONDS
[ "$CPU" = OFF ] || bash tools/caffe/build.sh "$VPY"
bash tools/caffe/build.sh "$VPY" --gpu "${GPU_FLAGS[@]}"
say "Caffe built in $((SECONDS - T0))s; the venv uses the CUDA build"
say "next, in $PROJECT:"
[ ${#BUILD[@]} -eq 0 ] || say "  export CAFFE_PRUNE_DEPS=$DEPS   # the builds' cache keys include it"
say "  .venv/bin/python -m caffe_prune doctor"
say "  .venv/bin/python -m pytest -q -m gpu tests/test_gpu_build.py"
