"""agent-tracer: eBPF tracer and policy enforcer for autonomous AI agents."""

__version__ = "0.1.0"
