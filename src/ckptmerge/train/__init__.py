"""A small, deterministic pre-training loop that writes real HF checkpoint series on CPU."""
