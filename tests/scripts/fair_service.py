"""Under ``mpirun -n 1+N``: identical workers, the server the bottleneck (each update takes 2 ms).
Rank 0 prints the per-worker update counts as JSON after ``--updates`` updates."""

from __future__ import annotations

import argparse
import json
import time

import torch
from mpi4py import MPI

from lightning_byz.optim.split import SGDServer
from lightning_byz.ps import Message, ParameterServer, ServeLoop
from lightning_byz.transport.mpi import MPIServerTransport, MPIWorkerTransport, barrier

D = 1000


def slow_mean(vectors, weights):
    time.sleep(2e-3)  # the server's work per update: every worker is ready before it is done
    return (weights[:, None] * vectors).sum(0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--updates", type=int, default=400)
    args = p.parse_args()
    comm = MPI.COMM_WORLD.Dup()
    rank, n = comm.Get_rank(), comm.Get_size() - 1
    if rank == 0:
        params = torch.zeros(D)
        transport = MPIServerTransport(comm, D, 0, torch.float32, params.device)
        server = ParameterServer(params, n, slow_mean, SGDServer(), lr=lambda: 0.0)
        loop = ServeLoop(server, transport)
        for _ in range(args.updates):
            loop.serve_until_update()
        loop.stop()
        barrier(comm, timeout=30.0, while_waiting=transport.absorb)
        transport.close()
        print(json.dumps({"counts": server.counts.tolist()}), flush=True)
    else:
        transport = MPIWorkerTransport(comm, D, 0, torch.float32)
        vector, version = torch.ones(D), 0
        for step in range(10**9):
            reply = transport.exchange(Message(rank, step, version, vector))
            version = reply.version
            if reply.stop:
                break
        barrier(comm, timeout=30.0)


if __name__ == "__main__":
    main()
