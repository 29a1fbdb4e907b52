"""Checkpoint files: readers for safetensors, torch pickles and DCP, the streaming safetensors writer,
atomic publishing, fingerprints and YAML config files.

May import ``errors`` and ``console`` only.
"""
