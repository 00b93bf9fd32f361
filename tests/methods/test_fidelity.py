"""The methods compute what their papers compute, checked against the papers' formulas written out
here (not against mmfast's own code paths):

- OPM measures the imbalance on every sample's *undropped* features (TPAMI 2024 Alg. 1, eq. 7) and
  drops the next step with q_{t+1} from that ratio (eq. 8); timing="current" (the public code's)
  drops this batch with this batch's q.
- OGM's ratio is that of the whole mini-batch under gradient accumulation.
- OGM modulates every encoder, whatever its layers (the paper: all of the encoder's parameters).
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmfast
from mmfast.config import load_config
from mmfast.data import generate
from mmfast.models.estimators import ConcatHead
from mmfast.trainer import Trainer

try:
    import nvidia.dali  # noqa: F401
    HAS_DALI = True
except ImportError:
    HAS_DALI = False
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="trains on the embedded dataset through DALI")


def paper_ratio(unimodal, labels):
    """rho^m = 1/(M-1) sum_{j != m} S^m / S^j, S^m = sum over the batch of softmax(o_m)[y] (eq. 7)."""
    S = [float(F.softmax(o.double(), dim=1).gather(1, labels.view(-1, 1)).sum()) for o in unimodal]
    M = len(S)
    return [sum(S[m] / S[j] for j in range(M) if j != m) / (M - 1) for m in range(M)]


def paper_drop_probability(rho, q_base, lam):
    """q^m_{t+1} = q_base (1 + lam tanh(rho - 1)) if rho > 1 else 0, at most 1 (eq. 8)."""
    return min(q_base * (1 + lam * math.tanh(rho - 1)), 1.0) if rho > 1 else 0.0


@pytest.fixture(scope="module")
def audio_dominant(tmp_path_factory):
    if not HAS_DALI:
        pytest.skip("trains on the embedded dataset through DALI")
    return generate(tmp_path_factory.mktemp("fidelity") / "cremad", clips=200, seed=11, dominant="audio")


def test_opm_on_audio_dominant_data_measures_undropped_features_and_never_drops_the_weak_modality(
        audio_dominant, tmp_path):
    """The trainer's opm, step by step: the q it keeps for the next step is eq. 8 of the ratio of
    the undropped features of the whole batch, computed here from the encoders' outputs and the
    head's weight split; so the weak visual modality is never dropped on a step after one where
    its undropped ratio was below 1, and once audio leads, its mean q is at least q_base."""
    q_base, lam = 0.5, 0.5
    cfg = load_config("embedded", [f"data.root={audio_dominant}", f"out={tmp_path / 'run'}", "epochs=6",
                                   "data.batch_size=16", "data.size=32", "data.num_workers=1", "progress=false",
                                   "precision=fp32", "method=opm", f"hparams.q_base={q_base}", f"hparams.lam={lam}"])
    trainer = Trainer(cfg)
    opm = trainer.balancer.methods[0]
    fc = trainer.model.fusion.fc
    d_audio = trainer.model.fusion.in_dims[0]
    measured = []
    encode = trainer.model.encode

    def encode_and_measure(batch, skip=()):
        features = encode(batch, skip=skip)  # (undropped: the drop comes after encode)
        W, b = fc.weight.detach().double(), fc.bias.detach().double()
        measured.append(torch.stack([features[0].detach().double() @ W[:, :d_audio].T + b / 2,
                                     features[1].detach().double() @ W[:, d_audio:].T + b / 2]))
        return features

    trainer.model.encode = encode_and_measure
    records = []  # per step: (epoch, undropped rho [audio, visual], q kept for the next step)
    train_step = trainer.train_step

    def recorded_step(batch, **kwargs):
        measured.clear()
        train_step(batch, **kwargs)
        rho = paper_ratio(measured[0], batch["label"])
        records.append((trainer.epoch, rho, opm.drop_probs.tolist()))

    trainer.train_step = recorded_step
    trainer.fit()
    later = [r for r in records if r[0] >= 3]  # (audio leads from about epoch 2 on this small split)
    for epoch, rho, q in later:
        expected = [paper_drop_probability(r, q_base, lam) for r in rho]
        assert q == pytest.approx(expected, rel=1e-4, abs=1e-6), (epoch, rho)
    weak_steps = [q[1] for _, rho, q in later if rho[1] < 1]
    assert len(weak_steps) >= len(later) // 2, "visual was not the weak modality: the data is not audio-dominant"
    assert all(q == 0 for q in weak_steps)
    assert sum(q[0] for _, _, q in later) / len(later) >= q_base
    # The run's log: per epoch, the mean probability each modality was dropped with and the share
    # of steps it was dropped on.
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for line in lines[3:]:
        steps = [r for r in records if r[0] == line["epoch"]]
        if all(rho[1] < 1 for _, rho, _ in steps[:-1]):  # (the last step's q drops the next epoch)
            assert line["train/dropped_step/visual"] == 0 and line["train/drop_prob/visual"] == 0
        assert 0 < line["train/dropped_step/audio"] <= 1 and line["train/drop_prob/audio"] > 0


class Net(nn.Module):
    """Encoders without batch statistics, so that micro-batches encode as the whole batch does."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.audio = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 7 * 7, 6))
        self.visual = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 7 * 7, 6))
        self.head = ConcatHead([6, 6], 5)


