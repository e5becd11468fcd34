"""Default limits that the CLI's options and RunOptions share: one place for
each number, importable without the rest of the package (the CLI reads it at
start; see tests/test_scale.py's import check)."""

# the per-episode record rate limit (records/s, burst) by default: well above
# what a build or a training job produces, well below the drain rate, so one
# flooding episode cannot take the ring buffer from the others (episode_tracer/bpf/nodesvc.h)
EPISODE_RATE = 100_000
EPISODE_BURST = 200_000
