"""OLM and sustained boosting (mmfast.methods.olm / boost): their step semantics against slow
references of the formulas, through the Balancer of a user's own loop; classifiers added by ACA
join the optimizer and train; resuming across an addition; and the trainer's handling of the
per-head validation losses (initial losses once, whole training epochs, the test split)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmfast
from support import no_device_sync, requires_cuda
from mmfast.methods.boost import aca_assignment
from mmfast.methods.olm import gc_factors
from mmfast.models import BoostedClassifiers, LateHeads

C = 5


class Encoder(nn.Module):
    def __init__(self, d_in, d_out=6):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def make_net(head_cls, seed=0):
    torch.manual_seed(seed)
    encoders = {"audio": Encoder(7), "visual": Encoder(4)}
    head = head_cls([6, 6], C)
    return encoders, head


def batch(gen, B=10):
    return torch.randn(B, 7, generator=gen), torch.randn(B, 4, generator=gen), torch.randint(0, C, (B,), generator=gen)


def forward(bal, encoders, head, x, part=None):
    features = bal.drop([encoders["audio"](x[0]), encoders["visual"](x[1])], part=part)
    fused, unimodal, *extra = head(features)
    bal.after_forward(unimodal, x[2], fused=fused, extras=extra[0] if extra else None)
    return fused, unimodal, (extra[0] if extra else {})


def train_step(bal, encoders, head, opt, x):
    """One training step of a method that computes its task loss (a sub-step per update part)."""
    for part in bal.update_parts():
        forward(bal, encoders, head, x, part=part)
        opt.zero_grad()
        bal.loss().backward()
        bal.after_backward()
        opt.step()
        bal.after_step()


# ---- OLM ---------------------------------------------------------------------------------------


def reference_olm(z_steps, labels_steps, lr, variant, normalize=True, optimizer="adam"):
    """Slow OLM over several steps: python loops over heads and samples, Adam (or the paper's
    plain gradient descent) written out."""
    H = z_steps[0].shape[0]
    w, m, v = [1.0] * H, [0.0] * H, [0.0] * H
    initial = None
    losses_out = []
    for t, (z, y) in enumerate(zip(z_steps, labels_steps), start=1):
        B = z.shape[1]
        per_head = []
        for h in range(H):
            total = 0.0
            for i in range(B):
                row = [w[h] * float(z[h, i, c]) for c in range(C)]
                mx = max(row)
                total += -(row[int(y[i])] - mx - math.log(sum(math.exp(r - mx) for r in row)))
            per_head.append(total / B)
        losses_out.append(sum(per_head))
        if variant == "loss_ratio":
            initial = initial or list(per_head)
            r = [per_head[h] / initial[h] for h in range(H)]
            lam = [x / sum(r) for x in r]
        else:
            lam = [1.0 / H] * H
        norms = [sum(math.sqrt(sum(float(z[h, i, c]) ** 2 for c in range(C))) for i in range(B)) / B
                 for h in range(H)]
        s_bar = sum(w[h] * norms[h] for h in range(H)) / H
        scale = H if normalize else 1
        for h in range(H):
            g = math.copysign(norms[h], w[h] * norms[h] - scale * lam[h] * s_bar)
            if optimizer == "sgd":  # Alg. 1: w <- w - eta dL_logit/dw
                step = lr * g
            else:
                m[h] = 0.9 * m[h] + 0.1 * g
                v[h] = 0.999 * v[h] + 0.001 * g * g
                step = lr * (m[h] / (1 - 0.9 ** t)) / (math.sqrt(v[h] / (1 - 0.999 ** t)) + 1e-8)
            w[h] = max(w[h] - step, 0.01)
    return losses_out, w


@pytest.mark.parametrize("variant,normalize,optimizer", [("loss_ratio", True, "adam"), ("loss_ratio", False, "adam"),
                                                         ("gc", True, "adam"), ("loss_ratio", True, "sgd")])
def test_olm_task_loss_and_coefficients_follow_the_formulas(variant, normalize, optimizer):
    gen = torch.Generator().manual_seed(1)
    encoders, head = make_net(LateHeads)
    lr = 0.05
    bal = mmfast.Balancer("olm", encoders, head=head, variant=variant, lr=lr, normalize_lambda=normalize,
                          w_optimizer=optimizer)
    if variant == "gc":
        bal.observe_head_losses(torch.tensor([1.6, 1.5, 1.55]), torch.tensor([1.6, 1.6, 1.6]), epoch=None)
    params = [p for e in encoders.values() for p in e.parameters()] + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    z_steps, y_steps, losses = [], [], []
    for _ in range(3):
        x = batch(gen)
        fused, unimodal, _ = forward(bal, encoders, head, x)
        z_steps.append(torch.cat([unimodal, fused[None]]).detach().double())
        y_steps.append(x[2])
        loss = bal.loss()
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        bal.after_backward()
        opt.step()
        bal.after_step()
    expected_losses, expected_w = reference_olm(z_steps, y_steps, lr, variant, normalize, optimizer)
    assert losses == pytest.approx(expected_losses, rel=1e-5)
    assert bal.methods[0].w.tolist() == pytest.approx(expected_w, rel=1e-5)


def test_olm_gc_factors_follow_eq_6_to_8():
    val0, train0 = torch.tensor([1.7, 1.6, 1.65]), torch.tensor([1.7, 1.7, 1.7])
    val, train = torch.tensor([1.2, 1.5, 1.1]), torch.tensor([0.5, 1.2, 0.6])
    got = gc_factors(val0, train0, val, train)
    ratio = []
    for h in range(3):
        G = abs(float(val0[h]) - float(val[h]))
        Cn = abs(abs(float(val[h]) - float(train[h])) - abs(float(val0[h]) - float(train0[h])))
        ratio.append(G / Cn)
    expected = [math.exp(r) / sum(math.exp(x) for x in ratio) for r in ratio]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    encoders, head = make_net(LateHeads)
    bal = mmfast.Balancer("olm", encoders, head=head)
    assert bal.evaluations(None) == bal.evaluations(0) == ("val", "train")
    bal.observe_head_losses(val0, train0, epoch=None)
    bal.observe_head_losses(val, train, epoch=0)
    assert torch.allclose(bal.methods[0].lam, got)
    bal.observe_head_losses(val * 0.5, train, epoch=1)  # the initial losses stay those measured first
    assert torch.allclose(bal.methods[0].lam, gc_factors(val0, train0, val * 0.5, train))


def test_olm_takes_its_head_losses_from_the_evaluations_it_asks_for(gen):
    """Handed whole splits (Balancer.observe_evaluation), OLM's factors are gc_factors of each
    head's mean cross-entropy, computed here sample by sample; one split alone changes nothing.
    float64 logits (kept as float64): eq. 8 divides by a difference of loss gaps, so float32
    rounding of the losses can move the factors by ~1e-4 on random splits."""
    def split(N=9):
        return (torch.randn(N, C, generator=gen, dtype=torch.float64),
                torch.randn(2, N, C, generator=gen, dtype=torch.float64), torch.randint(0, C, (N,), generator=gen))

    def head_losses(fused, unimodal, labels):
        heads = [*unimodal, fused]
        return torch.tensor([sum(float(F.cross_entropy(z[i:i + 1], labels[i:i + 1])) for i in range(len(labels)))
                             / len(labels) for z in heads], dtype=torch.float64)

    encoders, head = make_net(LateHeads)
    bal = mmfast.Balancer("olm", encoders, head=head)
    splits = {(epoch, name): split() for epoch in (None, 0) for name in ("val", "train")}
    for (epoch, name), (fused, unimodal, labels) in splits.items():
        before = bal.methods[0].lam.clone()
        bal.observe_evaluation(name, fused, unimodal, labels, epoch=epoch)
        if name == "val":
            assert torch.equal(bal.methods[0].lam, before)  # (waits for the epoch's train split)
    expected = gc_factors(*(head_losses(*splits[key]) for key in ((None, "val"), (None, "train"), (0, "val"),
                                                                  (0, "train"))))
    torch.testing.assert_close(bal.methods[0].lam, expected, rtol=1e-9, atol=1e-12)


def test_olm_tempered_factors_and_the_collapse_warning():
    """lambda_form="normalized": softmax(r / sum(r)), r = G / C. With one head whose dev-train
    gap barely moved (C near 0) the literal eq. 8 gives it every factor (entropy ~0) and training
    drives the other heads' coefficients to the floor, which the method warns about at the epoch
    end; the tempered form keeps every head in play."""
    val0, train0 = torch.tensor([1.7, 1.6, 1.65]), torch.tensor([1.7, 1.7, 1.7])
    val, train = torch.tensor([1.2, 1.5, 1.1]), torch.tensor([0.5, 1.4001, 0.6])  # visual: C = 1e-4
    ratio = []
    for h in range(3):
        G = abs(float(val0[h]) - float(val[h]))
        Cn = abs(abs(float(val[h]) - float(train[h])) - abs(float(val0[h]) - float(train0[h])))
        ratio.append(G / max(Cn, 1e-6))
    total = sum(ratio)
    expected = [math.exp(r / total) / sum(math.exp(x / total) for x in ratio) for r in ratio]
    tempered = gc_factors(val0, train0, val, train, form="normalized")
    assert tempered.tolist() == pytest.approx(expected, rel=1e-4)
    gen = torch.Generator().manual_seed(2)
    for form in ("softmax", "normalized"):
        encoders, head = make_net(LateHeads)
        bal = mmfast.Balancer("olm", encoders, head=head, lr=0.2, lambda_form=form)
        bal.observe_head_losses(val0, train0, epoch=None)
        bal.observe_head_losses(val, train, epoch=0)
        bal.start_epoch(1)
        for _ in range(30):
            forward(bal, encoders, head, batch(gen))
            bal.loss().backward()
            bal.after_backward()
            bal.after_step()
        entropy = float(bal.metrics["olm/lambda_entropy"])
        if form == "softmax":
            assert entropy < 0.01
            with pytest.warns(RuntimeWarning) as caught:
                bal.end_epoch()
            messages = [str(w.message) for w in caught]
            assert any("collapsed onto the 'visual' head" in m for m in messages), messages
            assert any("['audio', 'fused'] reached the floor" in m for m in messages), messages
        else:
            assert entropy > 0.5
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("error")
                bal.end_epoch()


def test_olm_needs_its_heads_and_the_initial_losses():
    encoders, head = make_net(LateHeads)
    with pytest.raises(ValueError, match="model.fusion=late or irfb"):
        mmfast.Balancer("olm", encoders)
    bal = mmfast.Balancer("olm", encoders, head=head)
    x = batch(torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="observe_head_losses"):
        forward(bal, encoders, head, x)
    with pytest.raises(ValueError, match=r"val must be a tensor \[3\]"):
        bal.observe_head_losses(torch.ones(2), torch.ones(3), epoch=None)
    bal.observe_head_losses(torch.ones(3), torch.ones(3), epoch=None)
    forward(bal, encoders, head, x)
    with pytest.raises(ValueError, match="without a per-sample loss"):
        bal.loss(torch.ones(10))


# ---- boost -------------------------------------------------------------------------------------


def reference_boost_loss(classifiers, omega, labels, lam, trained):
    """Per sample, with the residual label written as a vector y - lam sum_j y (.) p_j."""
    total = 0.0
    B = labels.shape[0]
    for r in trained:
        z = classifiers[r].double() * float(omega[r])
        n = z.shape[0]
        loss_r = 0.0
        for i in range(B):
            y = torch.zeros(C, dtype=torch.float64)
            y[int(labels[i])] = 1.0
            residual = y.clone()
            for j in range(n - 1):
                residual -= lam * y * torch.softmax(z[j, i], dim=0)
            residual = residual.clamp_min(0.0)  # (the paper: residual labels are non-negative)
            log_p = torch.log_softmax(z[n - 1, i], dim=0)
            eps = -(residual * log_p).sum()
            eps_o = -torch.log_softmax(z[:, i].sum(dim=0), dim=0)[int(labels[i])]
            eps_p = -torch.log_softmax(z[: n - 1, i].sum(dim=0), dim=0)[int(labels[i])] if n > 1 else 0.0
            loss_r += float(eps + eps_o + eps_p)
        total += loss_r / B
    return total


@pytest.mark.parametrize("update", ["joint", "alternating"])
def test_boost_loss_follows_the_formulas(update):
    gen = torch.Generator().manual_seed(2)
    encoders, head = make_net(BoostedClassifiers)
    head.add_classifier(1)
    head.add_classifier(1)
    head.omega.copy_(torch.tensor([0.7, 0.4]))
    bal = mmfast.Balancer("boost", encoders, head=head, lam=0.3, update=update)
    x = batch(gen)
    parts = bal.update_parts()
    assert parts == ([None] if update == "joint" else [("audio",), ("visual",)])
    for part in parts:
        _, _, extra = forward(bal, encoders, head, x, part=part)
        trained = [0, 1] if part is None else [["audio", "visual"].index(part[0])]
        expected = reference_boost_loss([z.detach() for z in extra["classifiers"]], head.omega, x[2], 0.3, trained)
        assert float(bal.loss().detach()) == pytest.approx(expected, rel=1e-5)
        bal.after_backward()


def test_boost_inference_is_the_weighted_sum_of_every_classifier():
    encoders, head = make_net(BoostedClassifiers)
    head.add_classifier(0)
    head.fusion_weights.copy_(torch.tensor([0.3, 0.9]))
    features = [torch.randn(4, 6), torch.randn(4, 6)]
    fused, unimodal, extra = head(features)
    per = [[head.head(c(f)) for c in cs] for cs, f in zip(head.classifiers, features)]
    assert len(per[0]) == 2 and len(per[1]) == 1
    assert torch.allclose(unimodal[0], per[0][0] + per[0][1]) and torch.allclose(unimodal[1], per[1][0])
    assert torch.allclose(fused, 0.3 * unimodal[0] + 0.9 * unimodal[1], atol=1e-6)


@pytest.mark.parametrize("scores,sigma,tau,expected", [
    ([0.8, 0.5], 1.0, 0.01, 1), ([0.5, 0.8], 1.0, 0.01, 0), ([0.505, 0.5], 1.0, 0.01, None),
    ([0.8, 0.7], 1.2, 0.01, None), ([0.6, 0.3, 0.5], 1.0, 0.01, 1),
])
def test_aca_assigns_to_the_weaker_modality_outside_the_dead_zone(scores, sigma, tau, expected):
    assert aca_assignment(scores, sigma, tau, "weakest") == expected


@pytest.mark.parametrize("scores,sigma,expected_paper,expected_dead_zone", [
    ([0.8, 0.5], 1.0, 1, 1), ([0.5, 0.8], 1.0, 0, 0), ([0.505, 0.5], 1.0, 0, None), ([0.8, 0.7], 1.2, 0, 0), ([0.8, 0.665], 1.2, 0, None),
    ([0.9, 0.5], 1.5, 1, 1), ([0.7, 0.5], 1.5, 0, 0)])
def test_aca_rules_as_the_paper_writes_them(scores, sigma, expected_paper, expected_dead_zone):
    """The paper (two modalities a, v): s_a - sigma s_v > tau gives v a classifier, < tau gives a
    one; the dead-zone reading gives a one only below -tau."""
    tau = 0.01
    lead = scores[0] - sigma * scores[1]
    assert expected_paper == (1 if lead > tau else 0)  # (the cases, checked against the text)
    assert aca_assignment(scores, sigma, tau, "paper") == expected_paper
    assert aca_assignment(scores, sigma, tau, "dead_zone") == expected_dead_zone
    with pytest.raises(ValueError, match="two modalities"):
        aca_assignment([0.1, 0.2, 0.3], sigma, tau, "paper")


def test_aca_score_is_the_mean_true_class_sum_of_the_classifiers_probabilities():
    """s^r = mean_i y_i . sum_t p_t^r(x_i), p the softmax of each classifier (the paper); the
    'logits' option takes the softmax of the summed logits."""
    gen = torch.Generator().manual_seed(9)
    encoders, head = make_net(BoostedClassifiers)
    head.add_classifier(1)
    head.add_classifier(1)
    results = {}
    for score in ("probabilities", "logits"):
        bal = mmfast.Balancer("boost", encoders, head=head, optimizer=torch.optim.SGD(head.parameters(), lr=0.0),
                              aca_score=score)
        x = batch(gen)
        bal.start_epoch(0)
        forward(bal, encoders, head, x)
        features = [e(v) for e, v in zip(encoders.values(), x[:2])]
        with torch.no_grad():
            z = [torch.stack([head.head(c(f)) for c in cs]).double() for cs, f in zip(head.classifiers, features)]
        y = x[2]
        if score == "probabilities":
            expected = [float(sum(torch.softmax(zt, 1)[i, y[i]] for zt in zr for i in range(len(y)))) for zr in z]
        else:
            expected = [float(sum(torch.softmax(zr.sum(0), 1)[i, y[i]] for i in range(len(y)))) for zr in z]
        results[score] = bal.methods[0]._score_sum.tolist()
        assert results[score] == pytest.approx(expected, rel=1e-5)
    assert results["probabilities"][1] > len(x[2]) * 0.3  # (three classifiers: the sum exceeds one softmax's)


def test_an_added_classifier_joins_the_optimizer_and_trains():
    """ACA at an epoch end adds a classifier to the weaker modality; it joins the optimizer with
    the scheduler's current learning rate and its parameters change at the next step; omega is
    refit towards the weaker modality's indicator."""
    gen = torch.Generator().manual_seed(3)
    encoders, head = make_net(BoostedClassifiers)
    params = [p for e in encoders.values() for p in e.parameters()] + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    bal = mmfast.Balancer("boost", encoders, head=head, optimizer=opt, scheduler=sched, interval=1, tau=0.0)
    x = batch(gen)
    bal.start_epoch(0)
    forward(bal, encoders, head, x)
    # make the visual scores the weaker: the scores the method accumulated
    bal.methods[0]._score_sum.copy_(torch.tensor([8.0, 3.0]))
    bal.methods[0]._score_count.copy_(torch.tensor([10.0, 10.0]))
    opt.zero_grad()
    bal.loss().backward()
    bal.after_backward()
    opt.step()
    sched.step()  # lr 0.05 now
    bal.end_epoch()
    assert head.counts() == [1, 2] and len(opt.param_groups) == 2
    assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"] == 0.05
    assert opt.param_groups[1]["momentum"] == 0.9 and opt.param_groups[1]["initial_lr"] == 0.1
    assert float(head.omega[1]) > float(head.omega[0])  # omega leans to the weaker modality
    new = [p.detach().clone() for p in head.classifiers[1][1].parameters()]
    bal.start_epoch(1)
    forward(bal, encoders, head, batch(gen))
    opt.zero_grad()
    bal.loss().backward()
    bal.after_backward()
    opt.step()
    sched.step()
    assert all(not torch.equal(a, b) for a, b in zip(new, head.classifiers[1][1].parameters()))
    assert sched.get_last_lr() == [0.025, 0.025]


