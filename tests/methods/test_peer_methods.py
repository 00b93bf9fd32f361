"""The peers' methods (mmcosine, mbsd, cml, agm, mmpareto, pmr, mslr, mla, reconboost, gblending) through the Balancer of a
user's own loop, step by step against slow references written from the formulas (loops over
samples and classes, float64 where the method computes in float32), over several steps."""
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmfast
from mmfast.diagnostics import count_host_reads
from mmfast.methods.agm import agm_coefficients, shapley_matrix
from mmfast.methods.mmpareto import pareto_weights
from mmfast.models import LateHeads, SharedHead
from mmfast.models.estimators import ConcatHead
from mmfast.models.fusion import CosineHead, MixedConcatHead, SumHead

C = 5


class Encoder(nn.Module):
    def __init__(self, d_in, d_out=6, norm=False):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.norm = nn.BatchNorm1d(d_out) if norm else nn.Identity()

    def forward(self, x):
        return torch.tanh(self.norm(self.fc(x)))


def make_net(head_cls, seed=0, norm=False, dims=(7, 4)):
    torch.manual_seed(seed)
    names = ("audio", "visual", "text")[:len(dims)]
    encoders = {n: Encoder(d, norm=norm) for n, d in zip(names, dims)}
    return encoders, head_cls([6] * len(dims), C)


def batch(gen, B=10, dims=(7, 4)):
    return [torch.randn(B, d, generator=gen) for d in dims], torch.randint(0, C, (B,), generator=gen)


def params_of(encoders, head):
    return [p for m in (*encoders.values(), head) for p in m.parameters()]


def balancer_step(bal, encoders, head, xs, y, opt, rerun=None):
    """One step of the user loop; returns the loss."""
    features = bal.drop([enc(x) for enc, x in zip(encoders.values(), xs)])
    fused, unimodal, *extra = head(features)
    bal.after_forward(unimodal, y, fused=fused, extras=extra[0] if extra else None,
                      rerun=None if rerun is None else (lambda subsets: rerun(subsets, xs)))
    loss = bal.loss() if bal.computes_task_loss else bal.loss(F.cross_entropy(fused, y, reduction="none"))
    opt.zero_grad()
    loss.backward()
    bal.after_backward()
    opt.step()
    bal.after_step()
    return loss.detach()


def descend(params, grads, lr):
    """The reference's SGD step: p <- p - lr g."""
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g.to(p.dtype)


def ce(logits, label):
    """-log softmax(logits)[label] of one sample."""
    return torch.logsumexp(logits, 0) - logits[label]


# ---- MMCosine ------------------------------------------------------------------------------------

def reference_cosine_logits(features, weight, dims, scale):
    """sum_m s <phi_m, W_m[c]> / (|phi_m| |W_m[c]|), sample by sample and class by class."""
    blocks = torch.split(weight, dims, dim=1)
    rows = []
    for i in range(features[0].shape[0]):
        rows.append(torch.stack([sum(scale * (f[i] @ w[c]) / (f[i].norm() * w[c].norm()) for f, w in zip(features, blocks))
                                 for c in range(weight.shape[0])]))
    return torch.stack(rows)


