"""``lfm`` (mmfast/methods/lfm.py): the alignment term against a float64 reference of the official
formula (KL from the mixture), a step's loss and gradients against a written-out reference, the
fitted schedule; the learned schedule's hyper-gradient against central finite differences of the
gradient, its update rule against the official one over scripted values, and in the trainer: the
held-out clips never train, the batch is theirs, batch norm's statistics are left alone
(peer-methods step-level test)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmfast
from mmfast.methods import lfm as lfm_mod
from mmfast.methods.lfm import FITTED_CURVE, alignment, fitted_weights
from mmfast.models.fusion import SumHead


def reference_alignment(logits):
    """Per sample, float64, one loop per sample and pair: (KL(r||p) + KL(r||q)) / 2, r = (p + q) / 2."""
    M, B, _ = logits.shape
    out = []
    for i in range(B):
        pairs = []
        for m, n in itertools.combinations(range(M), 2):
            p, q = (torch.softmax(logits[k, i].double(), 0) for k in (m, n))
            r = (p + q) / 2
            pairs.append(((r * (r / p).log()).sum() + (r * (r / q).log()).sum()) / 2)
        out.append(sum(pairs) / len(pairs))
    return torch.stack(out)


@pytest.mark.parametrize("M", [2, 3])
def test_alignment_is_the_official_kl_from_the_mixture(gen, M):
    logits = 3 * torch.randn(M, 9, 5, generator=gen)
    torch.testing.assert_close(alignment(logits).double(), reference_alignment(logits), rtol=1e-5, atol=1e-6)
    p, q = torch.softmax(logits[0], -1).double(), torch.softmax(logits[1], -1).double()
    js = ((p * (p / ((p + q) / 2)).log()).sum(-1) + (q * (q / ((p + q) / 2)).log()).sum(-1)) / 2
    if M == 2:  # (not the Jensen-Shannon divergence, whose KL runs the other way)
        assert not torch.allclose(alignment(logits).double(), js, rtol=1e-3)


def test_fitted_schedule_is_the_official_curve():
    for e in (0, 7, 60, 199):
        a_cls, a_al = fitted_weights(e)
        assert a_cls == pytest.approx(sum(c * e ** j for j, c in enumerate(FITTED_CURVE)))
        assert a_cls + a_al == pytest.approx(1.0)
    assert fitted_weights(0)[0] == pytest.approx(0.20462) and fitted_weights(200)[0] == pytest.approx(0.90252, abs=1e-5)
    stretched = mmfast.Balancer("lfm", {"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}, curve_epochs=20)
    stretched.start_epoch(10)  # (half of a 20-epoch run reads the curve at epoch 100)
    assert stretched.methods[0].a_cls == pytest.approx(fitted_weights(100)[0])
    stretched.start_epoch(25)  # (past the curve's end: held at its last value, inside [0, 1])
    assert stretched.methods[0].a_cls == pytest.approx(fitted_weights(200)[0])
    with pytest.raises(ValueError, match="lfm.schedule"):
        mmfast.Balancer("lfm", {"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}, schedule="hyper")
    with pytest.raises(ValueError, match="lfm.held_out_batch"):
        mmfast.Balancer("lfm", {"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}, schedule="learned",
                        held_out_clips=4, held_out_batch=5)


@pytest.mark.parametrize("epoch", [0, 30])
def test_lfm_step_loss_and_gradients_follow_the_formula(gen, epoch):
    torch.manual_seed(int(torch.randint(1 << 30, (), generator=gen)))
    encoders = {"audio": nn.Linear(7, 6), "visual": nn.Linear(4, 6)}
    head = SumHead([6, 6], 5)
    xs = [torch.randn(10, 7, generator=gen), torch.randn(10, 4, generator=gen)]
    y = torch.randint(0, 5, (10,), generator=gen)
    params = [p for m in (*encoders.values(), head) for p in m.parameters()]
    bal = mmfast.Balancer("lfm", encoders, head=head)
    bal.start_epoch(epoch)
    features = bal.drop([enc(x) for enc, x in zip(encoders.values(), xs)])
    fused, unimodal = head(features)
    bal.after_forward(unimodal, y, fused=fused)
    loss = bal.loss()
    grads = torch.autograd.grad(loss, params)
    # the reference, in float64 from the parameters
    a_cls = sum(c * epoch ** j for j, c in enumerate(FITTED_CURVE))
    dparams = [p.detach().double().requires_grad_() for p in params]
    wa, ba, wv, bv, w0, b0, w1, b1 = dparams
    o = torch.stack([(xs[0].double() @ wa.T + ba) @ w0.T + b0, (xs[1].double() @ wv.T + bv) @ w1.T + b1])
    ce = F.cross_entropy(o.mean(0), y, reduction="none")
    expected = (2 * (a_cls * ce + (1 - a_cls) * reference_alignment(o))).mean()
    expected_grads = torch.autograd.grad(expected, dparams)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)
    assert math.isclose(float(bal.state.metrics["lfm/a_cls"]), a_cls, rel_tol=1e-6)


def small_model(gen, dtype=torch.float64):
    """Two encoders (a linear layer and a tanh: the Hessian is not block-diagonal) and a sum head."""
    torch.manual_seed(int(torch.randint(1 << 30, (), generator=gen)))
    encoders = nn.ModuleDict({"audio": nn.Sequential(nn.Linear(5, 4), nn.Tanh()),
                              "visual": nn.Sequential(nn.Linear(3, 4), nn.Tanh())}).to(dtype)
    head = SumHead([4, 4], 3).to(dtype)
    return encoders, head


def forward_of(encoders, head):
    def forward(inputs, train):
        features = [encoders[m](inputs[m]) for m in ("audio", "visual")]
        return head(features)[0], head.split_logits(features)
    return forward


def test_hypergradient_is_the_hessian_vector_product_of_the_first_tensor(gen):
    encoders, head = small_model(gen)
    params = [*encoders.parameters(), *head.parameters()]
    inputs = {"audio": torch.randn(6, 5, generator=gen, dtype=torch.float64),
              "visual": torch.randn(6, 3, generator=gen, dtype=torch.float64)}
    y = torch.randint(0, 3, (6,), generator=gen)
    a_cls = float(torch.rand((), generator=gen))
    forward = forward_of(encoders, head)

    def losses():
        o = forward(inputs, False)[1]
        ce = F.cross_entropy(o.mean(0), y)
        return ce, a_cls * ce + (1 - a_cls) * reference_alignment(o).mean()

    delta = lfm_mod.hypergradient(forward(inputs, False)[1], y, params, a_cls, 1 - a_cls)
    # reference: v = dCE/dtheta; the product H(L_tot) v by central differences of grad L_tot
    v = [g.detach() for g in torch.autograd.grad(losses()[0], params)]
    eps = 1e-5
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(eps * d)
    plus = torch.autograd.grad(losses()[1], params[0])[0]
    with torch.no_grad():
        for p, d in zip(params, v):
            p.sub_(2 * eps * d)
    minus = torch.autograd.grad(losses()[1], params[0])[0]
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(eps * d)
    expected = ((plus - minus) / (2 * eps)).mean()
    assert float(delta) == pytest.approx(float(expected), rel=1e-5, abs=1e-9)
    # the first tensor in the order given: another order reads another block
    other = lfm_mod.hypergradient(forward(inputs, False)[1], y, params[1:] + params[:1], a_cls, 1 - a_cls)
    assert not math.isclose(float(other), float(delta), rel_tol=1e-3)


def test_learned_schedule_follows_the_official_update(gen, monkeypatch):
    """Scripted hyper-gradients: the official rule, a_al -= lr * delta clipped to [0.05, 0.95], lr
    halving at epochs 20, 40, ... (from 1e-4; (a_cls, a_al) from (0.05, 0.95)); the forward in
    training mode at the first epoch only; the steps use the weights of their epoch."""
    deltas = (torch.randn(50, generator=gen, dtype=torch.float64) * 400).tolist()
    deltas[3], deltas[4] = 5e4, -5e4  # (both clips)
    calls = []
    monkeypatch.setattr(lfm_mod, "hypergradient", lambda o, y, params, a_cls, a_al: torch.tensor(deltas[len(calls) - 1], dtype=torch.float64))
    encoders, head = small_model(gen, torch.float32)
    bal = mmfast.Balancer("lfm", dict(encoders), head=head, schedule="learned")
    assert bal.held_out() == mmfast.methods.HeldOut(16, 8)
    inputs = {"audio": torch.randn(4, 5), "visual": torch.randn(4, 3)}
    y = torch.randint(0, 3, (4,), generator=gen)

    def forward(x, train):
        calls.append(train)
        return forward_of(encoders, head)(x, train)

    a_al, lr = 0.95, 1e-4  # the official loop, written out
    for epoch in range(50):
        if epoch % 20 == 0 and epoch != 0:
            lr = lr / 2
        a_al = max(0.05, min(0.95, a_al - lr * deltas[epoch]))
        bal.observe_held_out(inputs, y, forward=forward, parameters=list(head.parameters()), epoch=epoch)
        bal.start_epoch(epoch)
        method = bal.methods[0]
        assert float(method.a_al) == pytest.approx(a_al, abs=1e-12) and float(method.a_cls) == pytest.approx(1 - a_al)
        if epoch in (3, 4):
            assert float(method.a_al) == (0.95 if epoch == 4 else 0.05)
        features = bal.drop([encoders[m](inputs[m]) for m in ("audio", "visual")])
        fused, unimodal = head(features)
        bal.after_forward(unimodal, y, fused=fused)
        o = head.split_logits(features).detach().double()
        expected = (2 * ((1 - a_al) * F.cross_entropy(o.mean(0), y, reduction="none")
                         + a_al * reference_alignment(o))).mean()
        assert float(bal.loss().detach()) == pytest.approx(float(expected), rel=1e-5)
    assert calls == [True] + [False] * 49
    # the weights are the method's state
    state = bal.state_dict()
    again = mmfast.Balancer("lfm", dict(encoders), head=head, schedule="learned")
    again.load_state_dict(state)
    assert float(again.methods[0].a_cls) == float(bal.methods[0].a_cls)


def test_trainer_holds_the_clips_out_and_leaves_batch_norm_alone(tmp_path, gen):
    """The trainer: the held-out clips never reach a training step, the batch handed over is the
    first of them through the training transforms with epoch 0's draws, batch norm's running
    statistics are those training alone gives, the weights move by the formula from the batch."""
    from mmfast.data import generate
    from mmfast.data.base import held_out_positions
    from mmfast.trainer import Trainer
    from support import small_run_config

    dataset = generate(tmp_path / "data", clips=30, seed=3)
    # (from the middle with a large rate: the weight moves visibly and unclipped either way)
    cfg = small_run_config(dataset, tmp_path / "run", "method=lfm", "hparams.schedule=learned",
                           "hparams.held_out_clips=4", "hparams.held_out_batch=3", "hparams.initial_a_cls=0.5",
                           "hparams.alpha_lr=1.0")
    trainer = Trainer(cfg)
    loader = trainer.loaders["train"]
    held = held_out_positions(cfg.seed, len(loader.base_clips), 4)
    assert sorted(loader.held_out.tolist()) == sorted(held.tolist()) and len(held) == 4
    seen, handed = [], []
    original_step, original_observe = trainer.train_step, trainer.balancer.observe_held_out

    def step(batch, **kw):
        seen.extend(batch["index"].tolist())
        return original_step(batch, **kw)

    def observe(inputs, labels, *, forward, parameters, epoch):
        a_cls, a_al = trainer.balancer.methods[0].a_cls.clone(), trainer.balancer.methods[0].a_al.clone()
        assert parameters[0] is next(trainer.model.encoders[trainer.model.modalities[0]].parameters())
        _, o = forward(inputs, epoch == 0)
        assert o.dtype == torch.float32 and o.requires_grad
        expected = lfm_mod.hypergradient(o, labels, parameters, a_cls, a_al)
        handed.append((epoch, {k: v.clone() for k, v in inputs.items()}, labels.clone(), float(expected),
                       float(a_al)))
        original_observe(inputs, labels, forward=forward, parameters=parameters, epoch=epoch)

    original_event = trainer._held_out_for_methods

    def event(epoch):
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        original_event(epoch)
        # nothing of the model changed: the forward with the batch's statistics put the running ones back
        for key, value in trainer.model.state_dict().items():
            assert torch.equal(value, before[key]), key

    trainer.train_step, trainer.balancer.observe_held_out, trainer._held_out_for_methods = step, observe, event
    trainer.fit()
    assert not set(seen) & set(held.tolist())
    assert sorted(seen) == sorted(list(set(range(len(loader.base_clips))) - set(held.tolist())) * 2)  # (two epochs)
    assert [e for e, *_ in handed] == [0, 1]
    batch = loader.decode(held[:3], epoch=0)
    for _, inputs, labels, _, _ in handed:
        assert torch.equal(labels, batch["label"])
        for m in trainer.modalities:
            assert torch.equal(inputs[m], batch[m])
    (_, _, _, delta0, a_al0), (_, _, _, delta1, a_al1) = handed
    assert delta0 != 0 and delta1 != 0
    assert a_al0 == 0.5 and a_al1 == pytest.approx(0.5 - delta0, abs=1e-9) and abs(a_al1 - 0.5) > 1e-4
    assert float(trainer.balancer.methods[0].a_al) == pytest.approx(a_al1 - delta1, abs=1e-9)
    with pytest.raises(ValueError, match="holds out 40 training clips"):
        Trainer(small_run_config(dataset, tmp_path / "too_many", "method=lfm", "hparams.schedule=learned",
                                 "hparams.held_out_clips=40"))
    with pytest.raises(ValueError, match="compile=false"):
        Trainer(small_run_config(dataset, tmp_path / "compiled", "method=lfm", "hparams.schedule=learned",
                                 "hparams.held_out_clips=4", "hparams.held_out_batch=2", "compile=true"))


def test_loaders_leave_held_out_clips_out_and_decode_them_alone(tmp_path, gen):
    """Both backends (and the decoded-sample cache): held-out clips (and their copies) leave the
    plan while every other clip keeps its draws; decode gives chosen clips as the pass of that
    epoch would, and leaves the loader's pass state alone."""
    import numpy as np

    from mmfast.data import build_loader, generate
    from mmfast.trainer import data_config
    from support import small_run_config

    dataset = generate(tmp_path / "data", clips=30, seed=5)
    rows = None
    for backend, cache in (("dali", "off"), ("naive", "off"), ("dali", str(tmp_path / "cache"))):
        cfg = small_run_config(dataset, "unused", f"data.cache={cache}")
        loader = build_loader(data_config(cfg, torch.device("cpu")), "train", backend)
        N = len(loader.base_clips)
        rows = torch.randperm(N, generator=gen)[:5].numpy() if rows is None else rows
        loader.epoch = 2
        batches = list(loader.batches())
        full = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        loader.set_copies(np.array([[1, 0], [0, 2]]), index=[int(rows[0]), (set(range(N)) - set(rows.tolist())).pop()])
        loader.set_held_out(rows[:3])
        loader.epoch = 2
        assert len(loader) == -(-(N - 3 + 2) // 8)
        batches = list(loader.batches())
        held = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        assert not set(held["index"].tolist()) & set(rows[:3].tolist())  # (rows[0]'s copy left too)
        assert len(held["index"]) == N - 3 + 2
        whole = held["keep"].all(dim=1)
        for i, clip in enumerate(held["index"][whole].tolist()):  # the clips keep their draws
            j = (full["index"] == clip).nonzero().item()
            for m in ("audio", "visual"):
                assert torch.equal(held[m][whole][i], full[m][j]), (backend, clip, m)
        loader.set_copies(None)
        state = (loader.epoch, loader.position, len(loader))
        decoded = loader.decode(rows[[3, 1]], epoch=2)
        assert (loader.epoch, loader.position, len(loader)) == state
        for i, clip in enumerate(rows[[3, 1]].tolist()):
            j = (full["index"] == clip).nonzero().item()
            assert int(decoded["label"][i]) == int(full["label"][j])
            for m in ("audio", "visual"):
                assert torch.equal(decoded[m][i], full[m][j]), (backend, clip, m)
    with pytest.raises(ValueError, match="distinct positions"):
        loader.set_held_out([0, 0])
    with pytest.raises(ValueError, match="distinct positions"):
        loader.set_held_out([N])
    with pytest.raises(ValueError, match="leaves none to train on"):
        loader.set_held_out(np.arange(N))
    with pytest.raises(ValueError, match="decode needs clip positions"):
        loader.decode([], epoch=0)
