"""Modality valuation (mmfast/valuation.py, Evaluator.coalition_outputs / shapley, `mmfast eval
--shapley`): the Shapley weights against the definition by orderings, the toolkit's closed form
for two modalities, the re-sampling method's per-sample values against its public code's table,
and the coalition passes against the missing-modality evaluation and plain forwards."""
import csv
import itertools
import json
import math
import subprocess
import sys

import pytest
import torch

from mmfast.config import load_config
from mmfast.data import generate
from mmfast.trainer import Trainer
from mmfast.valuation import (class_values, coalition_masks, coalition_name, sample_values, shapley_matrix,
                              shapley_values, split_values)

pytest.importorskip("nvidia.dali")
pytest.importorskip("sklearn")


def shapley_by_orderings(v, M):
    """The definition: each modality's marginal contribution v(before + m) - v(before), averaged
    over the M! orders in which the modalities join (v indexed by bitmask)."""
    phi = [0.0] * M
    for order in itertools.permutations(range(M)):
        joined = 0
        for m in order:
            phi[m] += float(v[joined | (1 << m)] - v[joined])
            joined |= 1 << m
    return [p / math.factorial(M) for p in phi]


@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_shapley_weights_match_the_definition_by_orderings(gen, M):
    v = torch.rand(2 ** M, generator=gen, dtype=torch.float64)
    got = shapley_values(v)
    assert got.tolist() == pytest.approx(shapley_by_orderings(v, M), abs=1e-12)
    assert float(got.sum()) == pytest.approx(float(v[-1] - v[0]), abs=1e-12)  # efficiency
    assert shapley_matrix(M).shape == (M, 2 ** M)
    rows = torch.rand(2 ** M, 3, 5, generator=gen, dtype=torch.float64)  # per class, per sample: column by column
    batched = shapley_values(rows)
    assert batched.shape == (M, 3, 5)
    assert batched[:, 1, 2].tolist() == pytest.approx(shapley_by_orderings(rows[:, 1, 2], M), abs=1e-12)


def test_two_modalities_give_the_toolkits_closed_form(gen):
    v = torch.rand(4, generator=gen, dtype=torch.float64)  # none, a, v, av
    phi_a, phi_v = shapley_values(v).tolist()
    assert phi_a == pytest.approx(((v[1] - v[0]) + (v[3] - v[2])).item() / 2)
    assert phi_v == pytest.approx(((v[2] - v[0]) + (v[3] - v[1])).item() / 2)
    assert [coalition_name(mask, ["a", "v"]) for mask in coalition_masks(2)] == ["none", "a", "v", "a+v"]


def test_per_sample_values_are_the_public_codes_for_two_modalities():
    """Wei et al.'s code: value 2 for a right fused prediction, 1 for a right single modality, so
    phi_a = (v_a + v_av - v_v) / 2; every pattern of right and wrong, one sample each."""
    labels = torch.zeros(8, dtype=torch.long)
    patterns = list(itertools.product([0, 1], repeat=3))  # (audio right, visual right, both right)
    fused = torch.zeros(4, 8, 2)
    for i, (a, v, av) in enumerate(patterns):
        for k, right in ((1, a), (2, v), (3, av)):
            fused[k, i, 0 if right else 1] = 1.0
        fused[0, i, 1] = 1.0  # (the empty coalition counts 0 whatever it predicts)
    phi = shapley_values(sample_values(fused, labels))
    for i, (a, v, av) in enumerate(patterns):
        assert phi[0, i].item() == (a + 2 * av - v) / 2 and phi[1, i].item() == (v + 2 * av - a) / 2
    assert set(phi.flatten().tolist()) <= {-0.5, 0.0, 0.5, 1.0, 1.5}


def test_split_and_class_values_count_right_predictions(gen):
    K, N, C = 8, 40, 5
    fused = torch.randn(K, N, C, generator=gen)
    labels = torch.randint(0, C - 1, (N,), generator=gen)  # (class C - 1 has no sample)
    per_class = class_values(fused, labels, C)
    for k in range(K):
        right = [int(fused[k, i].argmax()) == int(labels[i]) for i in range(N)]
        assert split_values(fused, labels)[k].item() == pytest.approx(sum(right) / N)
        for c in range(C - 1):
            mine = [r for r, y in zip(right, labels.tolist()) if y == c]
            assert per_class[k, c].item() == pytest.approx(sum(mine) / len(mine))
        assert math.isnan(per_class[k, C - 1])


# --- the coalition passes on a trained model ---------------------------------------------------------

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("valuation") / "cremad", clips=30, seed=3)


