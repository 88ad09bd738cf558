"""Under ``mpirun -n S``: every rank owns a slice of the same inputs and aggregates it with the cross-
shard reductions over MPI (:class:`~lightning_byz.sharding.MPIGroup`). Rank 0 prints, as JSON, each
rule's largest relative gap to one server and whether every rank reduced to the same bits."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from mpi4py import MPI

from lightning_byz.aggregators import get_aggregator
from lightning_byz.aggregators import base
from lightning_byz.sharding import MPIGroup, ShardLayout, across_shards


def main(cases_file: str) -> None:
    comm = MPI.COMM_WORLD.Dup()
    rank, size = comm.Get_rank(), comm.Get_size()
    g = torch.Generator().manual_seed(0)
    n, d = 11, 997
    X = torch.randn(d, generator=g, dtype=torch.float64) + torch.randn(n, d, generator=g, dtype=torch.float64)
    X[0] *= 1e30  # one shouting row: the Gram matrix is rebuilt about an honest centre
    w = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    mine = ShardLayout(d, size).split(X)[rank].contiguous()
    gaps, same_bits = [], True
    for name, options in json.loads(open(cases_file).read()):
        agg = get_aggregator(name, **options)
        with across_shards(MPIGroup(comm)):
            part = agg(mine, w)
            G = base.gram(mine, center=True)
        parts = comm.gather(part.numpy(), root=0)
        grams = comm.gather(G.numpy(), root=0)
        if rank == 0:
            out = torch.from_numpy(np.concatenate(parts))
            reference = agg(X, w)
            gaps.append(float((out - reference).abs().max() / reference.abs().max()))
            same_bits &= all(np.array_equal(grams[0], other) for other in grams[1:])
    if rank == 0:
        print(json.dumps({"gaps": gaps, "same_bits_on_every_rank": same_bits}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