def test_alternating_parts_train_one_modality_each():
    gen = torch.Generator().manual_seed(4)
    encoders, head = make_net(BoostedClassifiers)
    params = [p for e in encoders.values() for p in e.parameters()] + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    bal = mmfast.Balancer("boost", encoders, head=head, update="alternating")
    x = batch(gen)
    for part in bal.update_parts():
        before = {n: p.detach().clone() for n, e in encoders.items() for p in [e.fc.weight]}
        forward(bal, encoders, head, x, part=part)
        opt.zero_grad(set_to_none=True)
        bal.loss().backward()
        bal.after_backward()
        opt.step()
        for name, e in encoders.items():
            assert torch.equal(before[name], e.fc.weight) == (name not in part), (part, name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_boost_steps_read_nothing_on_the_host_and_olm_neither(device):
    """No host read in any step; on a GPU no synchronisation after the first (warm-up) step."""
    from mmfast.diagnostics import count_host_reads

    gen = torch.Generator().manual_seed(5)
    for name, head_cls, kw in (("olm", LateHeads, {"variant": "loss_ratio"}), ("olm", LateHeads, {}),
                               ("boost", BoostedClassifiers, {}), ("boost", BoostedClassifiers,
                                                                   {"update": "alternating"})):
        encoders, head = make_net(head_cls)
        encoders, head = {m: e.to(device) for m, e in encoders.items()}, head.to(device)
        params = [p for e in encoders.values() for p in e.parameters()] + list(head.parameters())
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        bal = mmfast.Balancer(name, encoders, head=head, optimizer=opt, **kw)
        if bal.evaluations(None):
            bal.observe_head_losses(torch.ones(3), torch.ones(3) * 0.9, epoch=None)
        for i in range(3):
            x = [t.to(device) for t in batch(gen)]
            with count_host_reads() as counts, no_device_sync(device if i else "cpu"):
                train_step(bal, encoders, head, opt, x)
            assert counts == {}, (name, kw, counts)


def test_boost_head_resizes_to_a_state_dict_with_other_classifier_counts():
    _, grown = make_net(BoostedClassifiers, seed=1)
    grown.add_classifier(1)
    grown.add_classifier(0)
    grown.add_classifier(1)
    grown.omega.fill_(0.25)
    _, fresh = make_net(BoostedClassifiers, seed=2)
    fresh.load_state_dict(grown.state_dict())
    assert fresh.counts() == [2, 3] and fresh.added == [1, 0, 1]
    a, b = fresh.state_dict(), grown.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if not k.endswith("_extra_state"))
    _, small = make_net(BoostedClassifiers, seed=3)
    grown.load_state_dict(small.state_dict())  # back to one classifier each (a best epoch before any addition)
    assert grown.counts() == [1, 1] and grown.added == []
    groups = fresh.added_parameter_groups()
    assert [len(g) for g in groups] == [2, 2, 2] and groups[1][0] is fresh.classifiers[0][1][0].weight


