"""A small, deterministic pre-training loop that writes real HF checkpoint series on CPU, and PMA-init.

``loop.py`` is the step loop (with step callbacks and a resumable state) that ``trainer.py`` and the
reproduction share. May import ``online``, ``evaluation``, ``merging``, ``io``, ``data``, ``errors`` and ``console``.
"""