def train(root, out, *overrides):
    cfg = load_config("embedded", [f"data.root={root}", f"out={out}", "epochs=1", "data.batch_size=8",
                                   "data.size=32", "data.num_workers=1", "progress=false", "precision=fp32",
                                   *overrides])
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    return train(root, tmp_path_factory.mktemp("run") / "run")


def _coalition_reference(trained, zeroed):
    """{(coalition, clip): fused logits}: the model run batch by batch, coalition by coalition,
    on zeroed(inputs, features, mask) -> (inputs, features or None)."""
    model, steps = trained.model, trained.steps
    names = trained.evaluator.modalities
    model.eval()
    rows = {}
    with torch.no_grad():
        for batch in trained.loaders["test"]:
            inputs, _ = steps.inputs(batch)
            for k, mask in enumerate(coalition_masks(len(names))):
                features = [f if present else torch.zeros_like(f) for f, present in zip(model.encode(inputs), mask)]
                fused = model.head(features)[0] if zeroed == "features" else model(
                    {m: x if present else torch.zeros_like(x) for (m, x), present in zip(inputs.items(), mask)})[0]
                for i, row in zip(batch["index"].tolist(), fused):
                    rows[k, i] = row
    return rows


@pytest.mark.parametrize("zeroing", ["features", "inputs"])
def test_coalition_passes_match_the_model_run_coalition_by_coalition(trained, zeroing):
    """One pass, every coalition as one batch, against a run per coalition and batch: features
    zeroed before the head (no rescaling of the others, unlike the missing-modality evaluation's
    drop), or inputs zeroed before the encoders."""
    fused, labels, index = trained.evaluator.coalition_outputs("test", zeroing)
    assert fused.shape == (4, 6, len(trained.classes)) and sorted(index.tolist()) == list(range(6))
    rows = _coalition_reference(trained, zeroing)
    for k in range(4):
        expected = torch.stack([rows[k, i] for i in index.tolist()])
        torch.testing.assert_close(fused[k], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(labels, torch.tensor([trained.loaders["test"].clips[i].label for i in index.tolist()]))
    if zeroing == "inputs":  # (zero inputs through biases and batch norm: not zero features)
        assert not torch.allclose(fused[0], trained.evaluator.coalition_outputs("test", "features")[0][0])


def test_encoders_that_exchange_features_are_valued_by_their_inputs(root, tmp_path):
    """IRFB fuses inside the encoders: input zeroing runs the whole model per coalition; feature
    zeroing is refused by name."""
    trained = train(root, tmp_path / "irfb", "model.fusion=irfb", "method=joint")
    fused, _, index = trained.evaluator.coalition_outputs("test", "inputs")
    rows = _coalition_reference(trained, "inputs")
    for k in range(4):
        torch.testing.assert_close(fused[k], torch.stack([rows[k, i] for i in index.tolist()]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fuses inside the encoders.*zeroing='inputs'"):
        trained.shapley("test")


def test_shapley_report_is_consistent_with_the_evaluation(trained):
    report = trained.shapley("test")
    plain = trained.evaluate("test")
    assert report["coalitions"]["audio+visual"] == pytest.approx(plain["test/acc"])
    total = sum(report["values"].values())
    assert total == pytest.approx(report["coalitions"]["audio+visual"] - report["coalitions"]["none"])
    for name in ("audio", "visual"):
        per_sample = report["per_sample"][name]
        assert len(per_sample) == 6 and set(per_sample) <= {-0.5, 0.0, 0.5, 1.0, 1.5}
        assert set(report["per_class"][name]) == set(trained.classes)
    assert report["per_sample"]["clip"] == [trained.loaders["test"].clips[i].clip_id for i in range(6)]
    with pytest.raises(ValueError, match="zeroing must be one of"):
        trained.shapley("test", zeroing="noise")
    train = trained.shapley("train")  # (through evaluation transforms, in the split's order)
    assert train["samples"] == len(trained.loaders["train"].clips) and "train_eval" in trained.evaluator.loaders
    assert train["per_sample"]["clip"] == [c.clip_id for c in trained.loaders["train"].clips]


def test_command_line_eval_prints_shapley_values_and_writes_each_samples(trained, tmp_path):
    out = tmp_path / "per_sample.csv"
    done = subprocess.run([sys.executable, "-m", "mmfast", "eval", str(trained.out), "--shapley", "--zeroing",
                           "inputs", "--per-sample", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    shapley = json.loads(done.stdout)["shapley"]
    assert shapley["zeroing"] == "inputs" and set(shapley["values"]) == {"audio", "visual"}
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and set(rows[0]) == {"clip", "label", "audio", "visual"}
    bad = subprocess.run([sys.executable, "-m", "mmfast", "eval", str(trained.out), "--per-sample", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--per-sample needs --shapley" in bad.stderr
