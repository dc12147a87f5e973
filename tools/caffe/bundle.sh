#!/usr/bin/env bash
# Packs, on a machine that reaches Debian's archive and PyPI, everything the CUDA build of caffe-prune
# needs on a GPU machine that has neither apt nor internet, into one directory (or .tar):
#
#   OUT/project/            this checkout's files (tracked, and untracked ones git does not ignore)
#   OUT/caffe/              Debian's caffe source package, the three files build.sh pins (sha256-checked)
#   OUT/deps-src/           Debian source packages of bundle-deps.txt (glog, gflags, boost, protobuf):
#                           offline-build.sh builds those the machine lacks into a private prefix
#   OUT/wheels/             wheels for the target Python: the project's dependencies, pytest, setuptools,
#                           cmake<4 (for a machine without CMake), the pinned CUDA and cuDNN wheels
#   OUT/offline-build.sh    the one command to run there (a copy of tools/caffe/offline-build.sh)
#   OUT/manifest.json       what was packed, for which Python, from where
#   OUT/MANIFEST.sha256     sha256 of every file above (`sha256sum -c MANIFEST.sha256`)
#
#   tools/caffe/bundle.sh OUT [--python X.Y] [--no-cudnn] [--tar] [--dry-run]
#
#   --python X.Y   the GPU machine's python3 (default 3.12, Ubuntu 24.04's); wheels are fetched for it
#   --no-cudnn     leave the cuDNN wheel out (then build there with --no-cudnn)
#   --tar          also write OUT.tar (uncompressed: the wheels are compressed already)
#   --dry-run      list what would be packed, download nothing
#
# There: copy OUT (or OUT.tar) over, then `bash OUT/offline-build.sh` (see that script's header).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
USAGE="usage: bundle.sh OUT [--python X.Y] [--no-cudnn] [--tar] [--dry-run]"
OUT="${1:?$USAGE}"
shift
TARGET_PY=3.12; CUDNN=ON; TAR=OFF; DRY=OFF
while [ $# -gt 0 ]; do
  case "$1" in
    --python) [ $# -ge 2 ] || { echo "bundle: error: --python needs X.Y" >&2; exit 2; }; TARGET_PY="$2"; shift ;;
    --no-cudnn) CUDNN=OFF ;;
    --tar) TAR=ON ;;
    --dry-run) DRY=ON ;;
    *) echo "bundle: error: unknown option $1; $USAGE" >&2; exit 2 ;;
  esac
  shift
done
echo "$TARGET_PY" | grep -Eq '^3\.[0-9]+$' || { echo "bundle: error: --python $TARGET_PY: give X.Y, e.g. 3.12" >&2; exit 2; }
say() { echo "bundle: $*"; }
die() { echo "bundle: error: $*" >&2; exit 1; }

CACHE="${CAFFE_PRUNE_CACHE:-$HOME/.cache/caffe-prune}"
# the caffe source package: the same pins as build.sh (read from it, so they cannot drift)
pin() { grep -m1 -E "^$1=" "$HERE/build.sh" | cut -d'"' -f2; }
VERSION="$(pin VERSION)"; ORIG_SHA256="$(pin ORIG_SHA256)"; DEB_SHA256="$(pin DEB_SHA256)"
ORIG_TAR="caffe_1.0.0+git20180821.99bd997.orig.tar.gz"
DEB_TAR="caffe_${VERSION}.debian.tar.xz"
DSC="caffe_${VERSION}.dsc"
DEPS=($(grep -Ev '^\s*(#|$)' "$HERE/bundle-deps.txt"))
REQS=(-r "$HERE/cuda-wheels.txt")
[ "$CUDNN" = ON ] && REQS+=(-r "$HERE/cudnn-wheels.txt")
# the project's runtime and test dependencies (pyproject.toml), numpy >= 2 as make setup installs it
PROJECT_DEPS=("numpy>=2" "setuptools>=64" wheel pytest "cmake>=3.16,<4")
PROJECT_DEPS+=($(python3 - "$REPO/pyproject.toml" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
for line in block.splitlines():
    m = re.match(r'\s*"([^"]+)"', line)
    if m and not m.group(1).startswith("numpy"):
        print(m.group(1).replace(" ", ""))
PY
))

