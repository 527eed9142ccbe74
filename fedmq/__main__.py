"""`python -m fedmq` is the `fedmq` command (the demo starts its processes this way)."""

from fedmq.cli import main

main(prog_name="fedmq")