def test_a_users_loop_restores_boost_with_its_added_classifiers(gen):
    """Restore order model -> Balancer -> optimizer: the classifiers boost added rejoin the
    optimizer in Balancer.load_state_dict (the state_loaded event), so the optimizer's saved
    state (momentum of every group) loads, and parameter_version tells a DDP wrapper to rebuild."""
    def build(seed):
        encoders, head = make_net(BoostedClassifiers, seed=seed)
        params = [p for e in encoders.values() for p in e.parameters()] + list(head.parameters())
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        return encoders, head, opt, mmfast.Balancer("boost", encoders, head=head, optimizer=opt, interval=1, tau=0.0)

    encoders, head, opt, bal = build(1)
    versions = [bal.parameter_version]
    for epoch in range(2):
        bal.start_epoch(epoch)
        train_step(bal, encoders, head, opt, batch(gen))
        bal.end_epoch()
        versions.append(bal.parameter_version)
    assert sum(head.counts()) == 4 and versions == [0, 1, 2] and len(opt.param_groups) == 3
    saved = {"encoders": {k: e.state_dict() for k, e in encoders.items()}, "head": head.state_dict(),
             "balancer": bal.state_dict(), "optimizer": opt.state_dict()}
    encoders2, head2, opt2, bal2 = build(2)
    for k, e in encoders2.items():
        e.load_state_dict(saved["encoders"][k])
    head2.load_state_dict(saved["head"])
    bal2.load_state_dict(saved["balancer"])
    assert len(opt2.param_groups) == 3 and bal2.parameter_version == 2
    opt2.load_state_dict(saved["optimizer"])
    trained = 0
    for p1, p2 in zip([p for g in opt.param_groups for p in g["params"]], [p for g in opt2.param_groups for p in g["params"]]):
        assert torch.equal(p1, p2) and opt.state[p1].keys() == opt2.state[p2].keys()
        if "momentum_buffer" in opt.state[p1]:
            trained += 1
            assert torch.equal(opt.state[p1]["momentum_buffer"], opt2.state[p2]["momentum_buffer"])
    assert trained > len(list(head.parameters())) // 2  # (the first added classifier has trained: its group too)


