"""Train stage: one run config trained into one run folder; knows nothing of sweeps or SLURM.

trainer (set-up, the entry), loop (steps, evaluation, checkpoints), loaders, bookkeeping (the run folder's files),
coordination (ranks agreeing to stop or fail), distributed (process groups), models.
"""
