"""The parameter-server core without Lightning or MPI: the serve loop against an in-memory transport,
the worker step on a small module, the fault composite."""

from __future__ import annotations

import math
from collections import deque

import pytest
import torch
from torch import nn

from lightning_byz.aggregators import get_aggregator
from lightning_byz.faults import Fault, FaultSet
from lightning_byz.optim.split import HeavyBall, SendGradient, SGDServer, Storm
from lightning_byz.ps import FlatModel, Message, ParameterServer, Rejection, Reply, ServeLoop, WorkerStep

D = 3


class MemoryTransport:
    """Messages queued by the test; replies recorded (with a copy of the parameters they carried)."""

    def __init__(self):
        self.inbox: deque[Message | Rejection] = deque()
        self.sent: list[tuple[int, Reply]] = []

    def poll(self, timeout: float):
        return self.inbox.popleft() if self.inbox else None

    def reply(self, worker: int, reply: Reply) -> None:
        self.sent.append((worker, reply.clone()))

    def answered(self) -> list[int]:
        out = [w for w, _ in self.sent]
        self.sent.clear()
        return out


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_loop(n=3, mode="async", quorum=None, timeout=math.inf, buffers=0, clock=None, **options):
    name, lam = options.pop("aggregator", "mean"), options.pop("lam", None)
    server = ParameterServer(
        torch.zeros(D), n, get_aggregator(name, **({"lam": lam} if lam else {})), SGDServer(), lr=lambda: 1.0,
        mode=mode, quorum=quorum, worker_timeout=timeout, buffers_numel=buffers, clock=clock or Clock(), **options,
    )
    transport = MemoryTransport()
    return ServeLoop(server, transport), transport


def msg(worker, value=1.0, step=0, version=0, vector=True):
    return Message(worker, step, version, torch.full((D,), float(value)) if vector else None)


def test_async_every_accepted_arrival_is_an_update_and_its_sender_is_answered():
    loop, transport = make_loop(min_workers=1)
    transport.inbox.extend([msg(2, 1.0), msg(1, 3.0)])
    loop.serve_until_update()
    assert transport.sent[0][0] == 2 and transport.sent[0][1].version == 1
    assert torch.equal(transport.sent[0][1].params, torch.full((D,), -1.0))  # x − lr·v
    loop.serve_until_update()
    # weights s_i / Σ s_j over the heard workers: (3 + 1) / 2 = 2 more down
    assert transport.answered() == [2, 1] and torch.equal(loop.server.params, torch.full((D,), -3.0))
    assert loop.pending == []


def test_sync_round_answers_everyone_after_its_update():
    loop, transport = make_loop(mode="sync")
    transport.inbox.extend([msg(1), msg(3)])
    assert not loop.serve_one() and not loop.serve_one()
    assert transport.sent == [] and loop.pending == [1, 3]
    transport.inbox.append(msg(2))
    assert loop.serve_one()
    assert transport.answered() == [1, 3, 2]
    assert loop.server.version == 1 and loop.pending == []


def test_sync_rejected_and_empty_messages_are_answered_at_once_unreadable_ones_not():
    loop, transport = make_loop(mode="sync")
    transport.inbox.extend([
        msg(1),
        msg(2, float("nan")),  # rejected by the server
        Rejection(3, "malformed message of 7 bytes"),  # rejected by the transport
        msg(3, vector=False),  # nothing arrived (a drop)
    ])
    for _ in range(4):
        assert not loop.serve_one()
    assert transport.answered() == [2, 3]
    assert loop.pending == [1] and loop.server.round == {1}
    assert dict(loop.server.rejected) == {"non-finite values (NaN/Inf) in the update": 1, "malformed message of 7 bytes": 1}
    assert loop.server.lost == 1
    transport.inbox.extend([msg(2), msg(3)])  # the rejected ones try again and complete the round
    loop.serve_until_update()
    assert transport.answered() == [1, 2, 3] and loop.server.version == 1