# ---- through the trainer -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mmfast.data import generate

    pytest.importorskip("nvidia.dali")
    return generate(tmp_path_factory.mktemp("olm_boost") / "cremad", clips=30, seed=4)


def make_config(dataset, out, *overrides):
    from mmfast.config import load_config

    return load_config("embedded", [f"data.root={dataset}", f"out={out}", "epochs=2", "data.batch_size=8",
                                    "data.size=32", "data.num_workers=1", "progress=false", "precision=fp32", *overrides])


def test_resume_across_a_classifier_addition_gives_the_same_run(dataset, tmp_path):
    from mmfast.trainer import Trainer, resume

    hp = ["method=boost", "hparams.interval=1", "hparams.tau=0.0", "optim.scheduler=step", "optim.step_size=1"]
    full = Trainer(make_config(dataset, tmp_path / "full", *hp))
    full.fit()
    killed = Trainer(make_config(dataset, tmp_path / "killed", *hp))
    assert killed.fit(max_steps=4) is None  # 3 steps an epoch: stopped after epoch 0's ACA
    assert sum(killed.model.fusion.counts()) == 3 and len(killed.optimizer.param_groups) == 2
    resumed = resume(tmp_path / "killed")
    assert sum(resumed.model.fusion.counts()) == 3 and len(resumed.optimizer.param_groups) == 2
    resumed.fit()
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys() and len(a["model"]) > len(full.model.state_dict()) - 1
    for key in a["model"]:
        if key.endswith("_extra_state"):
            assert a["model"][key] == b["model"][key]
        else:
            assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["balancer"]["methods"][0]["assignments"] == b["balancer"]["methods"][0]["assignments"]


