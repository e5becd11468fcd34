"""agent-tracer: eBPF tracer and policy enforcer for autonomous AI agents."""

__version__ = "0.1.0"


def __getattr__(name):
    # `tracer.episode(...)` / `tracer.episode_sync(...)` (episode_tracer/trainer.py), imported only when used:
    # `agent-tracer episode run` loads as little as it can (tests/test_scale.py)
    if name in ("episode", "episode_sync"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'tracer' has no attribute {name!r}")
