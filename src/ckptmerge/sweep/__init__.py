"""``ckptmerge sweep``: what merging gives a run, at points along it, across methods x N x V.

May import ``train`` and every room below it.
"""

