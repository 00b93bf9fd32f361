"""Balancing methods (mmfast.methods) driven through mmfast.Balancer, each step checked against slow
references of the formulas: which gradients are modulated and by how much, drop masks and
rescaling, epoch windows, warm-up, the device step counter, and that no step reads the host."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmfast
from support import no_device_sync, requires_cuda
from mmfast.diagnostics import HOST_READS, count_host_reads
from mmfast.models.estimators import ConcatHead
from mmfast.methods import NAMES, hyper_parameters
from mmfast.ops import (
    discrepancy_ratio_reference,
    feature_drop_reference,
    grad_modulate_reference_,
    modality_scores_reference,
    ogm_coefficients_reference,
    opm_drop_probabilities_reference,
)

C = 5


class TinyEncoder(nn.Module):
    """conv -> BN -> pool: a 4-D weight, a 1-D BN weight and a bias, like the real encoders."""

    def __init__(self, channels, width=6):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3)
        self.bn = nn.BatchNorm1d(width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        return self.proj(self.bn(self.conv(x).mean(dim=(2, 3))))


class Net(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.audio, self.visual = TinyEncoder(1), TinyEncoder(3)
        self.head = ConcatHead([6, 6], C)


def random_batch(gen, B=12):
    return (torch.randn(B, 1, 9, 9, generator=gen), torch.randn(B, 3, 9, 9, generator=gen),
            torch.randint(0, C, (B,), generator=gen))


def run_step(net, bal, batch, epoch=0):
    """One step of the documented user loop; returns what the test needs to check it."""
    xa, xv, y = batch
    bal.start_epoch(epoch)
    raw = [net.audio(xa), net.visual(xv)]
    gen_state = bal.state.generator.get_state()
    features = bal.drop(raw)
    fused, unimodal = net.head(features, measure=raw)  # (estimates from the undropped features)
    loss = bal.loss(F.cross_entropy(fused, y, reduction="none"))
    net.zero_grad()
    loss.backward()
    grads_before = {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()}
    keep = bal.state.keep
    step_before = int(bal.state.step)
    stats = bal.after_backward(unimodal, y)
    return {"raw": raw, "features": features, "unimodal": unimodal, "labels": y, "keep": keep, "stats": stats,
            "grads_before": grads_before, "step": step_before, "gen_state": gen_state}


def encoder_params(net, mode):
    out = []
    for m, enc in enumerate((net.audio, net.visual)):
        for n, p in enc.named_parameters():
            if (p.dim() == 4) if mode == "conv" else (p.dim() > 1):
                out.append((("audio." if m == 0 else "visual.") + n, m))
    return out


def reference_coeffs(unimodal, labels, mask, alpha, form, z):
    S, _ = modality_scores_reference(unimodal, labels, mask)
    rho = discrepancy_ratio_reference(S.tolist())
    return ogm_coefficients_reference(rho, alpha, form, z), rho


@pytest.mark.parametrize("name,form,noise,mode", [
    ("ogm", "paper", False, "conv"), ("ogm", "reference", False, "all"), ("ogm_ge", "paper", True, "conv"),
    ("ogm_ge", "reference", True, "all"), ("ogm_star", "star", False, "conv")])
def test_ogm_family_modulates_the_selected_gradients_by_the_reference_coefficients(gen, name, form, noise, mode):
    net = Net(int(torch.randint(0, 2**31, (), generator=gen)))
    alpha = float(torch.rand((), generator=gen)) * 2
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    kwargs = {"alpha": alpha, "weights": mode} | ({} if name == "ogm_star" else {"form": form})
    bal = mmfast.Balancer(name, {"audio": net.audio, "visual": net.visual}, seed=seed, **kwargs)
    for step in range(2):  # the second step checks that the step counter advanced
        out = run_step(net, bal, random_batch(gen))
        assert out["step"] == step
        k, _ = reference_coeffs(out["unimodal"], out["labels"], None, alpha, form, "tanh")
        selected = encoder_params(net, mode)
        expected = [out["grads_before"][n].clone() for n, _ in selected]
        grad_modulate_reference_(expected, k.float(), [m for _, m in selected], noise=noise, seed=seed, step=step)
        params = dict(net.named_parameters())
        for (n, _), e in zip(selected, expected):
            torch.testing.assert_close(params[n].grad, e, rtol=2e-5, atol=1e-7, msg=lambda msg: f"{n}: {msg}")
        selected_names = {n for n, _ in selected}
        for n, p in params.items():  # BN, biases, the head: untouched
            if n not in selected_names:
                assert torch.equal(p.grad, out["grads_before"][n]), n
        torch.testing.assert_close(bal.metrics["coeff/audio"].double(), k[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window,warmup,epoch,active", [
    ((0, None), 0, 3, True), ((2, 4), 0, 1, False), ((2, 4), 0, 2, True), ((2, 4), 0, 4, True),
    ((2, 4), 0, 5, False), ((0, None), 2, 1, False), ((0, None), 2, 2, True)])
def test_ogm_acts_inside_its_inclusive_epoch_window_after_warmup(gen, window, warmup, epoch, active):
    net = Net(1)
    bal = mmfast.Balancer("ogm", {"audio": net.audio, "visual": net.visual}, alpha=5.0, start_epoch=window[0],
                          end_epoch=window[1], warmup_epochs=warmup)
    out = run_step(net, bal, random_batch(gen), epoch=epoch)
    k, _ = reference_coeffs(out["unimodal"], out["labels"], None, 5.0, "paper", "tanh")
    weight = net.audio.conv.weight if k[0] < 1 else net.visual.conv.weight  # the dominant side
    changed = not torch.equal(weight.grad, out["grads_before"][
        "audio.conv.weight" if weight is net.audio.conv.weight else "visual.conv.weight"])
    assert changed == active


def test_ogm_refuses_a_modality_it_would_not_modulate_and_auto_covers_every_encoder():
    # audio: no 4-D weight (a Conv1d stem and a linear layer, as IRFB's audio stream); visual: a CNN.
    audio = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(8, 3))
    visual = TinyEncoder(3)
    with pytest.raises(ValueError, match=r"modulates no gradient of the encoder\(s\) \['audio'\].*weights='auto'"):
        mmfast.Balancer("ogm_ge", {"audio": audio, "visual": visual}, weights="conv")
    bal = mmfast.Balancer("ogm_ge", {"audio": audio, "visual": visual})  # the default: "auto"
    ogm = bal.methods[0]
    chosen = {id(p): m for p, m in zip(ogm.modulated, ogm.modality_index)}
    # audio: every weight of dim > 1 (it has no conv weight); visual: its 4-D conv weight only.
    assert {id(audio[0].weight): 0, id(audio[2].weight): 0, id(visual.conv.weight): 1} == chosen
    assert ogm.summary()["modulated"] == {
        "audio": {"tensors": 2, "elements": audio[0].weight.numel() + audio[2].weight.numel()},
        "visual": {"tensors": 1, "elements": visual.conv.weight.numel()}}
    assert bal.summary() == {"ogm_ge": ogm.summary()}
    everything = mmfast.Balancer("ogm", {"audio": audio, "visual": visual}, weights="all").methods[0]
    assert len(everything.modulated) == 4  # + visual.proj.weight (BN weights and biases are 1-D)


def test_opm_drops_with_the_previous_steps_probabilities(gen):
    net = Net(int(torch.randint(0, 2**31, (), generator=gen)))
    q_base, lam = 0.6, 0.9
    bal = mmfast.Balancer("opm", {"audio": net.audio, "visual": net.visual}, seed=4, q_base=q_base, lam=lam, p_exe=1.0)
    previous_q = torch.zeros(2, dtype=torch.float64)
    drops = 0
    for step in range(4):
        out = run_step(net, bal, random_batch(gen, B=40))
        g = torch.Generator()
        g.set_state(out["gen_state"])
        ref_features, ref_keep, ref_weight = feature_drop_reference(out["raw"], previous_q, p_exe=1.0, generator=g)
        assert torch.equal(out["keep"].double(), ref_keep), step
        for a, b in zip(out["features"], ref_features):
            torch.testing.assert_close(a.detach().double(), b, rtol=1e-5, atol=1e-6)
        # q for the next step from this step's scores on every sample's *undropped* features
        # (TPAMI 2024 Alg. 1, eq. 7): the weight split o_m = W_m phi_m + b / 2, written out here.
        W, b = net.head.fc.weight.detach().double(), net.head.fc.bias.detach().double()
        o = torch.stack([out["raw"][0].detach().double() @ W[:, :6].T + b / 2,
                         out["raw"][1].detach().double() @ W[:, 6:].T + b / 2])
        S, _ = modality_scores_reference(o, out["labels"])
        rho = discrepancy_ratio_reference(S.tolist())
        previous_q = opm_drop_probabilities_reference(rho, q_base, lam)
        torch.testing.assert_close(bal.methods[0].drop_probs.double(), previous_q, rtol=1e-5, atol=1e-6)
        drops += int((ref_keep == 0).sum())
    assert drops > 0  # the measurement was checked on steps that dropped features


def test_opm_does_nothing_during_warmup(gen):
    net = Net(2)
    bal = mmfast.Balancer("opm", {"audio": net.audio, "visual": net.visual}, warmup_epochs=1, q_base=1.0, p_exe=1.0)
    for _ in range(2):
        out = run_step(net, bal, random_batch(gen), epoch=0)
        assert out["keep"] is None and all(a is b for a, b in zip(out["features"], out["raw"]))
    assert not bal.methods[0].drop_probs.any()


def test_moddrop_uses_fixed_probabilities(gen):
    net = Net(3)
    bal = mmfast.Balancer("moddrop", {"audio": net.audio, "visual": net.visual}, probs={"visual": 0.5})
    out = run_step(net, bal, random_batch(gen, B=400))
    assert out["keep"][0].all()
    assert 0.35 < 1 - float(out["keep"][1].mean()) < 0.65
    with pytest.raises(ValueError, match=r"moddrop.probs names \['depth'\]"):
        mmfast.Balancer("moddrop", {"audio": net.audio, "visual": net.visual}, probs={"depth": 0.5})


def test_opm_ogm_drops_and_modulates(gen):
    net = Net(4)
    bal = mmfast.Balancer("opm_ogm", {"audio": net.audio, "visual": net.visual}, alpha=1.0, q_base=0.9, p_exe=1.0)
    assert [m.name for m in bal.methods] == ["opm", "ogm_ge"]
    run_step(net, bal, random_batch(gen))
    out = run_step(net, bal, random_batch(gen))
    assert out["keep"] is not None
    assert not torch.equal(net.audio.conv.weight.grad, out["grads_before"]["audio.conv.weight"])


def test_unimodal_trains_one_modality(gen):
    net = Net(5)
    bal = mmfast.Balancer("unimodal", {"audio": net.audio, "visual": net.visual}, modality="visual")
    out = run_step(net, bal, random_batch(gen))
    assert not out["features"][0].any() and torch.equal(out["features"][1], out["raw"][1])
    # the other encoder is out of the graph: no gradient at all
    assert net.audio.conv.weight.grad is None and net.visual.conv.weight.grad.any()
    with pytest.raises(ValueError, match="unimodal.modality='depth'"):
        mmfast.Balancer("unimodal", {"audio": net.audio, "visual": net.visual}, modality="depth")


@pytest.mark.parametrize("name,kwargs,needle", [
    ("ogm_ge", {"alpha": -1.0}, "ogm_ge.alpha must be >= 0"),
    ("opm", {"q_base": 1.5}, r"opm.q_base must be \[0, 1\]"),
    ("ogm", {"form": "nope"}, "ogm.form must be one of"),
    ("ogm", {"end_epoch": 2, "start_epoch": 3}, "ogm.end_epoch must be >= 3"),
    ("opm_ogm", {"beta": 1}, r"unknown hyper-parameter\(s\) \['beta'\]"),
    ("opm_ogm", {"kind": "difference"}, None),  # shared keys go to both parts
    ("nope", {}, "unknown method 'nope'"),
])
def test_configuration_errors_name_the_key(name, kwargs, needle):
    net = Net(6)
    make = lambda: mmfast.Balancer(name, {"audio": net.audio, "visual": net.visual}, **kwargs)  # noqa: E731
    if needle is None:
        assert all(m.params.kind == "difference" for m in make().methods)
    else:
        with pytest.raises(ValueError, match=needle):
            make()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
# (olm, boost: test_olm_boost.py; the peers' methods, with the heads and hand-overs they need: test_peer_methods.py)
@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("olm", "boost", "mmcosine", "mbsd", "cml", "agm",
                                                                "mmpareto", "pmr", "mslr", "mla", "reconboost",
                                                                "gblending", "relearning", "lfm", "amco",
                                                                "greedy", "umt")])
def test_steps_read_nothing_on_the_host(gen, name, device):
    """No host read in any step; on a GPU also no synchronisation after the first step
    (set_sync_debug_mode("error") raises; the first step is the warm-up: lazy allocations,
    Triton compilation)."""
    net = Net(7).to(device)
    kwargs = {"modality": "audio"} if name == "unimodal" else {"probs": {"audio": 0.3}} if name == "moddrop" else {}
    bal = mmfast.Balancer(name, {"audio": net.audio, "visual": net.visual}, **kwargs)
    batches = [[t.to(device) for t in random_batch(gen)] for _ in range(3)]
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for i, (xa, xv, y) in enumerate(batches):
        raw = [net.audio(xa), net.visual(xv)]
        with count_host_reads() as counts, no_device_sync(device if i else "cpu"):
            features = bal.drop(raw)
            fused, unimodal = net.head(features)
            loss = bal.loss(F.cross_entropy(fused, y, reduction="none"))
            opt.zero_grad()
            loss.backward()
            bal.after_backward(unimodal, y)
            opt.step()
        assert counts == {}, f"{name}: host reads {counts}"


def test_hyper_parameters_lists_defaults():
    assert hyper_parameters("ogm_ge")["alpha"] is None and hyper_parameters("ogm_ge")["noise"] is True
    assert hyper_parameters("opm_ogm")["q_base"] == 0.5 and hyper_parameters("opm_ogm")["p_exe"] == 1.0
    assert hyper_parameters("opm")["timing"] == "next" and hyper_parameters("ogm")["weights"] == "auto"


@pytest.mark.parametrize("form,alpha", [("paper", 1.0), ("reference", 0.8), ("star", 0.8)])
def test_each_coefficient_form_gets_its_own_default_alpha(form, alpha):
    """alpha 0.8 belongs to the public code's form 1 - tanh(alpha rho); the paper form has none
    published and defaults to 1.0; an alpha given is kept whatever the form."""
    encoders = {"audio": TinyEncoder(1), "visual": TinyEncoder(3)}
    name = "ogm_star" if form == "star" else "ogm"
    kwargs = {} if form == "star" else {"form": form}
    assert mmfast.Balancer(name, encoders, **kwargs).methods[0].balance_params()["alpha"] == alpha
    assert mmfast.Balancer(name, encoders, alpha=0.3, **kwargs).methods[0].balance_params()["alpha"] == 0.3


def test_grad_scaler_gradients_are_unscaled_before_modulation(gen):
    batch = random_batch(gen)
    results = []
    for use_scaler in (False, True):
        net = Net(8)
        bal = mmfast.Balancer("ogm", {"audio": net.audio, "visual": net.visual}, alpha=2.0)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if use_scaler else None
        xa, xv, y = batch
        fused, unimodal = net.head(bal.drop([net.audio(xa), net.visual(xv)]))
        loss = bal.loss(F.cross_entropy(fused, y, reduction="none"))
        opt.zero_grad()
        (scaler.scale(loss) if scaler else loss).backward()
        bal.after_backward(unimodal, y, scaler=scaler, optimizer=opt)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        results.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_host_read_counter_catches_reads_and_restores_tensor_methods():
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    with count_host_reads() as counts:
        t = torch.rand(3) + 1
        t.sum().item()
        bool(t.any())
        float(t[0])
        int(t[1])
        t.tolist()
        t.numpy()
        t * 2 + t.sum()  # device work: not a read
    assert counts == {"item": 1, "__bool__": 1, "__float__": 1, "__int__": 1, "tolist": 1, "numpy": 1}
    with pytest.raises(RuntimeError, match="inside"):
        with count_host_reads():
            raise RuntimeError("inside")
    assert {name: getattr(torch.Tensor, name) for name in HOST_READS} == originals
    with count_host_reads() as counts:
        pass
    assert counts == {}


def test_readme_balancer_example_runs(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "mmfast.Balancer(" in b]
    assert len(blocks) == 1, "README should hold exactly one Balancer example"
    namespace = {}
    exec(compile(blocks[0], "README.md (Balancer example)", "exec"), namespace)
    bal = namespace["bal"]
    assert int(bal.state.step) == 8  # (2 epochs of 4 steps)
    printed = capsys.readouterr().out
    assert "ratio/audio" in printed and "coeff/visual" in printed


def test_loss_terms_of_a_method_count_and_every_event_is_emitted(gen, monkeypatch):
    """A method that adds a loss term in after_forward: its term is in the loss when after_forward
    comes first (the trainer's order), and loss() refuses to run before it. Every event of
    EVENTS reaches the method, in order."""
    from mmfast.methods import EVENTS, METHODS, Method

    seen = []

    class Penalty(Method):
        name = "penalty"
        adds_loss_terms = True

        def after_forward(self, state):
            state.extra_losses["penalty"] = state.unimodal_logits.square().mean() * 0 + 2.5

    for event in EVENTS:
        if event != "after_forward":
            setattr(Penalty, event, lambda self, state, event=event: seen.append(event))
    monkeypatch.setitem(METHODS, "penalty", Penalty)
    monkeypatch.setattr("mmfast.methods.registry.NAMES", tuple(METHODS))
    net = Net(0)
    bal = mmfast.Balancer("penalty", encoders={"audio": net.audio, "visual": net.visual})
    xa, xv, y = random_batch(gen)
    bal.start_epoch(0)
    fused, unimodal = net.head(bal.drop([net.audio(xa), net.visual(xv)]))
    per_sample = F.cross_entropy(fused, y, reduction="none")
    with pytest.raises(ValueError, match="before loss"):
        bal.loss(per_sample)
    bal.after_forward(unimodal, y)
    assert torch.allclose(bal.loss(per_sample), per_sample.mean() + 2.5)
    bal.loss(per_sample).backward()
    bal.after_backward()
    bal.after_step()
    bal.end_epoch()
    bal.observe_head_losses(torch.ones(3), torch.ones(3), epoch=0)
    assert seen == ["fit_start", "epoch_start", "before_fusion", "after_backward", "after_step", "epoch_end",
                    "head_losses"]
