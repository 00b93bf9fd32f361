"""``lfm`` (mmfast/methods/lfm.py): the alignment term against a float64 reference of the official
formula (KL from the mixture), a step's loss and gradients against a written-out reference, and
the fitted schedule (peer-methods step-level test)."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmfast
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
        mmfast.Balancer("lfm", {"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}, schedule="learned")


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