@pytest.mark.parametrize("method", ["ogm", "opm"])
def test_gradient_accumulation_measures_the_whole_mini_batch(gen, method):
    """k micro-batches accumulated into one step give the coefficients (and OPM's next q) of one
    batch of k times the size: the score sums add over the micro-batches before the ratio."""
    k, b = 3, 8
    xa, xv = torch.randn(k * b, 1, 9, 9, generator=gen), torch.randn(k * b, 3, 9, 9, generator=gen)
    y = torch.randint(0, 5, (k * b,), generator=gen)
    hparams = {"alpha": 0.9} if method == "ogm" else {"p_exe": 0.0}  # (opm: measure only, drop nothing)
    results = []
    for chunks in (1, k):
        net = Net(7)
        bal = mmfast.Balancer(method, {"audio": net.audio, "visual": net.visual}, **hparams)
        bal.start_epoch(0)
        for i in range(chunks):
            rows = slice(i * len(y) // chunks, (i + 1) * len(y) // chunks)
            features = [net.audio(xa[rows]), net.visual(xv[rows])]
            fused, unimodal = net.head(bal.drop(features), measure=features)
            bal.after_forward(unimodal, y[rows])
            (bal.loss(F.cross_entropy(fused, y[rows], reduction="none")) / chunks).backward()
        stats = bal.after_backward()
        results.append((stats, bal.methods[0], [p.grad.clone() for p in net.parameters()]))
    (whole, m_whole, g_whole), (accumulated, m_acc, g_acc) = results
    with torch.no_grad():
        net = Net(7)
        rho = paper_ratio(net.head([net.audio(xa), net.visual(xv)])[1], y)
    torch.testing.assert_close(accumulated.ratio.double(), torch.tensor(rho, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(accumulated.ratio, whole.ratio, rtol=1e-5, atol=0)
    torch.testing.assert_close(accumulated.coeffs, whole.coeffs, rtol=1e-5, atol=0)
    if method == "opm":
        torch.testing.assert_close(m_acc.drop_probs, m_whole.drop_probs, rtol=1e-5, atol=0)
    else:
        assert bool((whole.coeffs < 1).any()), "nothing was modulated: nothing compared"
        for a, w in zip(g_acc, g_whole):
            torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-6)


def test_opm_timing_next_drops_with_the_previous_steps_q_and_current_with_this_batchs(gen):
    """timing="next" (the paper): step t drops with q from step t-1's undropped ratio;
    timing="current" (the public code): with q from step t's own undropped ratio."""
    q_base, lam = 0.7, 0.8
    for timing in ("next", "current"):
        net = Net(3)
        estimate = lambda features: net.head(features)[1]  # noqa: E731
        bal = mmfast.Balancer("opm", {"audio": net.audio, "visual": net.visual}, q_base=q_base, lam=lam, p_exe=1.0,
                              timing=timing, estimate=estimate, seed=5)
        bal.start_epoch(0)
        previous = [0.0, 0.0]
        for step in range(4):
            xa, xv = torch.randn(24, 1, 9, 9, generator=gen), torch.randn(24, 3, 9, 9, generator=gen)
            y = torch.randint(0, 5, (24,), generator=gen)
            features = [net.audio(xa), net.visual(xv)]
            with torch.no_grad():
                rho = paper_ratio(net.head(features)[1], y)
            own = [paper_drop_probability(r, q_base, lam) for r in rho]
            dropped = bal.drop(features, labels=y)
            applied = bal.state.metrics["drop_prob/audio"], bal.state.metrics["drop_prob/visual"]
            assert [float(a) for a in applied] == pytest.approx(own if timing == "current" else previous, abs=1e-6)
            fused, unimodal = net.head(dropped, measure=features)
            bal.loss(F.cross_entropy(fused, y, reduction="none")).backward()
            bal.after_backward(unimodal, y)
            previous = own
    with pytest.raises(ValueError, match="estimate="):
        mmfast.Balancer("opm", {"audio": net.audio, "visual": net.visual}, timing="current")


def test_ogm_modulates_irfbs_audio_stream_by_default(audio_dominant, tmp_path):
    """IRFB's audio stream has no 4-D weight (a Conv1d stem, Transformer blocks): the default
    weights="auto" modulates its weights of dim > 1, and so it does for the visual stream, whose
    conv stem holds few of its weights; summary.json says how much per modality."""
    cfg = load_config("embedded", [f"data.root={audio_dominant}", f"out={tmp_path / 'run'}", "epochs=1",
                                   "data.batch_size=16", "data.size=32", "data.num_workers=1", "progress=false",
                                   "precision=fp32", "method=ogm_ge", "model.fusion=irfb"])
    trainer = Trainer(cfg)
    ogm = trainer.balancer.methods[0]
    for m, name in enumerate(("audio", "visual")):  # (visual: a conv stem, then Transformer blocks)
        stream = trainer.model.encoders[name]
        expected = {id(p) for p in stream.parameters() if p.dim() > 1}
        assert expected and expected == {id(p) for p, i in zip(ogm.modulated, ogm.modality_index) if i == m}, name
    audio = trainer.model.encoders["audio"]
    summary = trainer.fit(max_steps=None)
    coverage = summary["methods"]["ogm_ge"]["modulated"]
    assert coverage["audio"]["elements"] == sum(p.numel() for p in audio.parameters() if p.dim() > 1)
    assert coverage["visual"]["tensors"] > 0
    with pytest.raises(ValueError, match=r"modulates no gradient of the encoder\(s\) \['audio'\]"):
        Trainer(load_config("embedded", [f"data.root={audio_dominant}", f"out={tmp_path / 'conv'}",
                                         "data.num_workers=1", "progress=false", "method=ogm_ge",
                                         "model.fusion=irfb", "hparams.weights=conv"]))


def test_dataset_configs_apply_their_published_recipe_to_the_method_that_runs():
    """crema_d.yaml is the public code's CREMA-D recipe: its OGM-GE uses the code's form with its
    alpha 0.8 over epochs 0..50, its OPM the code's timing and p_exe, boost its paper's lr,
    plateau schedule and T = 20; the command line still wins; other methods get nothing."""
    ogm = load_config("crema_d", ["method=ogm_ge"])
    assert ogm.hparams == {"form": "reference", "alpha": 0.8, "end_epoch": 50} and ogm.data.batch_size == 64
    assert load_config("crema_d", ["method=opm"]).hparams == {"timing": "current", "p_exe": 0.7}
    boost = load_config("crema_d", ["method=boost", "optim.lr=0.02", "hparams.interval=3"])
    assert boost.optim.scheduler == "plateau" and boost.optim.lr == 0.02 and boost.hparams["interval"] == 3
    assert load_config("crema_d", ["method=joint"]).hparams == {} and load_config("crema_d").optim.lr == 0.001
    paper = load_config("crema_d_tpami", ["method=ogm_ge"])
    assert paper.hparams == {} and paper.data.batch_size == 32  # the paper's batch and the methods' paper defaults
    vgg = load_config("vggsound", ["method=ogm_ge"])
    assert vgg.hparams["alpha"] == 0.1 and load_config("vggsound", ["method=boost"]).data.batch_size == 16
    assert load_config("kinetics_sounds").model.irfb == {"depth": 6}


DOC_PAGES = {"ogm": "ogm.md", "ogm_ge": "ogm.md", "ogm_star": "ogm.md", "opm": "opm.md", "moddrop": "opm.md",
             "olm": "olm.md", "boost": "boost.md", **{name: f"{name}.md" for name in (
                 "mmcosine", "mbsd", "cml", "agm", "mmpareto", "pmr", "mslr", "mla", "reconboost", "gblending",
                 "relearning", "lfm", "amco", "greedy", "umt", "resample")}}


def test_every_method_with_hyper_parameters_has_a_page():
    from mmfast.methods import hyper_parameters
    from mmfast.methods.registry import METHODS

    assert {name for name in METHODS if hyper_parameters(name)} - {"unimodal"} <= set(DOC_PAGES)


@pytest.mark.parametrize("method", sorted(DOC_PAGES))
def test_every_hyper_parameter_has_its_default_and_source_on_the_methods_page(method):
    """docs/methods/<page>.md lists each hyper-parameter of the method in its table of defaults
    (a row starting with the name), so a new parameter cannot ship without its source."""
    from pathlib import Path

    from mmfast.methods import hyper_parameters

    page = (Path(__file__).resolve().parents[2] / "docs" / "methods" / DOC_PAGES[method]).read_text(encoding="utf-8")
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    for name in hyper_parameters(method):
        assert any(f"`{name}`" in row.split("|")[1] for row in rows), f"{method}.{name} has no row in {DOC_PAGES[method]}"


def test_nothing_in_the_repository_points_outside_it():
    """The docs and code refer to files a clone has: no path into the development workspace."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    try:
        files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    # (the project's own page is docs/reference-semantics.md; these are paths and section numbers of
    # the development workspace's files)
    needles = ("../shared", "shared/reference-semantics", "shared/notes", "shared/seeds", "reference semantics section")
    offenders = [f for f in files if f.endswith((".py", ".md", ".yaml", ".txt", ".sh", ".toml", ".cpp", ".h", ".cu"))
                 and f != "tests/methods/test_fidelity.py"
                 and any(n in (root / f).read_text(encoding="utf-8", errors="replace") for n in needles)]
    assert offenders == []


def test_boost_grows_without_a_bound_by_default():
    """The paper sets no bound on a modality's classifiers (its Table 5 reaches 10 and 12): with
    the paper's rule every ACA adds one, past the old cap of 4."""
    from mmfast.models import BoostedClassifiers

    torch.manual_seed(0)
    encoders = {"audio": nn.Linear(4, 6), "visual": nn.Linear(3, 6)}
    head = BoostedClassifiers([6, 6], 5)
    opt = torch.optim.SGD([*head.parameters()], lr=0.1)
    bal = mmfast.Balancer("boost", encoders, head=head, optimizer=opt, aca_max_steps=50)
    assert bal.methods[0].params.max_classifiers is None
    for epoch in range(6):
        bal.start_epoch(epoch)
        x = [torch.randn(8, 4), torch.randn(8, 3)]
        fused, unimodal, extra = head([encoders["audio"](x[0]), encoders["visual"](x[1])])
        bal.after_forward(unimodal, torch.randint(0, 5, (8,)), fused=fused, extras=extra)
        bal.loss().backward()
        bal.after_backward()
        bal.after_step()
        bal.end_epoch()
    assert sum(head.counts()) == 2 + 6 and max(head.counts()) >= 4


@pytest.mark.parametrize("fusion", ["concat", "sum", "mlp", "late"])
def test_with_a_drop_training_sees_the_dropped_features_and_the_measurement_the_undropped(fusion):
    """Every head: the fused logits (and a late head's trainable per-modality logits) come from
    what the drop left, with autograd; the uni-modal logits the statistics read come from the
    undropped features, without autograd."""
    from mmfast.models import LateHeads
    from mmfast.models.fusion import make_fusion
    from mmfast.steps import step_forward

    torch.manual_seed(1)

    class Model(nn.Module):
        modalities = ["audio", "visual"]

        def __init__(self):
            super().__init__()
            self.audio, self.visual = nn.Linear(5, 6), nn.Linear(4, 6)
            self.fusion = LateHeads([6, 6], 3) if fusion == "late" else make_fusion(fusion, [6, 6], 3)

        def encode(self, batch, skip=()):
            return [self.audio(batch["audio"]), self.visual(batch["visual"])]

        def head(self, features, measure=None):
            return self.fusion(features) if measure is None else self.fusion(features, measure=measure)

    model = Model()
    batch = {"audio": torch.randn(7, 5), "visual": torch.randn(7, 4)}
    keep = torch.tensor([1.0, 0, 1, 1, 0, 1, 1])

    def drop(features):  # drops audio of samples 1 and 4
        return [features[0] * keep[:, None], features[1]]

    estimate = lambda features, unimodal: unimodal  # noqa: E731
    fused, unimodal, extra, measured = step_forward(model, estimate, batch, drop=drop)
    features = model.encode(batch)
    with torch.no_grad():
        plain_fused, plain_unimodal, *_ = model.head(drop(features))
        undropped = model.head(features)[1]
    torch.testing.assert_close(fused, plain_fused)
    torch.testing.assert_close(measured, undropped)
    assert not measured.requires_grad and "measured" not in extra
    if fusion == "late":  # (the per-modality classifiers train on what the drop left)
        torch.testing.assert_close(unimodal, plain_unimodal)
        assert unimodal.requires_grad
    (fused.sum() + (unimodal.sum() if unimodal.requires_grad else 0)).backward()
    assert model.audio.weight.grad is not None and model.fusion.parameters().__next__().grad is not None
