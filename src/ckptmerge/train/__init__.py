"""A small, deterministic pre-training loop that writes real HF checkpoint series on CPU, and PMA-init.

May import ``online``, ``evaluation``, ``merging``, ``io``, ``data``, ``errors`` and ``console``.
"""

