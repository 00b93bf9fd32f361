"""Three modalities end to end through the trainer: every method of the registry that allows more
than two modalities trains one epoch on a tiny dataset of three features modalities (CMU-MOSEI's
shape: audio, visual and text as feature sequences), with a finite loss, every encoder it trains
changed and no host read in a training step; the methods and fusions defined for two modalities refuse three with an error
that says what to use; a run resumed mid-epoch gives bitwise the parameters of one run straight
through; and the embedded dataset's three-modality variant trains through its shipped config
(DALI, the decoded-sample cache holding its audio and video but not its text)."""
import csv
import math

import numpy as np
import pytest
import torch

import mmfast.methods as methods
from mmfast.config import load_config
from mmfast.trainer import Trainer, resume
from support import count_step_reads

pytest.importorskip("nvidia.dali")
pytest.importorskip("sklearn")

DIMS = {"acoustic": 6, "facial": 4, "words": 8}
# Hyper-parameters a method needs on this data (names of its modalities; schedules that fit the run)
HPARAMS = {"unimodal": ["hparams.modality=words"], "moddrop": ["hparams.probs={acoustic: 0.3, words: 0.2}"],
           "mslr": ["hparams.lr_scales={acoustic: 0.5}"], "gblending": ["hparams.super_epoch=2"],
           "relearning": ["hparams.interval=1", "hparams.times=1"],
           "boost": ["hparams.aca_rule=weakest", "hparams.aca_max_steps=50"],
           # (a stage of one epoch per modality: the three modalities in turn)
           "reconboost": ["hparams.phase1_epochs=1", "hparams.phase2_epochs=0", "epochs=3"]}
# What refuses three modalities, and the error that says what to use instead.
REFUSALS = {"boost": ("boost.aca_rule='paper' is written for two modalities; with 3 \\(acoustic, facial, words\\) "
                      "use aca_rule='weakest'"),
            "boost dead_zone": "boost.aca_rule='dead_zone' is written for two modalities; with 3",
            "joint film": "fusion='film' combines exactly 2 modalities, got 3; use concat, sum or mlp",
            "joint gated": "fusion='gated' combines exactly 2 modalities, got 3; use concat, sum or mlp"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """15 clips of three classes (12 train, 3 val; no test split, so the run keeps its last
    parameters: with one it ends on the best epoch's), each modality's sequences of 2 to 12 steps
    carrying a class direction in noise."""
    root = tmp_path_factory.mktemp("mosei_like")
    rng = np.random.default_rng(0)
    for m in DIMS:
        (root / m).mkdir()
    with (root / "clips.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["clip", "label", "split"])
        for i in range(15):
            label = i % 3
            for m, d in DIMS.items():
                x = rng.standard_normal((int(rng.integers(2, 13)), d)) + np.eye(d)[label]
                np.save(root / m / f"u{i:02d}.npy", x.astype(np.float32))
            writer.writerow([f"u{i:02d}", f"class{label}", "train" if i < 12 else "val"])
    return root


def make_config(dataset, out, *overrides):
    return load_config(None, [f"data.root={dataset}", "data.layout=generic", f"out={out}",
                              "data.modalities={acoustic: features, facial: features, words: features}",
                              "data.backend=naive", "data.num_workers=0", "data.batch_size=6", "data.feature_length=8",
                              "model.width=4", "epochs=1", "optim.lr=0.05", "optim.scheduler=none", "progress=false",
                              "precision=fp32", *overrides])


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """(The run's plots are matplotlib's work, tested elsewhere: 0.3 s a run saved here.)"""
    import mmfast.plots

    monkeypatch.setattr(mmfast.plots, "plot_run", lambda run_dir: None)


def parameters(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


@pytest.mark.parametrize("method", [m for m in methods.NAMES])
def test_every_method_that_allows_three_modalities_trains_with_three(dataset, tmp_path, method):
    trainer = Trainer(make_config(dataset, tmp_path / method, f"method={method}", *HPARAMS.get(method, [])))
    assert len(trainer.model.modalities) == 3
    before = parameters(trainer)
    reads = count_step_reads(trainer)
    trainer.fit()
    assert reads and all(r == {} for r in reads), reads  # (masks and all: nothing read on the host in a step)
    assert all(math.isfinite(line["train/loss"]) for line in trainer.history)
    after = parameters(trainer)
    assert all(torch.isfinite(v).all() for v in after.values())
    trained = [m for m in trainer.model.modalities if m not in trainer.balancer.unused_modalities]
    assert trained == (["words"] if method == "unimodal" else list(DIMS))
    for m in trained:  # every encoder the method trains has moved
        prefix = f"encoders.{m}."
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), m


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_is_defined_for_two_modalities_refuses_three_saying_what_to_use(dataset, tmp_path, case):
    method, _, variant = case.partition(" ")
    extra = {"dead_zone": ["hparams.aca_rule=dead_zone"], "film": ["model.fusion=film"],
             "gated": ["model.fusion=gated"]}.get(variant, [])
    with pytest.raises(ValueError, match=REFUSALS[case]):
        Trainer(make_config(dataset, tmp_path / "refused", f"method={method}", *extra))
    assert not (tmp_path / "refused" / "checkpoints").exists()


def test_a_run_resumed_mid_epoch_gives_the_parameters_of_one_straight_through(dataset, tmp_path):
    extra = ["method=agm", "epochs=2", "data.feature_train_offset=random"]  # (agm reruns the model on zeroed inputs)
    full = Trainer(make_config(dataset, tmp_path / "full", *extra))
    full.fit()
    killed = Trainer(make_config(dataset, tmp_path / "killed", *extra))
    assert killed.fit(max_steps=3) is None  # one epoch and a batch of the next
    resumed = resume(tmp_path / "killed")
    assert (resumed.epoch, resumed.batch_in_epoch) == (1, 1)
    resumed.fit()
    a, b = parameters(full), parameters(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_three_modality_embedded_variant_trains_through_its_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MMFAST_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "embedded_text"
    cfg = load_config("embedded_text", [f"data.root={root}", f"out={tmp_path / 'run'}", "epochs=1",
                                        "data.synth={clips: 12, classes: 2, text: true}", "data.batch_size=4",
                                        "data.size=32", "data.num_workers=1", "progress=false", "precision=fp32"])
    trainer = Trainer(cfg)  # (generates the dataset: the config's data.synth)
    assert trainer.modalities == {"audio": "audio", "visual": "video", "text": "features"}
    assert trainer.feature_dims == {"text": 32}
    before = parameters(trainer)
    summary = trainer.fit()
    assert math.isfinite(trainer.history[-1]["train/loss"]) and 0 <= summary["test/acc/text"] <= 1
    after = parameters(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("encoders.text."))
    cached = trainer.loaders["train"].cached
    assert set(cached.contents) == {"audio", "visual"}  # the text is read every epoch, never cached
    assert cached.decoded == 2 * len(trainer.loaders["train"].clips)
