"""Loss-spike detection and recovery: restart from a merge of the checkpoints before the spike.

May import ``train`` and every room below it.
"""
