#!/usr/bin/env bash
# Installs, from the system's own apt (Debian 12), everything needed to build stock BVLC Caffe
# with Python 3 bindings, OpenCV, LMDB, LevelDB and HDF5, and to run caffe-prune.
# Idempotent: exits at once when every package is already installed.
set -euo pipefail

PACKAGES=(
  # toolchain; Debian's cmake 3.25 (CMake 4 refuses Caffe's old cmake_minimum_required)
  g++ make cmake dpkg-dev ca-certificates
  # Caffe's build dependencies (as in Debian's caffe source package, OpenBLAS as the BLAS)
  libboost-system-dev libboost-thread-dev libboost-filesystem-dev libboost-python-dev
  libprotobuf-dev libprotoc-dev protobuf-compiler libgoogle-glog-dev libgflags-dev
  libhdf5-dev liblmdb-dev libleveldb-dev libsnappy-dev libopenblas-dev
  # OpenCV: Caffe's ImageData reads images through imread; libopencv-dev is the only package that
  # ships OpenCVConfig.cmake, and highgui (which Caffe's io.cpp includes) is what pulls Qt anyway.
  libopencv-dev
  # `caffe-prune graph` draws with Graphviz (through pydot)
  graphviz
  # the interpreter boost-python is built for, with headers and venv
  python3 python3-dev python3-venv
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all ${#PACKAGES[@]} present"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "error: apt-get not found; install these packages with your system's package manager: ${missing[*]}" >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "system packages: installing ${#missing[@]} missing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "system packages: done"