def test_sync_round_closes_on_a_quiet_poll_once_a_worker_is_silent():
    clock = Clock()
    loop, transport = make_loop(mode="sync", timeout=5.0, clock=clock)
    transport.inbox.extend([msg(1), msg(2), msg(3)])
    loop.serve_until_update()
    transport.answered()
    clock.now = 4.0
    transport.inbox.extend([msg(1, version=1), msg(2, version=1)])  # worker 3 goes quiet
    assert not loop.serve_one() and not loop.serve_one() and not loop.serve_one()  # a quiet poll, in time
    clock.now = 8.0
    assert loop.serve_one()  # quiet poll after the timeout: 3 is silent, the round closes with 1 and 2
    assert transport.answered() == [1, 2] and loop.server.silent == {3}


def test_stop_sends_the_final_point_to_every_worker():
    loop, transport = make_loop(min_workers=1)
    transport.inbox.append(msg(1))
    loop.serve_until_update()
    transport.answered()
    loop.stop()
    assert [w for w, _ in transport.sent] == [1, 2, 3]
    assert all(r.stop and r.version == 1 and torch.equal(r.params, loop.server.params) for _, r in transport.sent)


def test_aggregated_buffers_reach_the_server_model_and_every_reply():
    module = nn.BatchNorm1d(2)
    model = FlatModel(module)
    server = ParameterServer(model.params, 3, get_aggregator("mean"), SGDServer(), lr=lambda: 0.0,
                             buffers_numel=model.buffers_numel, min_workers=1)
    transport = MemoryTransport()
    loop = ServeLoop(server, transport, model=model)
    for w, value in [(1, 1.0), (2, 5.0), (3, 2.0)]:
        transport.inbox.append(Message(w, 0, 0, torch.zeros(model.numel), torch.full((model.buffers_numel,), value)))
        loop.serve_until_update()
    median = torch.full((model.buffers_numel,), 2.0)  # weighted median of 1, 5, 2
    assert torch.equal(model.gather_buffers(), median)
    assert torch.equal(transport.sent[-1][1].buffers, median)


def test_warm_up_waits_for_every_worker_and_counts_each_once():
    loop, transport = make_loop()
    transport.inbox.extend([msg(1, 100.0), msg(1, 100.0), msg(1, 100.0), msg(2, 1.0)])  # 1 floods first
    for _ in range(4):
        assert not loop.serve_one()
    assert transport.sent == [] and loop.server.counts.tolist() == [1, 1, 0]
    transport.inbox.append(msg(3, 1.0))
    assert loop.serve_one()
    assert sorted(transport.answered()) == [1, 1, 1, 2, 3]
    # the first update weighs the three workers equally: mean(100, 1, 1) = 34
    assert torch.equal(loop.server.params, torch.full((D,), -34.0))
    transport.inbox.append(msg(2, 1.0, version=1))  # after the warm-up: async, one arrival one update
    assert loop.serve_one() and transport.answered() == [2]


def test_warm_up_progress_is_reported_until_the_first_update():
    loop, transport = make_loop()
    seen = []
    loop.on_warm_up = lambda heard, needed: seen.append((heard, needed))
    transport.inbox.extend([msg(1), msg(2), msg(3)])
    loop.serve_until_update()
    assert seen == [(1, 3), (2, 3)]


def test_warm_up_cannot_be_owned_by_the_first_arrival_at_any_magnitude():
    for magnitude in (1e3, 1e15, 3e38):
        loop, transport = make_loop(n=5, aggregator="cwmed")
        transport.inbox.extend([msg(1, magnitude), msg(2, -magnitude)] + [msg(w, 1.0) for w in (3, 4, 5)])
        loop.serve_until_update()
        assert torch.equal(loop.server.params, torch.full((D,), -1.0)), magnitude


def test_warm_up_goes_on_without_a_worker_that_stays_silent():
    clock = Clock()
    loop, transport = make_loop(timeout=5.0, clock=clock)
    transport.inbox.extend([msg(1), msg(2)])
    assert not loop.serve_one() and not loop.serve_one() and not loop.serve_one()
    clock.now = 6.0  # 1 and 2 wait for the server, so they are not silent; 3 never spoke
    assert loop.serve_one()
    assert sorted(transport.answered()) == [1, 2] and loop.server.silent == {3}


