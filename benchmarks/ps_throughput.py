"""Parameter-server throughput against a raw mpi4py exchange of the same bytes, in the same MPI job.

For each (d, workers) configuration this script launches ``1 + workers`` MPI ranks (with
:func:`lightning_byz.launcher.launch`, the virtualenv's ``mpirun``) and, inside that one job,
alternates rounds of:

(a) ``raw``: workers send d float32 (+ a 32-byte header), the server answers d float32 to whoever
    arrived (persistent receives + ``Waitany``, ``Isend`` replies); no validation, no aggregation;
(b) ``ps``: our real server path, the strategy's :class:`~lightning_byz.ps.ServeLoop` over
    :class:`MPIServerTransport` (validation, per-worker latest vectors, async weights) with the
    ``mean`` aggregator and the plain SGD server rule, workers on :class:`MPIWorkerTransport`
    sending a fixed random vector (no model, no gradient);
(c) on the server alone, workers idle: ``t_aggregate`` (mean over [n, d] with weights, as the
    server calls it) and ``t_step`` (SGD server rule step).

Rates are exchanges (updates) per second, best of ``--repeats`` rounds. ``ideal`` is
1 / (t_exchange + t_aggregate + t_step), t_exchange = 1 / raw rate: the work the server cannot avoid.
Target (docs/benchmarks.md): PS/ideal >= 0.70 at d = 1e6.

    .venv/bin/python benchmarks/ps_throughput.py [--d 1e5 1e6 1.1e7] [--workers 4 8] [--seconds 3]

``--servers 1 2 4`` measures the sharded server instead (:mod:`lightning_byz.sharding`), for each
``--shards D:N`` configuration and ``--rules``: every server's share of one update (aggregating its
d/S slice of the N latest vectors, cross-shard reductions included, then the server step on its
slice) as that server thread's CPU time (``time.thread_time``: on a machine with fewer cores than
servers the wall clock cannot show the split), the slowest server counting; each server's bytes
received per update (its slices of the message, counted from the wire format, plus the other
servers' partial Gram matrices for rules that need them); and the Gram reduction among S real MPI
ranks (an all-gather of S x N x N float64, summed in rank order). Everything is printed as a ratio to
S = 1 measured in the same run; target: slowest server <= 1.2/S of S = 1 plus the reduction.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MARK = "PS_THROUGHPUT_RESULT "


# ----------------------------------------------------------------------------------- in the job
def _idle_until_server(comm) -> None:
    """Workers wait for the server without spinning (so they do not steal its CPU)."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(2e-3)


def _raw_round(comm, d: int, seconds: float) -> float:
    """Raw exchange rate (server's view), exchanges/s."""
    import numpy as np
    from mpi4py import MPI

    rank, n = comm.Get_rank(), comm.Get_size() - 1
    nbytes = 32 + 4 * d
    if rank == 0:
        recv = [np.empty(nbytes, np.uint8) for _ in range(n)]
        send = [np.zeros(nbytes, np.uint8) for _ in range(n)]
        reqs = [comm.Recv_init([recv[i], MPI.BYTE], source=i + 1, tag=21) for i in range(n)]
        sends = [MPI.REQUEST_NULL] * n
        MPI.Prequest.Startall(reqs)
        comm.Barrier()
        count, stopped = 0, 0
        start = time.perf_counter()
        end = start + seconds
        while stopped < n:
            i = MPI.Request.Waitany(reqs)
            sends[i].Wait()
            stop = time.perf_counter() >= end
            send[i][:8].view(np.int64)[0] = 1 if stop else 0
            sends[i] = comm.Isend([send[i], MPI.BYTE], dest=i + 1, tag=22)
            if stop:
                if stopped == 0:
                    elapsed = time.perf_counter() - start
                stopped += 1
            else:
                count += 1
                reqs[i].Start()
        MPI.Request.Waitall(sends)
        for r in reqs:
            r.Free()
        return count / elapsed
    out = np.random.default_rng(rank).integers(0, 255, nbytes, dtype=np.uint8)
    inp = np.empty(nbytes, np.uint8)
    comm.Barrier()
    while True:
        comm.Send([out, MPI.BYTE], dest=0, tag=21)
        comm.Recv([inp, MPI.BYTE], source=0, tag=22)
        if inp[:8].view(np.int64)[0]:
            return 0.0


