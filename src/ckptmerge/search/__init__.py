"""Merge weights chosen by Bayesian optimization of held-out loss (BO merging, Liu et al. 2024).

May import ``train`` and every room below it.
"""