if [ "$DRY" = ON ]; then
  say "dry run: nothing is downloaded or written"
  say "into $OUT$([ "$TAR" = ON ] && echo " and $OUT.tar"), for Python $TARGET_PY on x86_64 Linux"
  say "project: $(git -C "$REPO" ls-files -co --exclude-standard | wc -l) files of $REPO"
  say "caffe: $DSC, $ORIG_TAR (sha256 $ORIG_SHA256), $DEB_TAR (sha256 $DEB_SHA256)"
  say "deps-src (Debian source packages via $HERE/bundle-sources.list): ${DEPS[*]}"
  files=("$HERE/cuda-wheels.txt"); [ "$CUDNN" = ON ] && files+=("$HERE/cudnn-wheels.txt")
  say "wheels: ${PROJECT_DEPS[*]} $(grep -hEv '^\s*(#|$)' "${files[@]}" | tr '\n' ' ')"
  exit 0
fi

command -v apt-get >/dev/null || die "apt-get is needed here to fetch Debian's source packages"
command -v bison >/dev/null || die "bison is needed here (apt-get install bison): Debian's boost source leaves out \
b2's generated parser, which bundle.sh generates as Debian's own build does"
[ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ] && die "$OUT exists and is not empty; give a new directory"
mkdir -p "$OUT"/{project,caffe,deps-src,wheels}
OUT="$(cd "$OUT" && pwd)"

# --- the project -------------------------------------------------------------------------------
say "project files from $REPO"
(cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 tar cf - --no-recursion) | tar xf - -C "$OUT/project"

# --- Debian source packages through a private apt configuration ---------------------------------
verify() { echo "$2  $1" | sha256sum --check --status 2>/dev/null; }
if ! verify "$CACHE/downloads/$ORIG_TAR" "$ORIG_SHA256" || ! verify "$CACHE/downloads/$DEB_TAR" "$DEB_SHA256" \
   || [ ! -f "$CACHE/downloads/$DSC" ]; then
  say "the Caffe source is not in $CACHE/downloads: fetching it as build.sh does"
  APT="$CACHE/apt"
  mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$CACHE/downloads"
  A=(-o "Dir::Etc::SourceList=$HERE/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
     -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o "APT::Sandbox::User=root")
  apt-get "${A[@]}" -qq update
  (cd "$CACHE/downloads" && apt-get "${A[@]}" -qq source --download-only "caffe=$VERSION")
fi
verify "$CACHE/downloads/$ORIG_TAR" "$ORIG_SHA256" && verify "$CACHE/downloads/$DEB_TAR" "$DEB_SHA256" \
  || die "the Caffe source in $CACHE/downloads does not match build.sh's pinned sha256"
cp "$CACHE/downloads/$DSC" "$CACHE/downloads/$ORIG_TAR" "$CACHE/downloads/$DEB_TAR" "$OUT/caffe/"

say "Debian source packages: ${DEPS[*]}"
APTB="$CACHE/apt-bundle"
mkdir -p "$APTB/lists/partial" "$APTB/cache/archives/partial"
B=(-o "Dir::Etc::SourceList=$HERE/bundle-sources.list" -o "Dir::Etc::SourceParts=/dev/null"
   -o "Dir::State::Lists=$APTB/lists" -o "Dir::Cache=$APTB/cache" -o "APT::Sandbox::User=root")
apt-get "${B[@]}" -qq update
(cd "$OUT/deps-src" && apt-get "${B[@]}" -qq source --download-only "${DEPS[@]}") \
  || die "apt-get source ${DEPS[*]} failed"
