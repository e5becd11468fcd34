"""`python -m episode_tracer`: the agent-tracer command line."""
from .cli import main

main(prog_name="agent-tracer")
