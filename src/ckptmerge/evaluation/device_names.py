"""The names users type for ``--device`` and ``--dtype``, without torch (``--help`` lists them); ``devices.py``
resolves them to torch objects."""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # what an evaluated model computes in