def test_a_worker_that_only_drops_cannot_hold_up_the_warm_up():
    clock = Clock()
    loop, transport = make_loop(timeout=5.0, clock=clock)
    transport.inbox.extend([msg(1), msg(2), msg(3, vector=False)])
    for _ in range(3):
        assert not loop.serve_one()
    assert transport.answered() == [3]  # answered at once, so it may try again
    clock.now = 6.0
    transport.inbox.append(msg(3, vector=False))
    assert not loop.serve_one()  # a drop is no sign of life
    assert loop.serve_one()  # quiet poll: 3 is silent, the warm-up closes with 1 and 2
    assert loop.server.silent == {3} and loop.server.version == 1


def test_an_update_the_rule_refuses_is_skipped_and_training_goes_on():
    loop, transport = make_loop(n=4, min_workers=1, aggregator="krum", lam=0.25)
    transport.inbox.append(msg(1))
    assert loop.serve_one()  # one row: krum refuses it (needs n > 2f + 2)
    assert loop.server.version == 0 and next(iter(loop.server.skipped)).startswith("the rule refused")
    assert transport.answered() == [1]
    for w in (2, 3, 4, 1):
        transport.inbox.append(msg(w))
        loop.serve_one()
    assert loop.server.version >= 1


def test_max_staleness_rejects_old_updates_and_answers_them():
    loop, transport = make_loop(min_workers=1, max_staleness=2)
    for _ in range(4):
        transport.inbox.append(msg(1, version=loop.server.version))
        loop.serve_until_update()
    transport.answered()
    transport.inbox.append(msg(2, version=1))  # 3 versions old
    assert not loop.serve_one()
    assert transport.answered() == [2] and loop.server.rejected["stale"] == 1


def test_max_weight_caps_a_flooding_worker():
    loop, transport = make_loop(min_workers=1, max_weight=0.5)
    for _ in range(8):
        transport.inbox.append(msg(1, 0.0, version=loop.server.version))
        loop.serve_until_update()
    transport.inbox.append(msg(2, 1.0, version=loop.server.version))
    loop.serve_until_update()
    w = loop.server.weights(torch.tensor([1, 2]))
    assert torch.allclose(w, torch.tensor([0.5, 0.5]))  # uncapped: 8/9 and 1/9


@pytest.mark.parametrize("cap", [None, 0.25, 0.5])
def test_max_weight_caps_the_share_of_updates_a_flooder_triggers(cap):
    """Worker 1 sends 10 messages for every one of workers 2-4: it may trigger at most
    max(cap, 1/k) of the updates (plus one); every message is still answered, nothing stalls."""
    loop, transport = make_loop(n=4, max_weight=cap)
    for w in (1, 2, 3, 4):  # the warm-up
        transport.inbox.append(msg(w))
    loop.serve_until_update()
    transport.answered()
    server, base = loop.server, loop.server.version
    for _ in range(20):
        for w in [1] * 10 + [2, 3, 4]:
            transport.inbox.append(msg(w, version=server.version))
            loop.serve_one()
            assert transport.answered() == [w]
    triggered = server.triggered.tolist()
    assert sum(triggered) == server.version - base
    share = triggered[0] / sum(triggered)
    if cap is None:
        assert share == 10 / 13 and server.throttled == 0
    else:
        assert share <= cap + 1 / sum(triggered) and server.throttled == 200 - triggered[0]
        assert triggered[1:] == [20, 20, 20]  # the honest arrivals all trigger


def test_a_capped_worker_alone_still_triggers_updates():
    clock = Clock()
    loop, transport = make_loop(n=3, timeout=5.0, clock=clock, max_weight=0.34)
    for w in (1, 2, 3):
        transport.inbox.append(msg(w))
    loop.serve_until_update()
    clock.now = 10.0  # workers 2 and 3 fall silent: worker 1 is the only active one (cap 1/k = 1)
    for _ in range(5):
        transport.inbox.append(msg(1, version=loop.server.version))
        assert loop.serve_one()
    assert loop.server.throttled == 0 and loop.server.silent == {2, 3}


