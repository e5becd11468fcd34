#!/usr/bin/env bash
# Idempotent installer for a fresh Debian/Ubuntu machine. Run as root from the
# repository root (make does). Installs:
#   - the distro's bcc (python3-bpfcc) and bpftool
#   - a kernel header tree bcc can use: the running kernel's headers when the
#     distro has them, else the distro's generic headers linked into
#     /lib/modules/$(uname -r)/{build,source}
#   - tracefs mounted at /sys/kernel/tracing
#   - the tools the tests and the benchmark drive (openssh, socat, ncat,
#     autossh, tmux, bpftrace, auditd, iproute2, gcc, make)
#   - a venv at .venv made from /usr/bin/python3 --system-site-packages (so the
#     distro's bcc is importable) with this package installed editable.
# Set AGENT_TRACER_NO_TEST_TOOLS=1 to skip the test and benchmark tools.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (the tracer loads BPF programs)"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian and Ubuntu"

export DEBIAN_FRONTEND=noninteractive
KREL=$(uname -r)
RUNTIME_PKGS=(python3-bpfcc python3-venv python3-pip bpftool iproute2 kmod)
TEST_PKGS=(openssh-server openssh-client socat ncat autossh sshuttle tmux bpftrace auditd gcc make git curl rsync httpie wget jq sqlite3 bind9-dnsutils)
PKGS=("${RUNTIME_PKGS[@]}")
[ "${AGENT_TRACER_NO_TEST_TOOLS:-0}" = 1 ] || PKGS+=("${TEST_PKGS[@]}")

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
updated=0
apt_update() { [ $updated = 1 ] || { log "apt-get update"; apt-get update -qq; updated=1; }; }
if [ ${#missing[@]} -gt 0 ]; then
  apt_update
  log "installing: ${missing[*]}"
  # auditd and sshd must not be left running by the package's postinst: the
  # benchmark and the tests start and stop their own instances.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d; trap - EXIT
fi

# --- kernel headers -------------------------------------------------------
hdr_ok() { [ -e "/lib/modules/$KREL/build/include/linux/kconfig.h" ] || [ -e "/lib/modules/$KREL/build/include/generated/autoconf.h" ]; }
if hdr_ok; then
  log "kernel headers: /lib/modules/$KREL/build already present -> $(readlink -f /lib/modules/$KREL/build)"
else
  apt_update
  if apt-get install -y -qq "linux-headers-$KREL" >/dev/null 2>&1; then
    log "kernel headers: installed the running kernel's own headers (linux-headers-$KREL)"
  else
    arch=$(dpkg --print-architecture)
    apt-get install -y -qq "linux-headers-$arch" >/dev/null 2>&1 \
      || die "no kernel headers: neither linux-headers-$KREL nor linux-headers-$arch could be installed"
    gen=$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -n1)
    common=${gen%-"$arch"}-common
    [ -d "$gen" ] || die "linux-headers-$arch installed but no /usr/src/linux-headers-*-$arch found"
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$gen" "/lib/modules/$KREL/build"
    if [ -d "$common" ]; then ln -sfn "$common" "/lib/modules/$KREL/source"; else ln -sfn "$gen" "/lib/modules/$KREL/source"; fi
    log "kernel headers: the distro has none for $KREL; using the generic $(basename "$gen") headers"
    log "  linked /lib/modules/$KREL/build -> $gen (safe: our BPF code reads no kernel-internal structs)"
  fi
fi

# --- tracefs ---------------------------------------------------------------
if [ ! -e /sys/kernel/tracing/events ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null && log "mounted tracefs at /sys/kernel/tracing" \
    || log "WARNING: could not mount tracefs; the tracer will try again at start"
fi

# --- venv ------------------------------------------------------------------
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  log "creating .venv from /usr/bin/python3 --system-site-packages (sees the distro's bcc)"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
log "installing agent-tracer (editable) and its Python dependencies into .venv"
# editable_mode=compat: a plain path in a .pth file, no import hook to load at
# every interpreter start (half of `python -c pass` in the venv otherwise;
# `episode run` starts once per rollout, docs/scale.md)
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
.venv/bin/python -c 'import bcc, tracer' || die "bcc or tracer not importable from .venv"
log "done: .venv/bin/agent-tracer doctor"
