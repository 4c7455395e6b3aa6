"""One process of the two-process mini-batch evaluation test (test_mechanism): RANK, WORLD_SIZE, MASTER_ADDR/PORT set,
`python tests/minibatch_worker.py OUT.json`. Evaluates minibatch_case's model over gloo; rank 0 writes the errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from test_mechanism import minibatch_case
from torch.utils.data import DataLoader, TensorDataset

from ablation.train.distributed import setup, teardown
from ablation.train.loaders import MiniBatchValSampler
from ablation.train.loop import evaluate_minibatch

env = setup("cpu")
cfg, model, x, y, _ = minibatch_case(world=env.world_size)
sampler = MiniBatchValSampler(len(y), cfg, env.rank, env.world_size)
err1, err5 = evaluate_minibatch(model, DataLoader(TensorDataset(x, y), batch_sampler=sampler), env, cfg)
shares = torch.tensor([len(sampler), sampler.images])
every = [torch.zeros_like(shares) for _ in range(env.world_size)]
dist.all_gather(every, shares)
if env.rank == 0:
    Path(sys.argv[1]).write_text(json.dumps({"world": env.world_size, "err1": err1, "err5": err5,
                                             "forwards": [int(s[0]) for s in every], "images": [int(s[1]) for s in every]}))
teardown()