def test_olm_measures_the_initial_losses_once_trains_whole_epochs_and_tests(dataset, tmp_path, monkeypatch):
    from mmfast.trainer import Trainer

    trainer = Trainer(make_config(dataset, tmp_path / "olm", "method=olm", "epochs=2"))
    seen = []
    original = trainer.balancer.observe_evaluation
    monkeypatch.setattr(trainer.balancer, "observe_evaluation",
                        lambda split, *a, epoch, **kw: seen.append((epoch, split)) or original(split, *a, epoch=epoch,
                                                                                              **kw))
    summary = trainer.fit()
    # before training, then after every epoch (interval 1): val and the training split each time
    assert seen == [(None, "val"), (None, "train"), (0, "val"), (0, "train"), (1, "val"), (1, "train")]
    assert len(trainer.loaders["val"]) < len(trainer.loaders["train"])
    assert trainer.global_step == 2 * len(trainer.loaders["train"])  # not cut to the val loader's length
    assert 0 <= summary["test/acc"] <= 1 and summary["test/samples"] == 6
    lines = [json.loads(line) for line in (tmp_path / "olm" / "metrics.jsonl").read_text().splitlines()]
    for key in ("train/olm/w/audio", "train/olm/w/fused", "train/olm/lambda/visual", "val/loss/audio", "val/loss"):
        assert key in lines[0], key
    assert not torch.allclose(trainer.balancer.methods[0].lam, torch.full((3,), 1 / 3))


