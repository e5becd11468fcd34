#!/bin/sh
# agent-tracer container entry point: give bcc a kernel header tree, make
# sure tracefs is there, then run the tracer (arguments: `agent-tracer ...`).
#
# Headers, in order: the host's own (/lib/modules of the host is mounted at
# /host/lib/modules, its /usr/src at /usr/src, so the host's build symlink
# resolves), else the generic Debian headers baked into the image at
# /opt/agent-tracer/headers (safe: the BPF code reads no kernel-internal
# structs), with a line saying which.
set -eu
KREL=$(uname -r)
mkdir -p "/lib/modules/$KREL"
host_build="/host/lib/modules/$KREL/build"
if [ -e "$host_build/include" ] || [ -e "$host_build/Makefile" ]; then
  ln -sfn "$(readlink -f "$host_build")" "/lib/modules/$KREL/build"
  src="/host/lib/modules/$KREL/source"
  if [ -e "$src" ]; then ln -sfn "$(readlink -f "$src")" "/lib/modules/$KREL/source"
  else ln -sfn "$(readlink -f "$host_build")" "/lib/modules/$KREL/source"; fi
  echo "agent-tracer: kernel headers: the host's ($(readlink -f "$host_build"))" >&2
else
  gen=$(ls -d /opt/agent-tracer/headers/linux-headers-*-amd64 /opt/agent-tracer/headers/linux-headers-*-arm64 2>/dev/null | sort -V | tail -n1)
  [ -n "$gen" ] || { echo "agent-tracer: no kernel headers on the host and none in the image" >&2; exit 3; }
  common=${gen%-amd64}; common=${common%-arm64}-common
  ln -sfn "$gen" "/lib/modules/$KREL/build"
  if [ -d "$common" ]; then ln -sfn "$common" "/lib/modules/$KREL/source"; else ln -sfn "$gen" "/lib/modules/$KREL/source"; fi
  echo "agent-tracer: kernel headers: the host has none for $KREL; using the generic $(basename "$gen")" >&2
fi
[ -e /sys/kernel/tracing/events ] || mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
exec /opt/agent-tracer/venv/bin/agent-tracer "$@"
