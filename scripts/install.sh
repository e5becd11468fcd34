#!/usr/bin/env bash
# Idempotent installer for Debian/Ubuntu. Run as root.
#
#   scripts/install.sh                    what the tracer needs (production)
#   scripts/install.sh --test             + the tools the tests and the benchmark drive (make test)
#   scripts/install.sh --offline BUNDLE   from a bundle made by `make bundle`, no registry reached
#   --venv DIR                            the venv to make (default: .venv in a checkout,
#                                         /opt/agent-tracer/venv with --offline)
#
# Installs:
#   - the distro's bcc (python3-bpfcc) and bpftool
#   - a kernel header tree bcc can use: the running kernel's headers when the
#     distro has them, else the distro's generic headers linked into
#     /lib/modules/$(uname -r)/{build,source}
#   - tracefs mounted at /sys/kernel/tracing
#   - a venv made from /usr/bin/python3 --system-site-packages (so the distro's
#     bcc is importable) with the tracer installed: editable from a checkout,
#     from the bundle's wheels with --offline
#   - with --test: openssh, socat, ncat, autossh, sshuttle, tmux, bpftrace,
#     auditd, gcc, make, git, curl, prometheus (promtool), systemd
#     (systemd-analyze; only when installing it removes nothing), kubectl
#     (kubernetes-client, when there is none), and the package's [test] extras.
# AGENT_TRACER_TEST_TOOLS=1 is the same as --test.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

TEST=${AGENT_TRACER_TEST_TOOLS:-0}
OFFLINE=""
VENV=""
while [ $# -gt 0 ]; do
  case "$1" in
    --test) TEST=1 ;;
    --offline) OFFLINE=${2:?--offline needs a bundle path}; shift ;;
    --venv) VENV=${2:?--venv needs a directory}; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done

[ "$(id -u)" = 0 ] || die "run as root (the tracer loads BPF programs)"
command -v dpkg >/dev/null || die "dpkg not found: this script supports Debian and Ubuntu"

export DEBIAN_FRONTEND=noninteractive
KREL=$(uname -r)
ARCH=$(dpkg --print-architecture)
RUNTIME_PKGS=(python3-bpfcc python3-venv python3-pip bpftool iproute2 kmod)
TEST_PKGS=(openssh-server openssh-client socat ncat autossh sshuttle tmux bpftrace auditd gcc make git curl rsync httpie wget jq sqlite3 bind9-dnsutils prometheus)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
hdr_ok() { [ -e "/lib/modules/$KREL/build/include/linux/kconfig.h" ] || [ -e "/lib/modules/$KREL/build/include/generated/autoconf.h" ]; }

link_generic_headers() {
  local gen common
  gen=$(ls -d /usr/src/linux-headers-*-"$ARCH" 2>/dev/null | sort -V | tail -n1)
  [ -d "$gen" ] || die "no /usr/src/linux-headers-*-$ARCH found"
  common=${gen%-"$ARCH"}-common
  mkdir -p "/lib/modules/$KREL"
  ln -sfn "$gen" "/lib/modules/$KREL/build"
  if [ -d "$common" ]; then ln -sfn "$common" "/lib/modules/$KREL/source"; else ln -sfn "$gen" "/lib/modules/$KREL/source"; fi
  log "kernel headers: the distro has none for $KREL; using the generic $(basename "$gen") headers"
  log "  linked /lib/modules/$KREL/build -> $gen (safe: our BPF code reads no kernel-internal structs)"
}

mount_tracefs() {
  if [ ! -e /sys/kernel/tracing/events ]; then
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null && log "mounted tracefs at /sys/kernel/tracing" \
      || log "WARNING: could not mount tracefs; the tracer will try again at start"
  fi
}

make_venv() {  # $1: venv dir
  if [ ! -x "$1/bin/python" ] || ! "$1/bin/python" -c 'import bcc' 2>/dev/null; then
    log "creating $1 from /usr/bin/python3 --system-site-packages (sees the distro's bcc)"
    rm -rf "$1"
    /usr/bin/python3 -m venv --system-site-packages "$1"
  fi
}

