"""``greedy`` (mmfast/methods/greedy.py) and its MMTM blocks (mmfast/models/mmtm.py), against the
official code's computation written out (peer-methods step-level test): (i) the MMTM block and
its gate substitution, (ii) the conditional learning speeds from gradients and parameters,
(iii) the curation state machine on a scripted sequence of d, and the loss."""
import math

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast.config import load_config
from mmfast.methods.greedy import bdr_difference, next_flags
from mmfast.models import build_model
from mmfast.models.mmtm import MMTMBlock
from mmfast.diagnostics import count_host_reads
from support import no_device_sync, requires_cuda

C = 5


def mmtm_reference(block, maps, frames, average_before, calls, substitute):
    """The block's formulas in float64: squeeze, excitation, the running mean including this
    batch, the substituted gates, the gated maps."""
    d = lambda t: t.detach().double()  # noqa: E731
    s = [x.double().view(x.shape[0] // t, t, x.shape[1], -1).mean(dim=(1, 3)) for x, t in zip(maps, frames)]
    z = torch.relu(torch.cat(s, 1) @ d(block.squeeze.weight).T + d(block.squeeze.bias))
    e = [torch.sigmoid(z @ d(fc.weight).T + d(fc.bias)) for fc in block.excite]
    averages = [(g.mean(0) + a.double() * calls) / (calls + 1) for g, a in zip(e, average_before)]
    used = [a.expand_as(g) if sub else g for g, a, sub in zip(e, averages, substitute)]
    out = [x.double() * g.repeat_interleave(t, 0)[:, :, None, None] for x, g, t in zip(maps, used, frames)]
    return out, averages


@pytest.mark.parametrize("substitute", [(False, False), (True, False), (False, True)])
def test_mmtm_block_follows_its_formulas_and_substitutes_the_running_average(gen, substitute):
    block = MMTMBlock([6, 4], ratio=4)
    B, frames = 3, [1, 2]
    block.train()
    for calls in range(3):  # a few forwards: the average is the mean of the batch means over calls
        maps = [torch.randn(B * frames[0], 6, 5, 4, generator=gen),
                torch.randn(B * frames[1], 4, 3, 3, generator=gen, requires_grad=True)]
        before = [a.clone() for a in block.averages()]
        out = block(maps, frames, torch.tensor(substitute))
        expected, averages = mmtm_reference(block, maps, frames, before, calls, substitute)
        for o, e in zip(out, expected):
            torch.testing.assert_close(o.double(), e, rtol=1e-5, atol=1e-6)
        for a, e in zip(block.averages(), averages):
            torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-7)
    block.zero_grad()
    sum(o.sum() for o in out).backward()
    for m, sub in enumerate(substitute):  # a substituted gate lets no gradient into its layer
        fc = block.excite[m]  # (the bias always feeds the live gate; the weight only through ReLU units alive)
        assert (fc.bias.grad.abs().sum() == 0) == sub
        assert not sub or fc.weight.grad.abs().sum() == 0
    # evaluation: live gates, the averages untouched
    block.eval()
    frozen = [a.clone() for a in block.averages()]
    out = block(maps, frames, torch.tensor([True, True]))
    expected, _ = mmtm_reference(block, maps, frames, frozen, 0, (False, False))
    torch.testing.assert_close(out[1].double(), expected[1], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(frozen, block.averages()))


def test_mmtm_model_encodes_every_stage_and_matches_the_encoders_without_gates(gen):
    torch.manual_seed(int(torch.randint(1 << 30, (), generator=gen)))
    model = build_model({"audio": "audio", "visual": "frames"}, C, fusion="sum", mmtm=(2, 4))
    batch = {"audio": torch.randn(2, 32, 24, generator=gen), "visual": torch.randn(2, 3, 3, 32, 32, generator=gen)}
    model.eval()
    for block in model.mmtm.blocks.values():  # gates of exactly 1: the encoders' own features
        for fc in block.excite:
            torch.nn.init.zeros_(fc.weight)
            torch.nn.init.constant_(fc.bias, 1e4)
    features = model.encode(batch)
    plain = [model.encoders["audio"](batch["audio"].unsqueeze(1)), model.encoders["visual"](batch["visual"])]
    for f, p in zip(features, plain):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot skip"):
        model.encode(batch, skip={"audio"})
    with pytest.raises(ValueError, match="distinct encoder stages"):
        build_model({"audio": "audio", "visual": "frames"}, C, mmtm=(2, 2))
    with pytest.raises(ValueError, match="pooled encoders"):
        build_model({"audio": "audio", "visual": "frames"}, C, fusion="irfb", mmtm=(2,), in_dims={"audio": 32})


def make(gen, fusion="sum"):
    torch.manual_seed(int(torch.randint(1 << 30, (), generator=gen)))
    model = build_model({"audio": "audio", "visual": "frames"}, C, fusion=fusion, width=4, mmtm=(2, 3, 4))
    batch = {"audio": torch.randn(4, 32, 24, generator=gen), "visual": torch.randn(4, 2, 3, 32, 32, generator=gen)}
    return model, batch, torch.randint(0, C, (4,), generator=gen)


def train_step(bal, model, batch, y, opt=None):
    """One step through the Balancer (an optimizer step when `opt` is given)."""
    features = bal.drop(model.encode(batch))
    fused, unimodal = model.fusion(features)
    bal.after_forward(unimodal, y, fused=fused)
    model.zero_grad()
    bal.loss().backward()
    bal.after_backward()
    if opt is not None:
        opt.step()
        bal.after_step()


def speeds_reference(model):
    """The official measurement: per named parameter, main parameters of modality m (its encoder
    and its classifier), bypass parameters (its MMTM excitation, and the shared squeeze for both)."""
    gn, wn = {}, {}
    for name, p in model.named_parameters():
        if name.startswith("mmtm."):
            owners = [int(name.split(".")[4])] if ".excite." in name else [0, 1]
            keys = [f"byp{m}" for m in owners]
        elif name.startswith("encoders."):
            keys = [f"main{['audio', 'visual'].index(name.split('.')[1])}"]
        else:  # the sum head's classifiers: fusion.fcs.<m>
            keys = [f"main{int(name.split('.')[2])}"]
        for k in keys:
            gn[k] = gn.get(k, 0.0) + float(p.grad.double().pow(2).sum())
            wn[k] = wn.get(k, 0.0) + float(p.detach().double().pow(2).sum())
    return [gn[k] / wn[k] for k in ("main0", "main1", "byp0", "byp1")]


@pytest.mark.parametrize("loss", ["branches", "fused"])
def test_greedy_loss_and_speeds_follow_the_official_computation(gen, loss):
    model, batch, y = make(gen)
    bal = mmfast.Balancer("greedy", dict(model.encoders.items()), head=model.fusion, mmtm=model.mmtm, loss=loss)
    method = bal.methods[0]
    bal.start_epoch(0)  # (before start_epoch: measured every step, nothing curated)
    model.train()
    features = bal.drop(model.encode(batch))
    fused, unimodal = model.fusion(features)
    bal.after_forward(unimodal, y, fused=fused)
    total = bal.loss()
    o = torch.stack([fc(f) for fc, f in zip(model.fusion.fcs, features)])
    expected = (F.cross_entropy(o[0], y) + F.cross_entropy(o[1], y) if loss == "branches"
                else F.cross_entropy(o.sum(0), y))
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    model.zero_grad()
    total.backward()
    bal.after_backward()
    ref = speeds_reference(model)
    torch.testing.assert_close(method.sums, torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=0)
    d = math.log10(ref[2] / ref[0]) - math.log10(ref[3] / ref[1])
    # (d is a difference of logs, near 0 on some seeds: an absolute bound from the four sums'
    # float32 accumulation, ~1e-7 relative each, instead of a relative one)
    assert float(method.d) == pytest.approx(d, rel=1e-5, abs=1e-6)
    assert not bool(model.mmtm.curating)


def official_state_machine(ds, eps, window):
    """The official callback's state machine in plain Python: per step (curating, caring, t)
    after the step, and whether d was accumulated at that step."""
    curating, caring, t, out = False, 0, 0, []
    for d in ds:
        measured = not curating
        if not curating:
            if abs(d) > eps:
                curating, t, caring = True, 0, 0 if d > 0 else 1
            else:
                curating, caring = False, 0
        else:
            t += 1
            if t == window:
                curating = False
        out.append((curating, caring, t, measured))
    return out


def test_curation_state_machine_follows_the_official_callback(gen):
    eps, window = 0.01, 3
    ds = (torch.randn(40, generator=gen) * 0.02).tolist()
    curating = torch.zeros((), dtype=torch.bool)
    caring = torch.zeros((), dtype=torch.int64)
    t = torch.zeros((), dtype=torch.int64)
    for d, (c_ref, k_ref, t_ref, _) in zip(ds, official_state_machine(ds, eps, window)):
        curating, caring, t = next_flags(curating, caring, t, torch.tensor(d, dtype=torch.float64), eps, window)
        assert (bool(curating), int(caring)) == (c_ref, k_ref)
        if c_ref:
            assert int(t) == t_ref


def test_greedy_accumulates_only_while_measuring_and_curates_the_next_forwards(gen):
    model, batch, y = make(gen)
    bal = mmfast.Balancer("greedy", dict(model.encoders.items()), head=model.fusion, mmtm=model.mmtm, window=2,
                          eps=0.0)
    method = bal.methods[0]
    bal.start_epoch(1)
    model.train()
    script = [torch.tensor([1.0, 1.0, 2.0, 1.0], dtype=torch.float64),  # d = log10 2 > 0: curate audio
              torch.tensor([5.0, 5.0, 5.0, 5.0], dtype=torch.float64)]
    speeds = iter([script[0]] + [script[1]] * 5)  # (asked every step, used only when measuring)
    method.speeds = lambda: next(speeds)
    seen = []
    for step in range(5):
        gates_before = [b.calls.clone() for b in model.mmtm.blocks.values()]
        substitute = model.mmtm.substitute().clone()
        seen.append((bool(model.mmtm.curating), int(model.mmtm.caring), substitute.tolist()))
        train_step(bal, model, batch, y)
        assert all(int(b.calls) == int(g) + 1 for b, g in zip(model.mmtm.blocks.values(), gates_before))
        if step == 0:  # audio's excitation got no gradient only while curated: not yet
            assert model.mmtm.blocks["2"].excite[0].bias.grad.abs().sum() > 0
        if seen[-1][0]:
            assert model.mmtm.blocks["2"].excite[seen[-1][1]].bias.grad.abs().sum() == 0
    # step 0 measures and starts curating audio (0) for the next forwards; steps 1 and 2 curate
    # (not measured; the window of 2 ends after step 2); step 3 measures again (|d| > eps = 0:
    # curating again from the sums with step 3's speeds); step 4 curates
    assert [s[0] for s in seen] == [False, True, True, False, True]
    assert seen[1][2] == [True, False] and seen[4][1] == 0
    expected = script[0] + script[1]  # steps 0 and 3 accumulated, steps 1, 2 and 4 did not
    torch.testing.assert_close(method.sums, expected)
    assert float(method.d) == pytest.approx(float(bdr_difference(expected)))


def test_greedy_refuses_what_it_cannot_measure():
    model = build_model({"audio": "audio", "visual": "frames"}, C, fusion="sum", width=4)
    with pytest.raises(ValueError, match="MMTM blocks"):
        mmfast.Balancer("greedy", dict(model.encoders.items()), head=model.fusion)
    with pytest.raises(ValueError, match="greedy.window"):
        mmfast.Balancer("greedy", dict(model.encoders.items()), head=model.fusion, window=0)
    with pytest.raises(ValueError, match="needs MMTM blocks"):
        load_config("embedded", ["method=greedy", "model.mmtm=[]"])
    with pytest.raises(ValueError, match="distinct encoder stages"):
        load_config("embedded", ["method=joint", "model.mmtm=[0, 2]"])
    with pytest.raises(ValueError, match="compile"):
        load_config("embedded", ["method=greedy", "compile=true"])
    assert load_config("embedded", ["method=greedy"]).model.mmtm is None  # (resolved when the model is built)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_greedy_steps_read_nothing_on_the_host(gen, device):
    """Measuring, starting, running and ending curation: no host read (on a GPU, no
    synchronisation after the warm-up step)."""
    model, batch, y = make(gen)
    model.to(device).train()
    batch, y = {k: v.to(device) for k, v in batch.items()}, y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    bal = mmfast.Balancer("greedy", dict(model.encoders.items()), head=model.fusion, mmtm=model.mmtm, eps=0.0,
                          window=2)
    bal.start_epoch(1)
    for i in range(5):
        with count_host_reads() as counts, no_device_sync(device if i else "cpu"):
            train_step(bal, model, batch, y, opt)
        assert counts == {}, f"host reads {counts}"
    assert bool(model.mmtm.curating)  # (eps 0: it curated)


def test_a_step_with_a_non_finite_gradient_is_not_measured(gen):
    """(fp16: the GradScaler skips such a step) the sums stay finite and curation goes on from them."""
    model, batch, y = make(gen)
    bal = mmfast.Balancer("greedy", dict(model.encoders.items()), head=model.fusion, mmtm=model.mmtm, eps=0.0)
    method = bal.methods[0]
    bal.start_epoch(1)
    model.train()
    train_step(bal, model, batch, y)  # measured: curating from here
    sums, flags = method.sums.clone(), (bool(model.mmtm.curating), int(model.mmtm.caring))
    model.mmtm.curating.fill_(False)  # (not curating: this step would measure)
    features = bal.drop(model.encode(batch))
    fused, unimodal = model.fusion(features)
    bal.after_forward(unimodal, y, fused=fused)
    model.zero_grad()
    bal.loss().backward()
    next(model.encoders["audio"].parameters()).grad.view(-1)[0] = float("inf")
    bal.after_backward()
    assert torch.equal(method.sums, sums) and torch.isfinite(method.d)
    assert not bool(model.mmtm.curating) and flags[0]