def test_three_modalities_and_the_classifier_bound():
    """M = 3 (the paper's NVGesture setting): OLM over four heads and boost's ACA both run; a
    modality at max_classifiers gets no more."""
    gen = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    encoders = {"audio": Encoder(7), "visual": Encoder(4), "depth": Encoder(3)}
    xs = lambda B=8: [torch.randn(B, 7, generator=gen), torch.randn(B, 4, generator=gen),  # noqa: E731
                      torch.randn(B, 3, generator=gen)]
    y = torch.randint(0, C, (8,), generator=gen)
    for name, head in (("olm", LateHeads([6, 6, 6], C)), ("boost", BoostedClassifiers([6, 6, 6], C))):
        params = [p for e in encoders.values() for p in e.parameters()] + list(head.parameters())
        opt = torch.optim.SGD(params, lr=0.1)
        kw = {"variant": "loss_ratio"} if name == "olm" else {"tau": 0.0, "max_classifiers": 2, "aca_rule": "weakest"}
        bal = mmfast.Balancer(name, encoders, head=head, optimizer=opt, **kw)
        for epoch in range(3):
            bal.start_epoch(epoch)
            features = bal.drop([e(x) for e, x in zip(encoders.values(), xs())])
            fused, unimodal, *extra = head(features)
            bal.after_forward(unimodal, y, fused=fused, extras=extra[0] if extra else None)
            opt.zero_grad()
            bal.loss().backward()
            bal.after_backward()
            opt.step()
            bal.after_step()
            if name == "boost":  # make the depth scores the weakest
                bal.methods[0]._score_sum.copy_(torch.tensor([6.0, 5.0, 1.0]))
                bal.methods[0]._score_count.fill_(8.0)
            bal.end_epoch()
        if name == "olm":
            assert bal.methods[0].w.shape == (4,) and not torch.equal(bal.methods[0].w, torch.ones(4))
        else:
            assert head.counts() == [1, 1, 2] and len(opt.param_groups) == 2  # bound reached after one addition
            assert [m for _, m in bal.methods[0].assignments] == ["depth", None, None]