# ------------------------------------------------------------ offline bundle
if [ -n "$OFFLINE" ]; then
  [ -f "$OFFLINE" ] || die "no bundle at $OFFLINE"
  VENV=${VENV:-/opt/agent-tracer/venv}
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  tar -xzf "$OFFLINE" -C "$work"
  b=$(ls -d "$work"/agent-tracer-bundle-* | head -n1)
  [ -f "$b/manifest.json" ] || die "$OFFLINE is not an agent-tracer bundle (no manifest.json)"
  want=$(sed -n 's/.*"distro": *"\([^"]*\)".*/\1/p' "$b/manifest.json")
  have=$(. /etc/os-release; echo "${VERSION_CODENAME:-unknown}")
  [ "$want" = "$have" ] || die "the bundle is for $want, this machine runs $have: build one for $have (make bundle DISTRO=$have)"
  [ "$(sed -n 's/.*"arch": *"\([^"]*\)".*/\1/p' "$b/manifest.json")" = "$ARCH" ] || die "the bundle is not for $ARCH"
  debs=()
  for f in "$b"/debs/*.deb; do
    p=$(dpkg-deb -f "$f" Package)
    installed "$p" || debs+=("$f")
  done
  if [ ${#debs[@]} -gt 0 ]; then
    log "installing ${#debs[@]} package(s) from the bundle (dpkg, no registry)"
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    dpkg -i "${debs[@]}" >/dev/null || { rm -f /usr/sbin/policy-rc.d; die "dpkg -i failed (see above)"; }
    rm -f /usr/sbin/policy-rc.d
  else
    log "every package of the bundle is installed already"
  fi
  if hdr_ok; then
    log "kernel headers: /lib/modules/$KREL/build present -> $(readlink -f "/lib/modules/$KREL/build")"
  else
    link_generic_headers
  fi
  mount_tracefs
  make_venv "$VENV"
  log "installing agent-tracer into $VENV from the bundle's wheels (--no-index)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-index --find-links "$b/wheels" \
    "$(sed -n 's/.*"distribution": *"\([^"]*\)".*/\1/p' "$b/manifest.json")"
  "$VENV/bin/agent-tracer" --version >/dev/null || die "agent-tracer does not run from $VENV"
  "$VENV/bin/python" -c 'import bcc' || die "bcc not importable from $VENV"
  log "done: $VENV/bin/agent-tracer doctor; $VENV/bin/agent-tracer service install"
  exit 0
fi

# ------------------------------------------------------------------ online
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian and Ubuntu"
VENV=${VENV:-.venv}
PKGS=("${RUNTIME_PKGS[@]}")
if [ "$TEST" = 1 ]; then
  PKGS+=("${TEST_PKGS[@]}")
  command -v kubectl >/dev/null || PKGS+=(kubernetes-client)
  command -v systemd-analyze >/dev/null || PKGS+=(systemd)
fi

missing=()
for p in "${PKGS[@]}"; do
  installed "$p" || missing+=("$p")
done
updated=0
apt_update() { [ $updated = 1 ] || { log "apt-get update"; apt-get update -qq; updated=1; }; }
if [ ${#missing[@]} -gt 0 ]; then
  apt_update
  for p in "${missing[@]}"; do
    if [ "$p" = systemd ] && apt-get -s install -y --no-install-recommends systemd 2>/dev/null | grep -q '^Remv'; then
      log "WARNING: not installing systemd (it would remove packages here); the unit test will skip"
      missing=("${missing[@]/systemd}")
    fi
  done
  log "installing: ${missing[*]}"
  # auditd, sshd and prometheus must not be left running by the package's
  # postinst: the benchmark and the tests start and stop their own instances.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  # shellcheck disable=SC2068
  apt-get install -y -qq --no-install-recommends ${missing[@]} >/dev/null
  rm -f /usr/sbin/policy-rc.d; trap - EXIT
fi

# --- kernel headers -------------------------------------------------------
if hdr_ok; then
  log "kernel headers: /lib/modules/$KREL/build already present -> $(readlink -f /lib/modules/$KREL/build)"
else
  apt_update
  if apt-get install -y -qq "linux-headers-$KREL" >/dev/null 2>&1; then
    log "kernel headers: installed the running kernel's own headers (linux-headers-$KREL)"
  else
    apt-get install -y -qq "linux-headers-$ARCH" >/dev/null 2>&1 \
      || die "no kernel headers: neither linux-headers-$KREL nor linux-headers-$ARCH could be installed"
    link_generic_headers
  fi
fi

mount_tracefs

# --- venv ------------------------------------------------------------------
make_venv "$VENV"
if [ "$TEST" = 1 ]; then
  log "installing agent-tracer (editable) with its test tools into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
else
  log "installing agent-tracer (editable) into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e .
fi
# editable_mode=compat: a plain path in a .pth file, no import hook to load at
# every interpreter start (half of `python -c pass` in the venv otherwise;
# `episode run` starts once per rollout, docs/scale.md)
if [ "$TEST" = 1 ]; then
  log "installing agent-tracer (editable) with its test tools into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
else
  log "installing agent-tracer (editable) into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e . --config-settings editable_mode=compat
fi
"$VENV/bin/python" -c 'import bcc, episode_tracer' || die "bcc or tracer not importable from $VENV"
log "done: $VENV/bin/agent-tracer doctor"