# each .dsc lists its files' sha256: check them here (dpkg-source is not needed there)
for dsc in "$OUT"/deps-src/*.dsc; do
  awk '/^Checksums-Sha256:/{f=1;next} /^[^ ]/{f=0} f&&NF==3{print $1"  "$3}' "$dsc" \
    | (cd "$OUT/deps-src" && sha256sum --check --quiet) || die "$(basename "$dsc"): a file does not match its sha256"
done

# Debian's boost source drops tools/build/src/engine/jamgram.{cpp,hpp} (bison output); generate them as
# debian/rules does, so the machine there needs no bison: deps-src/boost-b2-jamgram.tar.gz
BOOST_ORIG="$(ls "$OUT"/deps-src/boost1.*_*.orig.tar.* 2>/dev/null | head -n 1 || true)"
if [ -n "$BOOST_ORIG" ]; then
  GEN="$(mktemp -d)"
  tar xf "$BOOST_ORIG" -C "$GEN" --wildcards '*/tools/build/src/engine/jamgram.y'
  ENGINE="$(dirname "$(find "$GEN" -name jamgram.y | head -n 1)")"
  (cd "$ENGINE/../.." && bison -y -d -o src/engine/jamgram.cpp src/engine/jamgram.y) || die "bison failed on jamgram.y"
  (cd "$ENGINE/../../../.." && tar czf "$OUT/deps-src/boost-b2-jamgram.tar.gz" \
     tools/build/src/engine/jamgram.cpp tools/build/src/engine/jamgram.hpp)
  rm -rf "$GEN"
fi

# --- wheels for the target Python ----------------------------------------------------------------
say "wheels for Python $TARGET_PY (project dependencies, CUDA$([ "$CUDNN" = ON ] && echo ", cuDNN"))"
python3 -m pip download -q -d "$OUT/wheels" --only-binary=:all: --python-version "$TARGET_PY" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform linux_x86_64 --platform any \
  "${PROJECT_DEPS[@]}" "${REQS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
ls "$OUT"/wheels/nvidia_cuda_nvcc-*.whl >/dev/null 2>&1 || die "pip download did not fetch the CUDA wheels"

# --- the script to run there, manifest, checksums -------------------------------------------------
cp "$HERE/offline-build.sh" "$OUT/offline-build.sh"
python3 - "$OUT" "$TARGET_PY" "$CUDNN" "$VERSION" "${DEPS[@]}" <<'PY'
import json, os, sys, datetime
out, pyver, cudnn, version, deps = sys.argv[1], sys.argv[2], sys.argv[3] == "ON", sys.argv[4], sys.argv[5:]
listing = lambda d: sorted(os.listdir(os.path.join(out, d)))
json.dump({"made": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": pyver, "cudnn": cudnn, "caffe": f"caffe={version}", "caffe_files": listing("caffe"),
           "deps": deps, "deps_files": listing("deps-src"), "wheels": listing("wheels"),
           "run": "bash offline-build.sh [--dry-run] (in this directory, with the machine's own python3, gcc, make)"},
          open(os.path.join(out, "manifest.json"), "w"), indent=2)
PY
(cd "$OUT" && find . -type f ! -name MANIFEST.sha256 -printf '%P\n' | LC_ALL=C sort | xargs -d '\n' sha256sum > MANIFEST.sha256)
say "$(wc -l < "$OUT/MANIFEST.sha256") files, $(du -sh "$OUT" | cut -f1) in $OUT"
if [ "$TAR" = ON ]; then
  tar cf "$OUT.tar" -C "$(dirname "$OUT")" "$(basename "$OUT")"
  say "$OUT.tar ($(du -sh "$OUT.tar" | cut -f1)); sha256 $(sha256sum "$OUT.tar" | cut -c1-64)"
fi
say "there: bash $(basename "$OUT")/offline-build.sh --dry-run, then without --dry-run"
