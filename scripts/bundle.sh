#!/usr/bin/env bash
# make bundle: one tarball to install agent-tracer on air-gapped nodes of a
# named Debian/Ubuntu release, with no registry reachable there:
#
#   scripts/bundle.sh DISTRO [OUTDIR]      e.g. scripts/bundle.sh bookworm out
#
#   agent-tracer-bundle-VERSION-DISTRO-ARCH/
#     debs/       the distro's bcc (python3-bpfcc, libbpfcc, LLVM/clang libs),
#                 bpftool, iproute2, kmod, python3-venv/pip, the generic kernel
#                 headers (linux-headers-ARCH + its -common), and every
#                 dependency of those that is not part of a base system
#                 (Priority required or important)
#     wheels/     the tracer's wheel and its Python dependencies as wheels
#     install.sh  scripts/install.sh (run it as: install.sh --offline THIS.tar.gz)
#     manifest.json
#
# It runs apt-get download and pip download here, so it must run on (or in a
# container of) DISTRO itself with the same CPU architecture and Python minor
# version as the nodes; it refuses another release.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[bundle] %s\n' "$*"; }
die() { printf '[bundle] ERROR: %s\n' "$*" >&2; exit 1; }

DISTRO=${1:?usage: scripts/bundle.sh DISTRO [OUTDIR]}
OUT=${2:-out}
have=$(. /etc/os-release; echo "${VERSION_CODENAME:-unknown}")
[ "$DISTRO" = "$have" ] || die "this machine runs $have, not $DISTRO: run make bundle on a $DISTRO machine or container"
ARCH=$(dpkg --print-architecture)
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || die "$PY not found: run scripts/install.sh first"
DIST=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["name"])')
VERSION=$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$DIST")
PYVER=$(/usr/bin/python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
NAME=agent-tracer-bundle-$VERSION-$DISTRO-$ARCH
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
B=$STAGE/$NAME
mkdir -p "$B/debs" "$B/wheels" "$OUT"

ROOTS=(python3-bpfcc bpftool iproute2 kmod python3-venv python3-pip "linux-headers-$ARCH")
log "resolving the dependencies of ${ROOTS[*]}"
mapfile -t all < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
  --no-replaces --no-enhances "${ROOTS[@]}" 2>/dev/null | grep -E '^[a-z0-9]' | sed 's/:.*//' | sort -u)
pkgs=()
for p in "${all[@]}"; do
  info=$(apt-cache show --no-all-versions "$p" 2>/dev/null) || continue  # virtual packages
  prio=$(printf '%s\n' "$info" | sed -n 's/^Priority: //p' | head -n1)
  ess=$(printf '%s\n' "$info" | sed -n 's/^Essential: //p' | head -n1)
  case "$prio" in required|important) continue ;; esac
  [ "$ess" = yes ] && continue
  pkgs+=("$p")
done
log "downloading ${#pkgs[@]} .debs"
(cd "$B/debs" && apt-get download -q "${pkgs[@]}" >/dev/null)

log "building the wheel and downloading the Python dependencies for Python $PYVER"
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$B/wheels" .
"$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version "$PYVER" -d "$B/wheels" \
  "$B"/wheels/*.whl
cp scripts/install.sh "$B/install.sh"
chmod +x "$B/install.sh"
"$PY" - "$B" "$DISTRO" "$ARCH" "$VERSION" "$DIST" "$PYVER" <<'EOF'
import json, os, sys
b, distro, arch, version, dist, pyver = sys.argv[1:]
json.dump({"distro": distro, "arch": arch, "version": version, "distribution": dist, "python": pyver,
           "debs": sorted(os.listdir(os.path.join(b, "debs"))), "wheels": sorted(os.listdir(os.path.join(b, "wheels")))},
          open(os.path.join(b, "manifest.json"), "w"), indent=1)
EOF
tar -czf "$OUT/$NAME.tar.gz" -C "$STAGE" "$NAME"
log "wrote $OUT/$NAME.tar.gz ($(du -h "$OUT/$NAME.tar.gz" | cut -f1), $(ls "$B/debs" | wc -l) debs, $(ls "$B/wheels" | wc -l) wheels)"
