"""``ckptmerge reproduce``: the three papers' small-scale claims (METHODS.md section 5.2).

Built on the library's parts, with none of its own: runs train with ``train/loop.py``, per-step EMAs
are ``online/`` averagers, spikes are ``recovery/spikes.py``'s rule, weights are merged and scored by
``evaluation/scoring.py``, files are published by ``io/publish.py``.

May import ``search``, ``sweep``, ``recovery``, ``demo`` and every room below them.
"""