def test_mmcosine_trains_the_sum_of_scaled_cosines(gen, float64):
    """In float64: three steps at scale 15 and lr 0.5 amplify fp32 rounding past the tolerance for
    some seeds (replayed: 3085641893)."""
    encoders, head = make_net(CosineHead)
    bal = mmfast.Balancer("mmcosine", encoders, head=head, scale=15.0)
    assert float(head.scale) == 15.0 and head.fc.bias is None
    ref_enc, ref_head = make_net(CosineHead)
    opt = torch.optim.SGD(params_of(encoders, head), lr=0.5)
    ref_params = params_of(ref_enc, ref_head)
    for _ in range(3):
        xs, y = batch(gen)
        loss = balancer_step(bal, encoders, head, xs, y, opt)
        feats = [e(x) for e, x in zip(ref_enc.values(), xs)]
        logits = reference_cosine_logits(feats, ref_head.fc.weight, [6, 6], 15.0)
        ref_loss = sum(ce(logits[i], y[i]) for i in range(len(y))) / len(y)
        grads = torch.autograd.grad(ref_loss, ref_params)
        descend(ref_params, grads, 0.5)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for p, q in zip(params_of(encoders, head), ref_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    # scaling a feature or a class's weight slice leaves the logits unchanged
    feats = [torch.randn(4, 6, generator=gen) for _ in range(2)]
    fused, _ = head(feats)
    torch.testing.assert_close(head([feats[0] * 3.0, feats[1]])[0], fused, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        head.fc.weight[2, :6] *= 7.0
    torch.testing.assert_close(head(feats)[0], fused, rtol=1e-5, atol=1e-5)


def test_mmcosine_needs_the_cosine_head():
    encoders, head = make_net(ConcatHead)
    with pytest.raises(ValueError, match="fusion=cosine"):
        mmfast.Balancer("mmcosine", encoders, head=head)


# ---- MBSD ----------------------------------------------------------------------------------------

def reference_mbsd_loss(fused, unimodal, y, variant):
    """CE(f) + sum_m CE(o_m) + mean_i w RS + mean_i w KL, two modalities, sample by sample."""
    B = len(y)
    total = sum(ce(fused[i], y[i]) for i in range(B)) / B
    total = total + sum(ce(o[i], y[i]) for o in unimodal for i in range(B)) / B
    oa, ob = unimodal
    rs_sum = kl_sum = 0
    for i in range(B):
        pa, pb = F.softmax(oa[i], 0)[y[i]], F.softmax(ob[i], 0)[y[i]]
        ok = bool(oa[i].argmax() == y[i]) or bool(ob[i].argmax() == y[i])
        w = (1.0 if ok else 0.0) * (pa - pb).abs()
        rs = sum((oa[i][c] - ob[i][c]) ** 2 for c in range(C)) / C
        if variant == "toolkit":
            ps, pw = (pa, pb) if pa >= pb else (pb, pa)
            kl = pw * (torch.log(pw) - ps)
        else:
            w = w.detach()
            strong, weak = (oa[i], ob[i]) if pa >= pb else (ob[i], oa[i])
            t = F.softmax(strong, 0).detach()
            kl = sum(t[c] * (torch.log(t[c]) - F.log_softmax(weak, 0)[c]) for c in range(C))
        rs_sum, kl_sum = rs_sum + w * rs, kl_sum + w * kl
    return total + rs_sum / B + kl_sum / B


@pytest.mark.parametrize("variant", ["toolkit", "intended"])
def test_mbsd_loss_and_gradients_follow_the_formulas(gen, variant):
    encoders, head = make_net(ConcatHead)
    bal = mmfast.Balancer("mbsd", encoders, head=head, variant=variant)
    ref_enc, ref_head = make_net(ConcatHead)
    opt = torch.optim.SGD(params_of(encoders, head), lr=0.3)
    ref_params = params_of(ref_enc, ref_head)
    seen = set()
    for _ in range(3):
        xs, y = batch(gen)
        feats = [e(x) for e, x in zip(ref_enc.values(), xs)]
        W, b = ref_head.fc.weight, ref_head.fc.bias
        oa, ob = feats[0] @ W[:, :6].T + b / 2, feats[1] @ W[:, 6:].T + b / 2
        y[0] = oa[0].argmax()  # (a sample that one modality gets right, one that none gets right)
        y[1] = next(c for c in range(C) if c not in (int(oa[1].argmax()), int(ob[1].argmax())))
        seen |= {(bool(oa[i].argmax() == y[i]) or bool(ob[i].argmax() == y[i])) for i in range(len(y))}
        loss = balancer_step(bal, encoders, head, xs, y, opt)
        fused = feats[0] @ W[:, :6].T + feats[1] @ W[:, 6:].T + b
        ref_loss = reference_mbsd_loss(fused, [oa, ob], y, variant)
        grads = torch.autograd.grad(ref_loss, ref_params)
        descend(ref_params, grads, 0.3)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert seen == {True, False}
    for p, q in zip(params_of(encoders, head), ref_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_mbsd_three_modalities_average_the_pairs_and_the_toolkit_rs_reads_probabilities(gen):
    from mmfast.methods.mbsd import mbsd_terms

    M, B = 3, 6
    unimodal, y = torch.randn(M, B, C, generator=gen, dtype=torch.float64), torch.randint(0, C, (B,), generator=gen)
    for variant in ("toolkit", "intended"):
        rs, kl = mbsd_terms(unimodal, y, variant)
        for i in range(B):
            want_rs = want_kl = 0.0
            for a, b in itertools.combinations(range(M), 2):
                pa, pb = (F.softmax(unimodal[m][i], 0) for m in (a, b))
                ok = bool(unimodal[a][i].argmax() == y[i]) or bool(unimodal[b][i].argmax() == y[i])
                w = float(ok) * abs(float(pa[y[i]] - pb[y[i]]))
                src_a, src_b = (pa, pb) if variant == "toolkit" else (unimodal[a][i], unimodal[b][i])
                want_rs += w * float(((src_a - src_b) ** 2).sum()) / C
                ps, pw = (pa, pb) if pa[y[i]] >= pb[y[i]] else (pb, pa)
                want_kl += w * (float(pw[y[i]]) * (math.log(float(pw[y[i]])) - float(ps[y[i]])) if variant == "toolkit"
                                else float((ps * (ps.log() - pw.log())).sum()))
            assert float(rs[i]) == pytest.approx(want_rs / 3, rel=1e-9, abs=1e-12)
            assert float(kl[i]) == pytest.approx(want_kl / 3, rel=1e-9, abs=1e-12)


def test_mbsd_stays_finite_when_a_probability_underflows():
    from mmfast.methods.mbsd import mbsd_terms

    unimodal = torch.zeros(2, 1, C)
    unimodal[0, 0, 0], unimodal[0, 0, 1] = 100.0, -100.0  # modality 0: p(class 1) = 0 in float32
    unimodal.requires_grad_(True)
    rs, kl = mbsd_terms(unimodal, torch.tensor([1]), "toolkit")
    (rs + kl).sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(unimodal.grad).all()


# ---- CML -----------------------------------------------------------------------------------------

def reference_cml_loss(feats, W, b, y, removed_sets, variant, lam):
    """From the weight slices: o_S = sum_{m in S} W_m phi_m + b; conf = max softmax."""
    B, M = len(y), len(feats)
    blocks = torch.split(W, [f.shape[1] for f in feats], dim=1)

    def logits(i, removed):
        return sum(feats[m][i] @ blocks[m].T for m in range(M) if m not in removed) + b

    def conf(i, removed):
        return F.softmax(logits(i, removed), 0).max()

    if variant == "paper":
        (removed,) = removed_sets
        base = sum(ce(logits(i, ()), y[i]) for i in range(B)) / B
        return base + lam * sum(torch.clamp(conf(i, removed) - conf(i, ()), min=0) for i in range(B))
    chain = [()] + removed_sets
    loss = sum(ce(logits(i, s), y[i]) for s in chain for i in range(B)) / (B * len(chain))
    for prev, cur in zip(chain, chain[1:]):
        loss = loss + lam * torch.clamp(sum(conf(i, cur) - conf(i, prev) for i in range(B)), min=0)
    return loss


@pytest.mark.parametrize("variant,M", [("paper", 2), ("paper", 3), ("toolkit", 2), ("toolkit", 3)])
def test_cml_loss_and_gradients_follow_the_formulas(gen, variant, M):
    dims = (7, 4, 5)[:M]
    seed = 4
    encoders, head = make_net(ConcatHead, dims=dims)
    bal = mmfast.Balancer("cml", encoders, head=head, variant=variant, lam=0.5, seed=seed)
    ref_enc, ref_head = make_net(ConcatHead, dims=dims)
    opt = torch.optim.SGD(params_of(encoders, head), lr=0.3)
    ref_params = params_of(ref_enc, ref_head)
    draws = torch.Generator().manual_seed(seed)  # (the run's device generator, replayed)
    for epoch in range(2):
        bal.start_epoch(epoch)
        order = list(range(M))
        random.Random(seed * 100003 + epoch).shuffle(order)
        for _ in range(2):
            xs, y = batch(gen, dims=dims)
            if variant == "paper":
                code = int(torch.randint(1, 2 ** M - 1, (), generator=draws))
                removed_sets = [tuple(m for m in range(M) if not (code >> m) & 1)]
            else:
                removed_sets = [tuple(order[k:]) for k in range(M - 1, 0, -1)]
            loss = balancer_step(bal, encoders, head, xs, y, opt)
            feats = [e(x) for e, x in zip(ref_enc.values(), xs)]
            ref_loss = reference_cml_loss(feats, ref_head.fc.weight, ref_head.fc.bias, y, removed_sets, variant, 0.5)
            grads = torch.autograd.grad(ref_loss, ref_params)
            descend(ref_params, grads, 0.3)
            assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for p, q in zip(params_of(encoders, head), ref_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# ---- AGM -----------------------------------------------------------------------------------------

def exact_shapley(values: dict, M: int) -> list:
    """Shapley values by averaging marginal contributions over every ordering of the players."""
    out = [0.0] * M
    orders = list(itertools.permutations(range(M)))
    for order in orders:
        seen = ()
        for m in order:
            out[m] += (values[tuple(sorted(seen + (m,)))] - values[tuple(sorted(seen))]) / len(orders)
            seen += (m,)
    return out


@pytest.mark.parametrize("M", [2, 3, 4])
def test_agm_responses_are_shapley_values_with_an_empty_coalition_worth_zero(gen, M):
    values = {(): 0.0}
    for k in range(1, M + 1):
        for S in itertools.combinations(range(M), k):
            values[S] = float(torch.randn((), generator=gen))
    subsets = [S for k in range(1, M) for S in itertools.combinations(range(M), k)] + [tuple(range(M))]
    r = shapley_matrix(M) @ torch.tensor([values[S] for S in subsets], dtype=torch.float64)
    assert r.tolist() == pytest.approx(exact_shapley(values, M), abs=1e-12)
    assert float(r.sum()) == pytest.approx(values[tuple(range(M))], abs=1e-12)
    if M == 2:  # the official responses (F - F_v + F_a) / 2 and (F - F_a + F_v) / 2
        Fa, Fv, Ff = values[(0,)], values[(1,)], values[(0, 1)]
        assert r.tolist() == pytest.approx([(Ff - Fv + Fa) / 2, (Ff - Fa + Fv) / 2], abs=1e-12)


def test_agm_controller_slows_a_modality_doing_better_than_its_history():
    scores, history = torch.tensor([0.5, 1.5]), torch.tensor([1.0, 1.0])  # a's loss fell below its mean
    kappa = agm_coefficients(scores, history, alpha=1.0, cap=10.0)
    assert kappa[0] < 1 < kappa[1]
    expected_a = math.exp(1.0 * min(math.exp(1.0 - 1.0) - math.exp(1.5 - 0.5), 10))  # official: exp(s_v - s_a)
    assert float(kappa[0]) == pytest.approx(expected_a, rel=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_agm_steps_follow_the_official_two_modality_computation(gen, alpha):
    """The official code, written out: F in train mode; F_a, F_v in eval mode with autograd;
    responses through identity functions whose backward scales by kappa (hooks); s_bar updated
    after kappa; the total gradient norm clipped to 1 when a head weight's gradient leaves [-1, 1]
    (the rule itself, with a gradient that triggers it: the test below)."""
    lr = 0.5
    encoders, head = make_net(ConcatHead, norm=True)
    bal = mmfast.Balancer("agm", encoders, head=head, alpha=alpha)
    ref_enc, ref_head = make_net(ConcatHead, norm=True)
    opt = torch.optim.SGD(params_of(encoders, head), lr=lr)
    ref_params = params_of(ref_enc, ref_head)
    mods = list(encoders)

    def rerun(subsets, xs):  # the loop's rerun, as the trainer computes it
        out = []
        for e in encoders.values():
            e.eval()
        for S in subsets:
            feats = [e(x if name in S else torch.zeros_like(x)) for (name, e), x in zip(encoders.items(), xs)]
            out.append(head(feats)[0])
        for e in encoders.values():
            e.train()
        return torch.stack(out)

    s_bar, t, kappas, clipped = [0.0, 0.0], 0, [], []
    for _ in range(4):
        xs, y = batch(gen, B=12)
        loss = balancer_step(bal, encoders, head, xs, y, opt, rerun=rerun)
        kappas.append([float(bal.metrics[f"agm/kappa/{m}"]) for m in mods])
        F_full = ref_head([e(x) for e, x in zip(ref_enc.values(), xs)])[0]
        for e in ref_enc.values():
            e.eval()
        Fa = ref_head([ref_enc["audio"](xs[0]), ref_enc["visual"](torch.zeros_like(xs[1]))])[0]
        Fv = ref_head([ref_enc["audio"](torch.zeros_like(xs[0])), ref_enc["visual"](xs[1])])[0]
        for e in ref_enc.values():
            e.train()
        r = [(F_full - Fv + Fa) / 2, (F_full - Fa + Fv) / 2]
        s = [float(sum(-math.log(max(float(F.softmax(rm[i], 0)[y[i]]), 1e-8)) for i in range(len(y))) / len(y))
             for rm in r]
        ratio = [math.exp(s[1] - s[0]), math.exp(s[0] - s[1])]
        target = [math.exp(s_bar[1] - s_bar[0]), math.exp(s_bar[0] - s_bar[1])]
        kappa = [math.exp(alpha * min(target[m] - ratio[m], 10)) for m in range(2)]
        t += 1
        s_bar = [s_bar[m] * (t - 1) / t + s[m] / t for m in range(2)]
        hooked = []
        for m in range(2):
            ident = r[m].view_as(r[m])
            ident.register_hook(lambda g, k=kappa[m]: g * k)
            hooked.append(ident)
        ref_loss = F.cross_entropy(hooked[0] + hooked[1], y)
        grads = list(torch.autograd.grad(ref_loss, ref_params))
        head_weight_grad = grads[[id(p) for p in ref_params].index(id(ref_head.fc.weight))]
        clipped.append(float(head_weight_grad.abs().max()) > 1)
        assert float(bal.metrics["agm/clipped"]) == clipped[-1]
        if clipped[-1]:
            norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
            grads = [g * min(1.0, 1.0 / (norm + 1e-6)) for g in grads]
        descend(ref_params, grads, lr)
        assert kappas[-1] == pytest.approx(kappa, rel=1e-4)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert any(abs(k - 1) > 1e-3 for ks in kappas for k in ks)
    for p, q in zip(params_of(encoders, head), ref_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("largest", [0.5, 3.0])
def test_agm_clips_the_total_norm_when_a_head_weight_gradient_leaves_the_unit_interval(gen, largest):
    """After a modulated step: every gradient times min(1, 1 / (total norm + 1e-6)) when an entry
    of a head weight's gradient is outside [-1, 1] (the official code), else untouched."""
    encoders, head = make_net(ConcatHead)
    bal = mmfast.Balancer("agm", encoders, head=head)
    params = params_of(encoders, head)
    grads = [torch.randn(p.shape, generator=gen) * 0.1 for p in params]
    grads[[id(p) for p in params].index(id(head.fc.weight))][0, 0] = largest
    expected = grads
    if largest > 1:
        norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
        expected = [g * min(1.0, 1.0 / (norm + 1e-6)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    method = bal.methods[0]
    method._clip_now = True  # (what after_forward sets on a modulated step)
    method.after_backward(bal.state)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad, g)
    assert float(bal.state.metrics["agm/clipped"]) == float(largest > 1)


def test_agm_needs_the_loops_rerun(gen):
    encoders, head = make_net(ConcatHead)
    bal = mmfast.Balancer("agm", encoders, head=head)
    xs, y = batch(gen)
    features = bal.drop([e(x) for e, x in zip(encoders.values(), xs)])
    fused, unimodal = head(features)
    with pytest.raises(ValueError, match="rerun="):
        bal.after_forward(unimodal, y, fused=fused)


# ---- MMPareto ------------------------------------------------------------------------------------

def test_pareto_weights_are_the_min_norm_combination_when_the_gradients_conflict(gen):
    for _ in range(20):
        g1, g2 = torch.randn(8, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)
        c = float(pareto_weights((g1 @ g1).view(1), (g2 @ g2).view(1), (g1 @ g2).view(1)))
        if g1 @ g2 > 0:
            assert c == 0.5
            continue
        grid = torch.linspace(0, 1, 10001, dtype=torch.float64)
        norms = ((grid[:, None] * g1 + (1 - grid[:, None]) * g2) ** 2).sum(dim=1)
        assert c == pytest.approx(float(grid[norms.argmin()]), abs=2e-4)
    # the clamps (they fire only for a zero gradient: <g1, g2> <= 0 <= |g|^2): all weight on the zero one
    zero, g = torch.zeros(2), torch.tensor([1.0, -2.0])
    assert float(pareto_weights((zero @ zero).view(1), (g @ g).view(1), (zero @ g).view(1))) == pytest.approx(0.999)
    assert float(pareto_weights((g @ g).view(1), (zero @ zero).view(1), (g @ zero).view(1))) == pytest.approx(0.001)


def reference_mmpareto_grads(encoders, head, xs, y, gamma):
    """Per-loss gradients with autograd.grad (no accumulation), the closed-form weights per
    modality, the per-tensor rescale; non-encoder parameters keep the summed gradient."""
    feats = [e(x) for e, x in zip(encoders.values(), xs)]
    fused, unimodal = head(feats)
    l_mm = F.cross_entropy(fused, y)
    l_uni = [F.cross_entropy(o, y) for o in unimodal]
    everything = params_of(encoders, head)
    total = torch.autograd.grad(l_mm + sum(l_uni), everything, retain_graph=True)
    out = dict(zip(map(id, everything), total))
    for m, enc in enumerate(encoders.values()):
        ps = list(enc.parameters())
        g1 = torch.autograd.grad(l_mm, ps, retain_graph=True)
        g2 = torch.autograd.grad(l_uni[m], ps, retain_graph=True)
        f1, f2 = torch.cat([g.flatten() for g in g1]).double(), torch.cat([g.flatten() for g in g2]).double()
        if float(f1 @ f2) / float(f1.norm() * f2.norm()) > 0:
            c1 = 0.5
        elif f1 @ f2 >= f1 @ f1:
            c1 = 0.999
        elif f1 @ f2 >= f2 @ f2:
            c1 = 0.001
        else:
            c1 = float((f2 @ f2 - f1 @ f2) / ((f1 - f2) @ (f1 - f2)))
        for p, a, b in zip(ps, g1, g2):
            d = 2 * c1 * a + 2 * (1 - c1) * b
            out[id(p)] = gamma * d * max(1.0, float(out[id(p)].norm() / d.norm()))
    return [out[id(p)] for p in everything]


def test_mmpareto_gradients_follow_the_official_computation(gen):
    encoders, head = make_net(LateHeads)
    bal = mmfast.Balancer("mmpareto", encoders, head=head)
    ref_enc, ref_head = make_net(LateHeads)
    lr = 0.2
    opt = torch.optim.SGD(params_of(encoders, head), lr=lr)
    ref_params = params_of(ref_enc, ref_head)
    conflicts = 0
    for step in range(4):
        xs, y = batch(gen)
        if step % 2:  # (a visual classifier pointing away from the fused one: conflicting gradients)
            with torch.no_grad():
                for h in (head, ref_head):
                    h.unimodal[1].weight.copy_(-3 * h.fused.weight[:, 6:])
        balancer_step(bal, encoders, head, xs, y, opt)
        conflicts += sum(float(bal.metrics[f"mmpareto/cos/{m}"]) <= 0 for m in encoders)
        grads = reference_mmpareto_grads(ref_enc, ref_head, xs, y, 1.5)
        descend(ref_params, grads, lr)
        for p, q in zip(params_of(encoders, head), ref_params):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert conflicts > 0


# ---- PMR -----------------------------------------------------------------------------------------

def test_pmr_prototypes_and_prototype_loss_follow_the_official_computation(gen):
    encoders, head = make_net(ConcatHead)
    bal = mmfast.Balancer("pmr", encoders, head=head, alpha=0.7, mu=0.25, fraction=1.0)
    N = 30
    splits = []
    for _ in range(2):
        feats = [torch.randn(N, 6, generator=gen) for _ in range(2)]
        labels = torch.randint(0, C, (N,), generator=gen)
        labels[:C] = torch.arange(C)  # (every class present)
        splits.append((feats, labels))
        bal.observe_evaluation("train", torch.randn(N, C), torch.randn(2, N, C), labels, epoch=len(splits) - 2,
                               features=feats)

    def means(feats, labels):
        return [torch.stack([sum(f[i] for i in range(N) if labels[i] == k) / sum(1 for i in range(N) if labels[i] == k)
                             for k in range(C)]) for f in feats]

    first, second = means(*splits[0]), means(*splits[1])
    expected = [(1 - 0.25) * b + 0.25 * a for a, b in zip(first, second)]
    for got, want in zip(bal.methods[0].prototypes, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    opt = torch.optim.SGD(params_of(encoders, head), lr=0.1)
    for _ in range(2):
        xs, y = batch(gen)
        feats = [e(x) for e, x in zip(encoders.values(), xs)]
        sims = [torch.stack([torch.stack([-((f[i] - c[k]) ** 2).sum().sqrt() for k in range(C)]) for i in range(len(y))])
                for f, c in zip(feats, expected)]
        S = [sum(float(F.softmax(s[i], 0)[y[i]]) for i in range(len(y))) for s in sims]
        slow = [S[0] / S[1] < 1, S[1] / S[0] < 1]
        pce = [sum(ce(s[i], y[i]) for i in range(len(y))) / len(y) for s in sims]
        fused = head(feats)[0]
        ref_loss = F.cross_entropy(fused, y) + 0.7 * sum(p for p, is_slow in zip(pce, slow) if is_slow)
        # the fast modality's encoder gets the fused loss's gradient only
        fast = list(encoders)[slow.index(False)]
        expected_fast = torch.autograd.grad(F.cross_entropy(fused, y), list(encoders[fast].parameters()),
                                            retain_graph=True)
        loss = bal.loss(F.cross_entropy(*_pmr_forward(bal, encoders, head, xs, y), reduction="none"))
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
        opt.zero_grad()
        loss.backward()
        for p, g in zip(encoders[fast].parameters(), expected_fast):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
        bal.after_backward()
        opt.step()
        bal.after_step()


def _pmr_forward(bal, encoders, head, xs, y):
    features = bal.drop([e(x) for e, x in zip(encoders.values(), xs)])
    fused, unimodal = head(features)
    bal.after_forward(unimodal, y)
    return fused, y


def test_pmr_prototype_of_a_class_first_seen_later_is_its_mean_and_a_missed_class_keeps_its_own(gen):
    encoders, head = make_net(ConcatHead)
    bal = mmfast.Balancer("pmr", encoders, head=head, mu=0.5, fraction=1.0)
    feats = [torch.randn(8, 6, generator=gen) for _ in range(2)]
    no_last = torch.arange(8) % (C - 1)  # (class C - 1 absent)
    bal.observe_evaluation("train", torch.randn(8, C), torch.randn(2, 8, C), no_last, epoch=None, features=feats)
    first = [c.clone() for c in bal.methods[0].prototypes]
    assert all(not c[C - 1].any() for c in first)
    only_last = torch.full((8,), C - 1)
    bal.observe_evaluation("train", torch.randn(8, C), torch.randn(2, 8, C), only_last, epoch=0, features=feats)
    for f, c, before in zip(feats, bal.methods[0].prototypes, first):
        torch.testing.assert_close(c[C - 1], f.mean(dim=0))  # (no momentum towards the zero placeholder)
        torch.testing.assert_close(c[:C - 1], before[:C - 1])


def test_pmr_needs_its_prototypes_first(gen):
    encoders, head = make_net(ConcatHead)
    bal = mmfast.Balancer("pmr", encoders, head=head)
    assert bal.evaluations(None) == ("train",) and bal.evaluation_features
    with pytest.raises(ValueError, match="features"):
        bal.observe_evaluation("train", torch.randn(4, C), torch.randn(2, 4, C), torch.zeros(4, dtype=torch.long),
                               epoch=None)
    xs, y = batch(gen)
    with pytest.raises(RuntimeError, match="prototypes"):
        _pmr_forward(bal, encoders, head, xs, y)


# ---- MSLR ----------------------------------------------------------------------------------------

def test_mslr_trains_each_branch_with_its_own_learning_rate(gen):
    encoders, head = make_net(SumHead)
    ref_enc, ref_head = make_net(SumHead)
    opt = torch.optim.SGD(params_of(encoders, head), lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    bal = mmfast.Balancer("mslr", encoders, head=head, optimizer=opt, scheduler=sched, lr_scales={"audio": 0.25})
    for step in range(3):
        xs, y = batch(gen)
        balancer_step(bal, encoders, head, xs, y, opt)
        sched.step()
        feats = [e(x) for e, x in zip(ref_enc.values(), xs)]
        loss = F.cross_entropy(ref_head(feats)[0], y)
        lr = 0.2 * 0.5 ** step
        audio = set(map(id, [*ref_enc["audio"].parameters(), *ref_head.fcs[0].parameters()]))
        ps = params_of(ref_enc, ref_head)
        with torch.no_grad():
            for p, g in zip(ps, torch.autograd.grad(loss, ps)):
                p -= (0.25 * lr if id(p) in audio else lr) * g
    for p, q in zip(params_of(encoders, head), params_of(ref_enc, ref_head)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    # a resumed loop rebuilds the same groups before the optimizer's state loads
    opt2 = torch.optim.SGD(params_of(encoders, head), lr=0.2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    bal2 = mmfast.Balancer("mslr", encoders, head=head, optimizer=opt2, scheduler=sched2, lr_scales={"audio": 0.25})
    bal2.load_state_dict(bal.state_dict())
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups] == [0.025, 0.025 * 0.25]


def test_mslr_refuses_unknown_modalities_and_bad_factors():
    encoders, head = make_net(SumHead)
    opt = torch.optim.SGD(params_of(encoders, head), lr=0.1)
    with pytest.raises(ValueError, match=r"names \['depth'\]"):
        mmfast.Balancer("mslr", encoders, head=head, optimizer=opt, lr_scales={"depth": 2.0})
    with pytest.raises(ValueError, match="must be > 0"):
        mmfast.Balancer("mslr", encoders, head=head, optimizer=opt, lr_scales={"audio": 0.0})
    per_group = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.9 ** epoch)
    with pytest.raises(ValueError, match="LambdaLR keeps one schedule per group"):
        mmfast.Balancer("mslr", encoders, head=head, optimizer=opt, scheduler=per_group, lr_scales={"audio": 2.0})


# ---- MLA -----------------------------------------------------------------------------------------

def shared(combine):
    return lambda dims, C: SharedHead(dims, C, combine=combine)


def parts_step(bal, encoders, head, xs, y, opt):
    """A step of the user loop for a method that trains the modalities in turn."""
    for part in bal.update_parts():
        features = bal.drop([e(x) if name in part else torch.zeros(len(y), 6)
                             for (name, e), x in zip(encoders.items(), xs)], part=part)
        fused, unimodal, *extra = head(features)
        bal.after_forward(unimodal, y, fused=fused, extras=extra[0] if extra else None)
        opt.zero_grad()
        bal.loss().backward()
        bal.after_backward()
        opt.step()
        bal.after_step()


@pytest.mark.parametrize("projection", ["replace", "add", "none"])
def test_mla_alternates_modalities_through_the_shared_head_with_the_projection(gen, projection):
    """Reference: the modalities in turn, each CE(h(phi_m)) with SGD, P updated in float64 by the
    closed form (not on the run's first modality step), the head weight's gradient replaced by
    grad P^T (or added to it), the next modality seeing the updated head."""
    lr, batches = 0.3, 4
    encoders, head = make_net(shared("entropy"))
    bal = mmfast.Balancer("mla", encoders, head=head, projection=projection)
    ref_enc, ref_head = make_net(shared("entropy"))
    opt = torch.optim.SGD(params_of(encoders, head), lr=lr)
    P, first = torch.eye(6, dtype=torch.float64), True
    for epoch in range(2):
        bal.start_epoch(epoch, batches=batches)
        for b in range(batches):
            xs, y = batch(gen)
            parts_step(bal, encoders, head, xs, y, opt)
            for m, (name, enc) in enumerate(ref_enc.items()):
                feats = enc(xs[m])
                loss = sum(ce(ref_head.fc(feats)[i], y[i]) for i in range(len(y))) / len(y)
                ps = [*enc.parameters(), *ref_head.parameters()]
                grads = dict(zip(map(id, ps), torch.autograd.grad(loss, ps)))
                if projection != "none" and not first:
                    a = 0.1 ** (1 + b / batches)
                    r = feats.detach().double().mean(dim=0).view(1, -1)
                    k = P @ r.T
                    P = P - k @ k.T / (a + float(r @ k))
                    P = P / math.sqrt(float((P ** 2).sum()))
                    g = grads[id(ref_head.fc.weight)].double()
                    grads[id(ref_head.fc.weight)] = (g @ P.T if projection == "replace" else g + g @ P.T).float()
                first = False
                with torch.no_grad():
                    for p in ps:
                        p -= lr * grads[id(p)]
    for p, q in zip(params_of(encoders, head), params_of(ref_enc, ref_head)):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    if projection != "none":
        torch.testing.assert_close(bal.methods[0].P.double(), P, rtol=1e-4, atol=1e-5)


def test_shared_head_fuses_by_entropy_gates_per_sample(gen):
    _, head = make_net(shared("entropy"))
    feats = [torch.randn(5, 6, generator=gen) for _ in range(2)]
    fused, unimodal = head(feats)
    for i in range(5):
        H = [-sum(float(p) * math.log(float(p)) for p in F.softmax(o[i], 0)) for o in unimodal]
        g = [math.exp(-h) / sum(math.exp(-x) for x in H) for h in H]
        torch.testing.assert_close(fused[i], g[0] * unimodal[0][i] + g[1] * unimodal[1][i], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one size"):
        SharedHead([6, 5], C)


# ---- ReconBoost ----------------------------------------------------------------------------------

def test_reconboost_phases_follow_the_official_computation(gen):
    """Phase 1 (modality m): -(1/C)(w1 - w2 q_y) log p_y with q from the other learners'
    detached ensemble, no gradient into the others or beta; phase 2: CE(beta sum_k h_k); the
    schedule a, a | a, v, v | v, a ... by whole epochs, the optimizer's state cleared at each phase start."""
    encoders, head = make_net(shared("ensemble"))
    opt = torch.optim.SGD(params_of(encoders, head), lr=0.2, momentum=0.9)
    bal = mmfast.Balancer("reconboost", encoders, head=head, optimizer=opt, w1=4.0, w2=1.5, phase1_epochs=2,
                          phase2_epochs=1, beta=0.7)
    assert float(head.beta) == pytest.approx(0.7)
    schedule = [bal.methods[0].schedule(e) for e in range(7)]
    assert schedule == [(1, 0), (1, 0), (2, 0), (1, 1), (1, 1), (2, 1), (1, 0)]
    for epoch in range(6):
        bal.start_epoch(epoch)
        if epoch in (0, 2, 3, 5):
            assert not opt.state  # (a phase starts: fresh momentum)
        phase, m = schedule[epoch]
        xs, y = batch(gen)
        feats = [e(x) for e, x in zip(encoders.values(), xs)]
        o = [head.fc(f) for f in feats]
        if phase == 1:
            q = F.softmax(head.beta.detach() * sum(o[k].detach() for k in range(2) if k != m), dim=1)
            ref = sum(-(4.0 - 1.5 * q[i, y[i]]) / C * F.log_softmax(o[m][i], 0)[y[i]] for i in range(len(y))) / len(y)
        else:
            ref = sum(ce(head.beta * (o[0][i] + o[1][i]), y[i]) for i in range(len(y))) / len(y)
        expected = {id(p): g for p, g in zip(params_of(encoders, head),
                                             torch.autograd.grad(ref, params_of(encoders, head), allow_unused=True))}
        features = bal.drop([e(x) for e, x in zip(encoders.values(), xs)])
        fused, unimodal = head(features)
        bal.after_forward(unimodal, y, fused=fused)
        loss = bal.loss()
        assert float(loss) == pytest.approx(float(ref), rel=1e-5)
        opt.zero_grad()
        loss.backward()
        for p in params_of(encoders, head):
            if expected[id(p)] is None:
                assert p.grad is None or not p.grad.any()
            else:
                torch.testing.assert_close(p.grad, expected[id(p)], rtol=1e-5, atol=1e-7)
        other = list(encoders.values())[1 - m]
        if phase == 1:  # nothing reaches the other learner's encoder or beta
            assert all(p.grad is None for p in other.parameters()) and head.beta.grad is None
        else:
            assert head.beta.grad is not None and all(p.grad is not None for p in other.parameters())
        bal.after_backward()
        opt.step()
        bal.after_step()


# ---- G-Blending ----------------------------------------------------------------------------------

def test_gblending_weights_from_synthetic_loss_curves():
    """Heads audio, visual, fused: train/val losses at the window's first and last epoch."""
    from mmfast.methods.gblending import blend_weights

    train = torch.tensor([[1.5, 0.9], [1.6, 1.4], [1.4, 0.5]], dtype=torch.float64)
    val = torch.tensor([[1.6, 1.2], [1.7, 1.75], [1.5, 1.1]], dtype=torch.float64)
    raw = []
    for (t0, t1), (v0, v1) in zip(train.tolist(), val.tolist()):
        G, O = v0 - v1, (v1 - t1) - (v0 - t0)
        raw.append(max(G, 0.0) / O ** 2)
    assert blend_weights(train, val, "paper").tolist() == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)
    assert float(blend_weights(train, val, "paper")[1]) == 0.0  # (its validation loss rose)
    raw = [abs(v0 - v1) / ((v1 - t1) - (v0 - t0)) ** 2 for (t0, t1), (v0, v1) in zip(train.tolist(), val.tolist())]
    assert blend_weights(train, val, "toolkit").tolist() == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)
    # no head generalised: equal weights
    rising = torch.tensor([[1.2, 1.6], [1.5, 1.7], [1.1, 1.5]], dtype=torch.float64)
    assert blend_weights(train, rising, "paper").tolist() == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("schedule,due", [("online", [0, 3, 6]), ("offline", [0])])
def test_gblending_asks_for_a_scratch_run_per_head_on_schedule_and_trains_the_weighted_sum(gen, schedule, due):
    encoders, head = make_net(LateHeads)
    bal = mmfast.Balancer("gblending", encoders, head=head, super_epoch=3, schedule=schedule)
    assert [e for e in range(8) if bal.scratch_runs(e)] == due
    runs = bal.scratch_runs(0)
    assert [r.head for r in runs] == ["audio", "visual", None] and all(r.epochs == 3 for r in runs)
    curves = {"audio": ([1.5, 1.2, 0.9], [1.6, 1.4, 1.2]), "visual": ([1.6, 1.5, 1.4], [1.7, 1.7, 1.75]),
              None: ([1.4, 0.9, 0.5], [1.5, 1.3, 1.1])}
    for i, run in enumerate(runs):
        before = bal.methods[0].w.clone()
        train, val = curves[run.head]
        bal.observe_scratch(run, {"train": train, "val": val, "train_batch_sum": train, "val_batch_sum": val}, epoch=0)
        if i < len(runs) - 1:
            assert torch.equal(bal.methods[0].w, before)  # (waits for every head)
    w = bal.methods[0].w
    raw = [max(v[0] - v[-1], 0) / ((v[-1] - t[-1]) - (v[0] - t[0])) ** 2 for t, v in curves.values()]
    assert w.tolist() == pytest.approx([r / sum(raw) for r in raw], rel=1e-5)
    xs, y = batch(gen)
    features = bal.drop([e(x) for e, x in zip(encoders.values(), xs)])
    fused, unimodal = head(features)
    bal.after_forward(unimodal, y, fused=fused)
    expected = sum(float(w[k]) * sum(float(ce(o[i], y[i])) for i in range(len(y))) / len(y)
                   for k, o in enumerate([*unimodal, fused]))
    assert float(bal.loss()) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="must hold 3 values"):
        bal.observe_scratch(runs[0], {"train": [1.0], "val": [1.0]}, epoch=0)


# ---- every peer method: no host read in a step ---------------------------------------------------

HEADS = {"mmcosine": CosineHead, "mmpareto": LateHeads, "gblending": LateHeads, "mslr": SumHead, "mla": shared("entropy"),
         "reconboost": shared("ensemble"), "lfm": SumHead, "amco": MixedConcatHead}


@pytest.mark.parametrize("name", ["mmcosine", "mbsd", "cml", "agm", "mmpareto", "pmr", "mslr", "mla", "reconboost",
                                  "gblending", "relearning", "lfm", "lfm learned", "amco"])
def test_peer_method_steps_read_nothing_on_the_host(gen, name):
    encoders, head = make_net(HEADS.get(name.split()[0], ConcatHead))
    opt = torch.optim.SGD(params_of(encoders, head), lr=0.1)
    hp = {"mslr": {"lr_scales": {"audio": 0.5}}, "lfm learned": {"schedule": "learned"}}.get(name, {})
    name = name.split()[0]
    bal = mmfast.Balancer(name, encoders, head=head, optimizer=opt, **hp)
    if bal.evaluation_features:
        N = 12
        bal.observe_evaluation("train", torch.randn(N, C), torch.randn(2, N, C), torch.arange(N) % C, epoch=None,
                               features=[torch.randn(N, 6, generator=gen) for _ in range(2)])

    def rerun(subsets, xs):
        return torch.stack([head([e(x if n in S else torch.zeros_like(x)) for (n, e), x in zip(encoders.items(), xs)])[0]
                            for S in subsets])

    bal.start_epoch(2 if name == "amco" else 0, batches=3)  # (amco: from epoch 1 on the mask grows)
    for i in range(3):
        xs, y = batch(gen)
        with count_host_reads() as counts:
            if len(bal.update_parts()) > 1:
                parts_step(bal, encoders, head, xs, y, opt)
            else:
                balancer_step(bal, encoders, head, xs, y, opt, rerun=rerun if bal.methods[0].extra_forwards else None)
        assert counts == {}, f"{name}: host reads {counts}"
