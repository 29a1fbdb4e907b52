"""Running on many ranks: the torch.distributed process group that torchrun / srun set up, splitting work
across ranks, and agreement on errors so a failure on one rank stops every rank with one message.

May import ``errors`` and ``console`` only.
"""
