"""Corpora, tokenization and deterministic batches for training and held-out evaluation.

May import ``errors`` and ``console`` only.
"""

