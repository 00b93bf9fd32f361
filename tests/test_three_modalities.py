"""Three modalities end to end through the trainer: every method of the registry that allows more
than two modalities trains one epoch on a tiny dataset of three features modalities (CMU-MOSEI's
shape: audio, visual and text as feature sequences), with a finite loss, every encoder it trains
changed and no host read in a training step; the methods and fusions defined for two modalities
refuse three with an error that says what to use; a run resumed mid-epoch gives bitwise the
parameters of one run straight through; the coalitions of valuation (inputs zeroed, masks kept)
and missing-modality evaluation; and the embedded dataset's three-modality variant trains through
its shipped config (DALI, the decoded-sample cache holding its audio and video but not its text)."""
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
           "reconboost": ["hparams.phase1_epochs=1", "hparams.phase2_epochs=0", "epochs=3"],
           "umt": ["hparams.teacher_epochs=1"],
           # (copies from the second epoch on: the valuation's 2^3 coalitions per sample)
           "resample": ["hparams.warmup_epochs=1", "epochs=2"]}
# What refuses three modalities, and the error that says what to use instead.
REFUSALS = {"boost": ("boost.aca_rule='paper' is written for two modalities; with 3 \\(acoustic, facial, words\\) "
                      "use aca_rule='weakest'"),
            "boost dead_zone": "boost.aca_rule='dead_zone' is written for two modalities; with 3",
            "greedy": "method 'greedy' is defined for 2 modalities, got 3 \\(acoustic, facial, words\\); train on 2",
            "resample modality": "resample level='modality' compares two modalities' gaps",
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


def encoder_parameters(trainer):
    return {m: [p.detach().clone() for p in encoder.parameters()] for m, encoder in trainer.model.encoders.items()}


# Every method of the registry, and IRFB's features streams (their padded tokens masked) under OLM.
CASES = {**{m: [f"method={m}", *HPARAMS.get(m, [])] for m in methods.NAMES
            if methods.METHODS.get(m) is None or methods.METHODS[m].max_modalities in (None, 3)},
         "olm irfb": ["method=olm", "model.fusion=irfb", "model.irfb={dim: 16, depth: 1, heads: 2}"],
         "lfm learned": ["method=lfm", "hparams.schedule=learned", "hparams.held_out_clips=4", "hparams.held_out_batch=2"]}


@pytest.mark.parametrize("case", list(CASES))
def test_every_method_that_allows_three_modalities_trains_with_three(dataset, tmp_path, case):
    trainer = Trainer(make_config(dataset, tmp_path / case.replace(" ", "_"), *CASES[case]))
    assert len(trainer.model.modalities) == 3
    before = encoder_parameters(trainer)
    reads = count_step_reads(trainer)
    trainer.fit()
    assert reads and all(r == {} for r in reads), reads  # (masks and all: nothing read on the host in a step)
    assert all(math.isfinite(line["train/loss"]) for line in trainer.history)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    after = encoder_parameters(trainer)
    trained = [m for m in trainer.model.modalities if m not in trainer.balancer.unused_modalities]
    assert trained == (["words"] if case == "unimodal" else list(DIMS))
    for m in trained:  # every encoder the method trains has moved
        assert any(not torch.equal(a, b) for a, b in zip(before[m], after[m])), m


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_is_defined_for_two_modalities_refuses_three_saying_what_to_use(dataset, tmp_path, case):
    method, _, variant = case.partition(" ")
    extra = {"dead_zone": ["hparams.aca_rule=dead_zone"], "film": ["model.fusion=film"],
             "gated": ["model.fusion=gated"], "modality": ["hparams.level=modality"]}.get(variant, [])
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


def test_valuation_and_missing_modalities_with_three(dataset, tmp_path):
    """The 2^3 coalitions: a modality zeroed at the encoder's input is its values zeroed with its
    mask kept (what the model computes on those inputs); Shapley values and missing-modality
    evaluation over three modalities."""
    from mmfast.valuation import coalition_masks

    trainer = Trainer(make_config(dataset, tmp_path / "valued"))
    trainer.fit()
    fused, labels, index = trainer.evaluator.coalition_outputs("val", zeroing="inputs")
    assert fused.shape[:2] == (8, 3) and index.tolist() == [0, 1, 2]
    batch = next(iter(trainer.loaders["val"]))  # (the 3 validation clips: one batch)
    inputs, _ = trainer.steps.inputs(batch)
    model = trainer.model.eval()
    with torch.no_grad():
        for k, row in enumerate(coalition_masks(3).tolist()):
            zeroed = dict(inputs, **{m: torch.zeros_like(inputs[m]) for m, kept in zip(DIMS, row) if not kept})
            torch.testing.assert_close(fused[k], model.head(model.encode(zeroed))[0])
        no_words = dict(inputs, words=torch.zeros_like(inputs["words"]),
                        words_mask=torch.zeros_like(inputs["words_mask"]))
        assert not torch.allclose(fused[3], model.head(model.encode(no_words))[0])  # (a zeroed mask differs)
    shapley = trainer.shapley("val", zeroing="inputs")
    assert set(shapley["values"]) == set(DIMS) and len(shapley["coalitions"]) == 8
    missing = trainer.evaluate("val", missing={"words": 1.0})
    assert missing["val/samples"] == 3 and 0 <= missing["val/acc"] <= 1


def test_the_three_modality_embedded_variant_trains_through_its_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MMFAST_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "embedded_text"
    cfg = load_config("embedded_text", [f"data.root={root}", f"out={tmp_path / 'run'}", "epochs=1",
                                        "data.synth={clips: 12, classes: 2, text: true}", "data.batch_size=4",
                                        "data.size=32", "data.num_workers=1", "progress=false", "precision=fp32"])
    trainer = Trainer(cfg)  # (generates the dataset: the config's data.synth)
    assert trainer.modalities == {"audio": "audio", "visual": "video", "text": "features"}
    assert trainer.feature_dims == {"text": 32}
    before = encoder_parameters(trainer)["text"]
    summary = trainer.fit()
    assert math.isfinite(trainer.history[-1]["train/loss"]) and 0 <= summary["test/acc/text"] <= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder_parameters(trainer)["text"]))
    cached = trainer.loaders["train"].cached
    assert set(cached.contents) == {"audio", "visual"}  # the text is read every epoch, never cached
    assert cached.decoded == 2 * len(trainer.loaders["train"].clips)