def _ps_round(comm, d: int, seconds: float) -> float:
    """Update rate of the real server path (the strategy's serve loop: async, mean, SGD), updates/s."""
    import torch

    from lightning_byz.aggregators import get_aggregator
    from lightning_byz.optim.split import SGDServer
    from lightning_byz.ps import Message, ParameterServer, ServeLoop
    from lightning_byz.transport.mpi import MPIServerTransport, MPIWorkerTransport, barrier

    rank, n = comm.Get_rank(), comm.Get_size() - 1
    if rank == 0:
        params = torch.zeros(d)
        transport = MPIServerTransport(comm, d, 0, torch.float32, params.device)
        server = ParameterServer(params, n, get_aggregator("mean"), SGDServer(), lr=lambda: 0.01)
        loop = ServeLoop(server, transport)
        comm.Barrier()
        count = 0
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            count += loop.serve_one()
        elapsed = time.perf_counter() - start
        loop.stop()  # as the strategy's finish(): final parameters with the stop flag
        barrier(comm, timeout=30.0, while_waiting=transport.absorb)
        transport.close()
        assert not server.rejected, server.rejected
        return count / elapsed
    transport = MPIWorkerTransport(comm, d, 0, torch.float32)
    vector = torch.randn(d, generator=torch.Generator().manual_seed(rank))
    comm.Barrier()
    step, version = 0, 0
    while True:
        reply = transport.exchange(Message(rank, step, version, vector))
        version, step = reply.version, step + 1
        if reply.stop:
            barrier(comm, timeout=30.0)
            return 0.0


def _alone_round(comm, d: int, repeats: int = 20) -> tuple[float, float]:
    """(t_aggregate, t_step) on the server, best of ``repeats``; workers idle."""
    import torch

    from lightning_byz.aggregators import get_aggregator
    from lightning_byz.optim.split import SGDServer

    if comm.Get_rank() != 0:
        _idle_until_server(comm)
        return 0.0, 0.0
    n = comm.Get_size() - 1
    X = torch.randn(n, d)
    w = torch.rand(n)
    w /= w.sum()
    params = torch.zeros(d)
    agg, rule = get_aggregator("mean"), SGDServer()
    t_agg = t_step = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        direction = agg(X, w)
        t1 = time.perf_counter()
        rule.step([params], [direction], 0.01)
        t2 = time.perf_counter()
        t_agg, t_step = min(t_agg, t1 - t0), min(t_step, t2 - t1)
    comm.Ibarrier().Wait()
    return t_agg, t_step


def inner(args: argparse.Namespace) -> None:
    import torch
    from mpi4py import MPI

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    comm = MPI.COMM_WORLD.Dup()
    d = int(float(args.d[0]))
    raw, ps, agg, step = [], [], [], []
    for _ in range(args.repeats):
        raw.append(_raw_round(comm, d, args.seconds))
        ps.append(_ps_round(comm, d, args.seconds))
        a, s = _alone_round(comm, d)
        agg.append(a)
        step.append(s)
    if comm.Get_rank() == 0:
        result = {"d": d, "workers": comm.Get_size() - 1, "raw": raw, "ps": ps, "t_aggregate": agg, "t_step": step}
        print(MARK + json.dumps(result), flush=True)
    comm.Free()


# ------------------------------------------------------------------------------ sharded servers
def _gram_rule(rule: str) -> bool:
    from lightning_byz.aggregators import get_aggregator
    from lightning_byz.aggregators.coordinate import CWMed, CWTM, Mean

    return not isinstance(get_aggregator(rule), (Mean, CWMed, CWTM))


def shard_work(d: int, n: int, rule: str, servers: int, repeats: int) -> dict:
    """Per-server CPU seconds of one update (aggregate own slice with the reductions + SGD step on it),
    best of ``repeats``: the slowest server's, and the mean over servers."""
    import torch

    from lightning_byz.aggregators import get_aggregator
    from lightning_byz.optim.split import SGDServer
    from lightning_byz.sharding import ShardLayout, run_on_shards

    g = torch.Generator().manual_seed(0)
    layout = ShardLayout(d, servers)
    slices = [torch.randn(n, layout.size(k), generator=g) for k in range(servers)]  # each server's block
    params = [torch.zeros(layout.size(k)) for k in range(servers)]
    w = torch.rand(n, generator=g)
    w /= w.sum()
    agg, rule_step = get_aggregator(rule), SGDServer()

    def job(k: int) -> float:
        start = time.thread_time()
        rule_step.step([params[k]], [agg.aggregate_checked(slices[k], w)], 0.01)
        return time.thread_time() - start

    run_on_shards(job, servers)  # warm-up (the coordinate-wise kernel compiles on its first call)
    best = None
    for _ in range(repeats):
        times = run_on_shards(job, servers)
        if best is None or max(times) < max(best):
            best = times
    return {"slowest": max(best), "mean": sum(best) / servers}


