"""Checkpoint files: readers for safetensors, torch pickles and DCP, the streaming safetensors writer,
atomic publishing, fingerprints and YAML config files; the C-library calls (``libc.py``) and process
liveness (``process_liveness.py``) they rest on.

May import ``errors`` and ``console`` only.
"""
