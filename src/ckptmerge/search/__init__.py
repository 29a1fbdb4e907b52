"""Merge weights chosen by Bayesian optimization of held-out loss (BO merging, Liu et al. 2024)."""
