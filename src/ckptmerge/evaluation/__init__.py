"""Held-out evaluation: model loading, the evaluator with standard errors, scoring of merges and the runner.

May import ``merging``, ``io``, ``data``, ``errors`` and ``console``.
"""
