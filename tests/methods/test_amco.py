"""``amco`` (mmfast/methods/amco.py, the toolkit's computation): the class mask, the masked loss
and its gradients against a written-out reference, the dependence flags from the block shares,
the progress schedule (peer-methods step-level test)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmfast
from mmfast.methods.amco import class_mask, dependence_shares, mask_size
from mmfast.models.fusion import MixedConcatHead

C = 6


def test_mask_size_follows_the_sine_ramp():
    assert mask_size(0.0, 0.3, C) == 0 and mask_size(0.3, 0.3, C) == C and mask_size(5.0, 0.3, C) == C
    assert mask_size(0.15, 0.3, C) == math.floor(math.sin(math.pi / 4) * C)


def test_class_mask_zeroes_exactly_n_classes_drawn_uniformly(gen):
    seed = int(torch.randint(1 << 30, (), generator=gen))
    for zeros in range(C + 1):
        g = torch.Generator().manual_seed(seed)
        u = class_mask(C, zeros, g, "cpu")
        assert int((u == 0).sum()) == zeros
        drawn = torch.randperm(C, generator=torch.Generator().manual_seed(seed))[:zeros]
        assert set(torch.nonzero(u == 0).flatten().tolist()) == set(drawn.tolist())
    counts = torch.zeros(C)  # every class is zeroed about as often
    g = torch.Generator().manual_seed(seed)
    for _ in range(3000):
        counts += (class_mask(C, 2, g, "cpu") == 0).float()
    assert (counts / 3000 - 2 / C).abs().max() < 0.04


def make(seed):
    torch.manual_seed(seed)
    encoders = {"audio": nn.Linear(7, 5), "visual": nn.Linear(4, 5)}
    return encoders, MixedConcatHead([5, 5], C)


@pytest.mark.parametrize("dependent", [(True, False), (False, True), (False, False)])
def test_amco_step_follows_the_toolkits_formula(gen, dependent):
    encoders, head = make(int(torch.randint(1 << 30, (), generator=gen)))
    bal = mmfast.Balancer("amco", encoders, head=head, seed=3)
    method = bal.methods[0]
    bal.start_epoch(2)
    method.dependent = torch.tensor(dependent)
    method.progress = 0.1  # N = floor(sin(pi/2 * 0.1/0.3) * 6) = 3
    xs = [torch.randn(8, 7, generator=gen), torch.randn(8, 4, generator=gen)]
    y = torch.randint(0, C, (8,), generator=gen)
    params = [p for m in (*encoders.values(), head) for p in m.parameters()]
    replay = torch.Generator().set_state(bal.state.generator.get_state())
    features = bal.drop([enc(x) for enc, x in zip(encoders.values(), xs)])
    fused, unimodal = head(features)
    bal.after_forward(unimodal, y, fused=fused)
    loss = bal.loss()
    grads = torch.autograd.grad(loss, params)
    # the reference: the same draw, the formula in float64
    u = torch.ones(C, dtype=torch.float64)
    u[torch.randperm(C, generator=replay)[:3]] = 0
    d = [p.detach().double().requires_grad_() for p in params]
    wa, ba, wv, bv, w, b, wg, bg = d
    phi = [xs[0].double() @ wa.T + ba, xs[1].double() @ wv.T + bv]
    o = [phi[0] @ w[:, :5].T + b / 2, phi[1] @ w[:, 5:].T + b / 2]
    o = [om * u if dep else om for om, dep in zip(o, dependent)]
    expected = (F.cross_entropy((o[0] + o[1]) @ wg.T + bg, y, reduction="none")
                + sum(F.cross_entropy(om, y, reduction="none") for om in o)).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    for g_, e in zip(grads, torch.autograd.grad(expected, d)):
        torch.testing.assert_close(g_.double(), e, rtol=1e-4, atol=1e-6)
    # the flags of the next step: block shares of the softmax over all 2C masked logits
    both = torch.cat([om.detach() for om in o], dim=1).softmax(dim=1)
    shares = torch.stack([both[:, :C].sum(1).mean(), both[:, C:].sum(1).mean()])
    assert method.dependent.tolist() == (shares > 0.5).tolist()
    torch.testing.assert_close(dependence_shares(torch.stack(o).float()).mean(dim=1).double(), shares, rtol=1e-5,
                               atol=1e-6)


def test_outside_its_window_amco_trains_the_mixed_fused_logits_alone(gen):
    encoders, head = make(0)
    bal = mmfast.Balancer("amco", encoders, head=head, start_epoch=5)
    bal.start_epoch(1)
    xs = [torch.randn(8, 7, generator=gen), torch.randn(8, 4, generator=gen)]
    y = torch.randint(0, C, (8,), generator=gen)
    features = bal.drop([enc(x) for enc, x in zip(encoders.values(), xs)])
    fused, unimodal = head(features)
    bal.after_forward(unimodal, y, fused=fused)
    torch.testing.assert_close(bal.loss(), F.cross_entropy(fused, y))


def test_progress_grows_by_a_tenth_of_the_epoch_per_batch_and_restarts_each_epoch():
    encoders, head = make(0)
    bal = mmfast.Balancer("amco", encoders, head=head)
    method = bal.methods[0]
    for epoch, steps in ((0, 3), (3, 2)):
        bal.start_epoch(epoch)
        assert method.progress == 0.0
        for _ in range(steps):
            bal.after_step()
        assert method.progress == pytest.approx(steps * epoch / 10)
    bal.start_epoch(3)  # (a resumed epoch keeps its progress)
    assert method.progress == pytest.approx(0.6)
    with pytest.raises(ValueError, match="amco head"):
        mmfast.Balancer("amco", encoders, head=nn.Linear(10, C))
