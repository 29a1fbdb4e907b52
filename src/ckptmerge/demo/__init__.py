"""The demo: a tiny WSD run with an anneal branch, its merges, evaluation and report.

May import ``train`` and every room below it.
"""
