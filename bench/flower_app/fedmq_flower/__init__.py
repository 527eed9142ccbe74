"""The reference workload of fedmq's DESIGN.md as a Flower app (see bench/vs_flower.py)."""
