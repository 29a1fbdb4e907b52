"""``ckptmerge reproduce``: the three papers' small-scale claims (METHODS.md section 5.2, E1 to E10)."""