def reduction_round(args: argparse.Namespace) -> None:
    """In an MPI job of S ranks: seconds per Gram reduction (n x n float64), best of the rounds."""
    import torch
    from mpi4py import MPI

    from lightning_byz.sharding import MPIGroup

    comm = MPI.COMM_WORLD.Dup()
    group, G = MPIGroup(comm), torch.rand(args.n, args.n, dtype=torch.float64)
    best = float("inf")
    for _ in range(args.repeats):
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(100):
            group.sum(G)
        best = min(best, (time.perf_counter() - start) / 100)
    if comm.Get_rank() == 0:
        print(MARK + json.dumps({"t_reduce": best}), flush=True)


def reduction_time(servers: int, n: int, repeats: int, timeout: float) -> float:
    """Seconds per Gram reduction among ``servers`` MPI ranks (0 for one server)."""
    if servers == 1:
        return 0.0
    from lightning_byz.launcher import launch

    argv = [str(Path(__file__).resolve()), "--inner-reduce", "--n", str(n), "--repeats", str(repeats)]
    proc = launch(servers - 1, argv, timeout=timeout, capture_output=True)
    found = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode or not found:
        raise RuntimeError(f"reduction job failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(found[-1][len(MARK):])["t_reduce"]


def bytes_received(d: int, n: int, servers: int, gram: bool) -> int:
    """One server's bytes per update: its slice of one message (header + float32 payload, the largest
    slice), plus the other servers' n x n float64 partial Gram matrices."""
    slice_numel = -(-d // servers)
    return 32 + 4 * slice_numel + ((servers - 1) * 8 * n * n if gram else 0)


def sharded(args: argparse.Namespace) -> list[dict]:
    import torch

    torch.set_num_threads(1)  # one core per server: its thread's CPU time is its work
    rows = []
    for config in args.shards:
        d_text, n_text = config.split(":")
        d, n = int(float(d_text)), int(n_text)
        for rule in args.rules:
            base = None
            for servers in args.servers:
                work = shard_work(d, n, rule, servers, args.repeats)
                t_reduce = reduction_time(servers, n, args.repeats, args.timeout) if _gram_rule(rule) else 0.0
                row = dict(d=d, n=n, rule=rule, servers=servers, **work, t_reduce=t_reduce,
                           bytes=bytes_received(d, n, servers, _gram_rule(rule)))
                base = base or row
                row.update(work_ratio=row["slowest"] / base["slowest"], bytes_ratio=row["bytes"] / base["bytes"],
                           target=1.2 / servers + t_reduce / base["slowest"])
                rows.append(row)
                print(sharded_table([row]).splitlines()[-1], flush=True)
    return rows


def format_table(columns: list[tuple[str, int, str]], rows: list[dict]) -> str:
    """Right-aligned columns: (title, width, format of the row's value as ``{r[...]:...}``)."""
    head = " ".join(f"{title:>{width}}" for title, width, _ in columns)
    lines = [head, "-" * len(head)]
    lines += [" ".join(f"{cell.format(r=r):>{width}}" for _, width, cell in columns) for r in rows]
    return "\n".join(lines)


def sharded_table(rows: list[dict]) -> str:
    return format_table([
        ("d", 8, "{r[d]:.2g}"), ("N", 3, "{r[n]}"), ("rule", 6, "{r[rule]}"), ("S", 2, "{r[servers]}"),
        ("slowest ms", 10, "{r[slowest_ms]:.1f}"), ("mean ms", 8, "{r[mean_ms]:.1f}"),
        ("reduce ms", 9, "{r[reduce_ms]:.3f}"), ("MB in", 7, "{r[mb]:.2f}"), ("work/S=1", 8, "{r[work_ratio]:.2f}"),
        ("target", 6, "{r[target]:.2f}"), ("bytes/S=1", 9, "{r[bytes_ratio]:.2f}"),
    ], [dict(r, slowest_ms=1e3 * r["slowest"], mean_ms=1e3 * r["mean"], reduce_ms=1e3 * r["t_reduce"],
             mb=r["bytes"] / 1e6) for r in rows])


# ----------------------------------------------------------------------------------- the driver
def summarise(r: dict) -> dict:
    raw, ps = max(r["raw"]), max(r["ps"])
    t_ex, t_agg, t_step = 1.0 / raw, min(r["t_aggregate"]), min(r["t_step"])
    ideal = 1.0 / (t_ex + t_agg + t_step)
    return dict(r, raw_best=raw, ps_best=ps, t_exchange=t_ex, t_agg_best=t_agg, t_step_best=t_step,
                ideal=ideal, ps_over_raw=ps / raw, ps_over_ideal=ps / ideal)


def table(rows: list[dict]) -> str:
    return format_table([
        ("d", 9, "{r[d]:.2g}"), ("N", 2, "{r[workers]}"), ("raw/s", 8, "{r[raw_best]:.1f}"),
        ("PS/s", 8, "{r[ps_best]:.1f}"), ("ideal/s", 8, "{r[ideal]:.1f}"), ("t_ex ms", 8, "{r[t_ex_ms]:.3f}"),
        ("t_agg ms", 8, "{r[t_agg_ms]:.3f}"), ("t_step ms", 9, "{r[t_step_ms]:.3f}"),
        ("PS/raw", 7, "{r[ps_over_raw]:.2f}"), ("PS/ideal", 8, "{r[ps_over_ideal]:.2f}"),
    ], [dict(r, t_ex_ms=1e3 * r["t_exchange"], t_agg_ms=1e3 * r["t_agg_best"], t_step_ms=1e3 * r["t_step_best"])
        for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", nargs="+", default=["1e5", "1e6", "1.1e7"], help="vector sizes (float32 elements)")
    p.add_argument("--workers", nargs="+", type=int, default=[4, 8])
    p.add_argument("--seconds", type=float, default=3.0, help="length of one timed round")
    p.add_argument("--repeats", type=int, default=3, help="rounds of (raw, PS) per job; the best counts")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per MPI job")
    p.add_argument("--json", default=None, help="also write all results here")
    p.add_argument("--servers", nargs="+", type=int, default=None,
                   help="measure the sharded server with these numbers of servers (the first is the baseline)")
    p.add_argument("--shards", nargs="+", default=["1.1e7:8", "1.1e7:16", "1e6:32"], metavar="D:N",
                   help="with --servers: (vector size, workers) configurations")
    p.add_argument("--rules", nargs="+", default=["cwmed", "gm"], help="with --servers: aggregation rules")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inner-reduce", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=8, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inner:
        inner(args)
        return
    if args.inner_reduce:
        reduction_round(args)
        return
    if args.servers:
        rows = sharded(args)
        print(f"\n{os.cpu_count()} cores; per-server CPU time of one update (aggregate own slice + step), best of "
              f"{args.repeats}; work/S=1: slowest server vs one server; target: 1.2/S + reduce/S=1")
        print(sharded_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
    from lightning_byz.launcher import launch

    rows = []
    for d in args.d:
        for n in args.workers:
            argv = [str(Path(__file__).resolve()), "--inner", "--d", d, "--seconds", str(args.seconds),
                    "--repeats", str(args.repeats)]
            try:
                proc = launch(n, argv, timeout=args.timeout, capture_output=True)
            except subprocess.TimeoutExpired:
                print(f"d={d} workers={n}: timed out after {args.timeout:g}s", file=sys.stderr)
                continue
            found = [line for line in proc.stdout.splitlines() if line.startswith(MARK)]
            if proc.returncode or not found:
                print(f"d={d} workers={n}: job failed (rc {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}",
                      file=sys.stderr)
                continue
            rows.append(summarise(json.loads(found[-1][len(MARK):])))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\n{os.cpu_count()} cores; 1 server + N workers; best of {args.repeats} rounds of {args.seconds:g}s; "
          "ideal = 1/(t_ex + t_agg + t_step)")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