def test_aca_fits_omega_until_it_converges_with_the_backbones_optimizer():
    """omega's MLP trains with the backbone's optimizer kind, momentum and weight decay (the paper:
    "the same as that of the backbone", lr 0.001) until L_ACA stops falling, not a fixed count."""
    gen = torch.Generator().manual_seed(4)
    encoders, head = make_net(BoostedClassifiers)
    opt = torch.optim.SGD(list(head.parameters()), lr=0.1, momentum=0.8, weight_decay=3e-4)
    bal = mmfast.Balancer("boost", encoders, head=head, optimizer=opt, interval=1, aca_lr=0.05, aca_tol=1e-5,
                          inference="omega")
    boost = bal.methods[0]
    group = boost.omega_optimizer.param_groups[0]
    assert isinstance(boost.omega_optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.8, 3e-4)
    bal.start_epoch(0)
    forward(bal, encoders, head, batch(gen))
    bal.loss().backward()
    bal.after_backward()
    boost._score_sum.copy_(torch.tensor([8.0, 3.0]))
    boost._score_count.fill_(10.0)
    bal.end_epoch()
    steps = boost.aca_steps_taken[0]
    assert 50 <= steps < boost.params.aca_max_steps and steps % 50 == 0
    s = torch.tensor([0.8, 0.3])
    omega = torch.sigmoid(boost.omega_net(s)).detach()
    loss = float((torch.tensor([0.0, 1.0]) - omega).square().sum())
    torch.testing.assert_close(head.omega, omega)
    assert float(head.omega[1]) > 0.8 > 0.2 > float(head.omega[0]) and loss < 0.1
    assert head.fusion_weights.tolist() == head.omega.tolist()  # inference="omega"
    adam = mmfast.Balancer("boost", encoders, head=head, optimizer=torch.optim.AdamW(head.parameters(), lr=0.1))
    assert isinstance(adam.methods[0].omega_optimizer, torch.optim.AdamW)


