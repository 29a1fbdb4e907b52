"""``ckptmerge reproduce``: the three papers' small-scale claims (METHODS.md section 5.2).

May import ``search``, ``sweep``, ``recovery``, ``demo`` and every room below them.
"""