def test_a_stop_request_is_answered_heard_and_never_an_update():
    loop, transport = make_loop(n=2, min_workers=1)
    asked = []
    loop.on_stop_request = asked.append
    transport.inbox.append(msg(1))
    loop.serve_until_update()
    transport.answered()
    transport.inbox.append(Message(2, 3, loop.server.version, None, stop_request=True))
    assert not loop.serve_one()
    assert asked == [2] and transport.answered() == [2] and loop.server.version == 1
    transport.inbox.append(Message(1, 4, 99, None, stop_request=True))  # a version from the future
    assert not loop.serve_one()
    assert asked == [2] and transport.answered() == [] and loop.server.rejected["stop request"] == 1


def test_cap_weights_properties():
    from lightning_byz.ps.server import cap_weights

    w = torch.tensor([0.7, 0.2, 0.05, 0.05], dtype=torch.float64)
    capped = cap_weights(w, 0.3)
    assert torch.allclose(capped.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert float(capped.max()) <= 0.3 + 1e-12
    assert torch.allclose(capped[2], capped[3]) and capped[1] > capped[2]  # order kept among the free
    assert torch.equal(cap_weights(w, 1.0), w)
    assert torch.allclose(cap_weights(w, 0.2), torch.full((4,), 0.25, dtype=torch.float64))  # infeasible


def test_non_finite_or_overflowing_aggregate_is_skipped_and_counted():
    def explode(X, w):
        return torch.full((X.shape[1],), float("inf"))

    def huge(X, w):
        return torch.full((X.shape[1],), 3e38)

    for agg, reason in ((explode, "non-finite aggregate"), (huge, "aggregate too large for the server step")):
        server = ParameterServer(torch.zeros(D), 1, agg, SGDServer(), lr=lambda: 10.0)
        assert server.receive(msg(1))
        server.update()
        assert server.version == 0 and server.skipped[reason] == 1 and torch.equal(server.params, torch.zeros(D))
        assert server.metrics()["skipped_updates"] == 1.0


def test_non_finite_rows_from_the_attack_slot_are_left_out():
    def attack(vectors, weights, workers):
        out = vectors.clone()
        out[workers == 1] = float("nan")
        return out

    server = ParameterServer(torch.zeros(D), 2, get_aggregator("mean"), SGDServer(), lr=lambda: 1.0, attack=attack)
    server.receive(msg(1, 5.0))
    assert server.receive(msg(2, 1.0))
    server.update()
    assert torch.equal(server.params, torch.full((D,), -1.0)) and server.rejected_by_worker[1] == 1


@pytest.mark.parametrize("options, message", [
    ({"min_workers": 0}, "min_workers"), ({"min_workers": 4}, "min_workers"), ({"max_staleness": -1}, "max_staleness"),
    ({"max_weight": 0.0}, "max_weight"), ({"max_weight": 1.5}, "max_weight"), ({"quorum": 4}, "sync_quorum"),
])
def test_bad_server_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        make_loop(**options)


# -- the worker step ----------------------------------------------------------------------------
class CountingFaults(Fault):
    """Doubles inputs on the batch (counting calls), drops the message of step 1, crashes at step 3."""

    def __init__(self):
        self.batch_calls = 0

    def on_worker_batch(self, worker, step, batch):
        self.batch_calls += 1
        return batch * 2

    def on_worker_message(self, worker, step, vector):
        return None if step == 1 else vector

    def crashed(self, worker, step):
        return step >= 3


def linear_setup(rule):
    torch.manual_seed(0)
    module = nn.Linear(D, 1, bias=False)
    model = FlatModel(module)
    faults = CountingFaults()
    worker = WorkerStep(2, rule, model, FaultSet([faults]))
    x = torch.randn(4, D)

    def closure():
        module.zero_grad()
        loss = module(worker.batch(x)).square().mean()
        loss.backward()
        return loss

    return model, worker, faults, x, closure


def expected_grad(point, x):
    return 2 * ((2 * x) @ point)[:, None].mul(2 * x).mean(0)  # d/dw mean((2x·w)²)


def test_worker_step_sends_the_gradient_at_its_point_and_applies_faults_once_per_step():
    model, worker, faults, x, closure = linear_setup(SendGradient())
    point = torch.tensor([1.0, -2.0, 0.5])
    worker.version = 7
    msg, loss = worker.message(point, closure)
    assert (msg.worker, msg.step, msg.version) == (2, 0, 7)
    assert torch.allclose(msg.vector, expected_grad(point, x))
    assert torch.equal(model.params, point) and torch.is_tensor(loss)
    assert faults.batch_calls == 1 and worker.step == 1
    msg, _ = worker.message(point, closure)
    assert msg.vector is None and msg.step == 1  # the message fault dropped step 1
    worker.step = 3
    assert worker.crashed()


def test_storm_worker_evaluates_the_previous_point_on_the_same_batch():
    model, worker, faults, x, closure = linear_setup(Storm(beta=0.5))
    p0, p1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    model.params.copy_(p0)
    worker.prev.copy_(p0)
    d0 = worker.message(model.params, closure)[0].vector.clone()
    assert torch.allclose(d0, expected_grad(p0, x))
    model.params.copy_(p1)  # a reply moved the worker to p1; the point is the model itself (MPI)
    worker.message(model.params, closure)  # step 1: dropped by the fault, but the rule still stepped
    assert torch.equal(model.params, p1) and torch.equal(worker.prev, p1)
    assert faults.batch_calls == 2  # one per step, although STORM evaluated twice at step 1


def test_worker_rules_plug_in_unchanged():
    for rule in (SendGradient(), HeavyBall(0.9), Storm()):
        model, worker, _, _, closure = linear_setup(rule)
        msg, _ = worker.message(model.params.clone(), closure)
        assert msg.vector.shape == (D,) and bool(torch.isfinite(msg.vector).all())


@pytest.mark.parametrize("with_buffers", [False, True])
def test_a_cloned_message_or_reply_owns_its_tensors_and_keeps_every_field(with_buffers):
    def buffers():
        return torch.ones(2) if with_buffers else None

    msg = Message(2, 5, 4, torch.zeros(D), buffers(), stop_request=True, refused="server 1's slice")
    reply = Reply(7, torch.zeros(D), buffers(), stop=True, hyper=(0.5,))
    copies = (msg.clone(), reply.clone())
    for original in (msg, reply):  # a transport reuses its receive buffer for the next message
        for t in (original.buffers, getattr(original, "vector", None), getattr(original, "params", None)):
            if t is not None:
                t.add_(1.0)
    assert (copies[0].worker, copies[0].step, copies[0].version, copies[0].stop_request,
            copies[0].refused) == (2, 5, 4, True, "server 1's slice")
    assert (copies[1].version, copies[1].stop, copies[1].hyper) == (7, True, (0.5,))
    assert copies[0].vector.eq(0).all() and copies[1].params.eq(0).all()
    for copy in copies:
        assert copy.buffers.eq(1).all() if with_buffers else copy.buffers is None


def test_fault_set_runs_every_fault_in_order():
    class Add(Fault):
        def __init__(self, k):
            self.k = k

        def on_worker_message(self, worker, step, vector):
            return vector * 10 + self.k

        def worker_delay(self, worker, step):
            return self.k

        def metrics(self):
            return {f"add{self.k}": 1.0}

    faults = FaultSet([Add(1), Add(2)])
    assert bool(faults) and not FaultSet()
    assert faults.message(1, 0, torch.zeros(1)).item() == 12.0
    assert faults.delay(1, 0) == 3 and faults.metrics() == {"add1": 1.0, "add2": 1.0}
    assert not faults.crashed(1, 0)