@pytest.mark.parametrize("inference,expected", [("equal", [1.0, 1.0]), ("fixed", [0.4, 0.6])])
def test_boost_inference_weights(inference, expected):
    encoders, head = make_net(BoostedClassifiers)
    mmfast.Balancer("boost", encoders, head=head, optimizer=torch.optim.SGD(head.parameters(), lr=0.1),
                    inference=inference)
    assert head.fusion_weights.tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="fixed_weights needs one weight per modality"):
        mmfast.Balancer("boost", encoders, head=head, inference="fixed", fixed_weights=[1.0])


def test_a_classifier_added_under_a_plateau_schedule_is_lowered_with_the_rest():
    """The paper's schedule (x0.1 when the loss saturates): a classifier that joined the optimizer
    is lowered with every other group."""
    encoders, head = make_net(BoostedClassifiers)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=0)
    bal = mmfast.Balancer("boost", encoders, head=head, optimizer=opt, scheduler=sched)
    from mmfast.methods import join_optimizer

    join_optimizer(bal.state, head.add_classifier(1))
    sched.step(1.0)
    sched.step(2.0)  # (no improvement: lowered)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01])


def test_boost_residual_labels_stay_non_negative_with_many_confident_classifiers():
    """Eight classifiers that all put ~0.999 on the true class: 1 - 0.2 * 7 * 0.999 < 0, which the
    paper's residual label may not be; the newest classifier's own term then weighs 0."""
    from mmfast.methods.boost import boost_modality_loss

    labels = torch.tensor([0, 1])
    z = torch.full((8, 2, C), -3.0)
    z[:, 0, 0] = z[:, 1, 1] = 3.0
    loss = boost_modality_loss(z, torch.tensor(1.0), labels, 0.2)
    expected = reference_boost_loss([z], torch.tensor([1.0]), labels, 0.2, [0])
    assert float(loss.mean()) == pytest.approx(expected, rel=1e-5)
    eps_o = F.cross_entropy(z.sum(0), labels, reduction="none")
    eps_p = F.cross_entropy(z[:-1].sum(0), labels, reduction="none")
    torch.testing.assert_close(loss, eps_o + eps_p)  # (eps = 0: a residual label of 0)


def test_boost_val_fitted_fusion_is_the_most_accurate_simplex_weighting_on_validation(gen):
    """inference="val_fitted" (the default): after each epoch the late-fusion weights become the
    point of the simplex grid (step 1/20) whose fused prediction is most accurate on the
    validation logits, the most even among ties; equal weights until then."""
    from mmfast.methods.boost import fit_fusion_weights, simplex_grid

    grid = simplex_grid(3)
    assert grid.shape == (231, 3) and torch.allclose(grid.sum(dim=1), torch.ones(231))
    unimodal, labels = torch.randn(2, 40, C, generator=gen), torch.randint(0, C, (40,), generator=gen)
    unimodal[1] += 3 * F.one_hot(labels, C)  # (the second modality is the better one)
    best, best_key = None, None
    for i in range(21):  # brute force over w_a = i / 20
        w = (i / 20, 1 - i / 20)
        acc = float(((w[0] * unimodal[0] + w[1] * unimodal[1]).argmax(1) == labels).float().mean())
        key = (acc, -abs(w[0] - 0.5))
        if best_key is None or key > best_key:
            best, best_key = w, key
    assert fit_fusion_weights(unimodal, labels).tolist() == pytest.approx(best)
    encoders, head = make_net(BoostedClassifiers)
    bal = mmfast.Balancer("boost", encoders, head=head, optimizer=torch.optim.SGD(head.parameters(), lr=0.1))
    assert bal.evaluations(0) == ("val",) and bal.evaluations(None) == () and head.fusion_weights.tolist() == [1.0, 1.0]
    fused = unimodal.sum(0)
    bal.observe_evaluation("train", fused, unimodal, labels, epoch=0)  # (not the split it fits on)
    assert head.fusion_weights.tolist() == [1.0, 1.0]
    bal.observe_evaluation("val", fused, unimodal, labels, epoch=0)
    assert head.fusion_weights.tolist() == pytest.approx(best)
    with pytest.raises(ValueError, match="labels must be"):
        bal.observe_evaluation("val", fused, unimodal, labels[:3], epoch=0)
    with pytest.raises(ValueError, match="fused must be"):
        bal.observe_evaluation("val", fused[:3], unimodal, labels, epoch=0)
    assert mmfast.Balancer("boost", encoders, head=head, inference="omega").evaluations(0) == ()
