"""The naive baseline (bench/naive, the research code's way) computes what mmfast computes: the
same OGM coefficients and OPM drop probabilities step by step, and with noise off the same
parameters after k steps, on the same model, data and initialisation."""
import copy
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from mmfast.config import load_config
from mmfast.data import generate
from mmfast.trainer import Trainer

pytest.importorskip("nvidia.dali")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from naive import NaiveStep  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("naive") / "cremad", clips=48, seed=5)


def pair(dataset, tmp_path, method, seed, steps=STEPS, **hparams):
    """An mmfast Trainer and a NaiveStep on a deep copy of its model, with the same optimizer."""
    cfg = load_config("embedded", [f"data.root={dataset}", f"out={tmp_path / method}", "data.batch_size=12",
                                   "data.size=32", "data.num_workers=1", "progress=false", f"seed={seed}", "channels_last=false", "precision=fp32",
                                   f"method={method}", "optim.lr=0.01",
                                   *[f"hparams.{k}={v}" for k, v in hparams.items()]])
    trainer = Trainer(cfg)
    model = copy.deepcopy(trainer.model)
    o = cfg.optim
    optimizer = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    generator = torch.Generator(device=trainer.device).manual_seed(cfg.seed)
    naive_method = {"ogm_ge": "ogm_ge" if hparams.get("noise", True) else "ogm"}.get(method, method)
    naive_hparams = {k: v for k, v in hparams.items() if k not in ("noise", "timing")}
    naive = NaiveStep(model, optimizer, naive_method, generator=generator, **naive_hparams)
    trainer.model.train()
    trainer.balancer.start_epoch(0)
    batches, loader = [], trainer.loaders["train"]
    while len(batches) < steps:  # (as many passes over the training split as it takes)
        batches += list(loader.batches())[:steps - len(batches)]
        loader.epoch += 1
    return trainer, naive, batches


def assert_same_parameters(trainer, naive):
    for (name, a), b in zip(trainer.model.state_dict().items(), naive.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


def step_both(trainer, naive, batches, metric, naive_values):
    """Train both side by side; after every step mmfast's `metric/<modality>` values equal the
    naive step's host values (naive_values(naive)). Returns mmfast's values per step."""
    steps = []
    for batch in batches:
        trainer.train_step(batch)
        naive(batch)
        values = [float(trainer.balancer.metrics[f"{metric}/{m}"]) for m in trainer.modalities]
        # (two fp32 computations of a training run: rounding compounds over the steps as in the
        # parameters' comparison; a step off by an update moves these by far more)
        assert values == pytest.approx(naive_values(naive), rel=2e-4, abs=2e-5)
        steps.append(values)
    return steps


@pytest.mark.parametrize("form", ["paper", "reference"])
def test_ogm_same_coefficients_and_parameters(dataset, tmp_path, form):
    seed = int.from_bytes(os.urandom(2), "little")
    trainer, naive, batches = pair(dataset, tmp_path, "ogm_ge", seed, noise=False, alpha=1.5, form=form)
    steps = step_both(trainer, naive, batches, "coeff", lambda n: n.coeffs)
    assert any(c < 1 for step in steps for c in step), "no step modulated anything: nothing compared"
    assert_same_parameters(trainer, naive)


def test_ogm_ge_same_first_coefficients_and_noise_scale(dataset, tmp_path):
    """With noise the streams differ (torch's generator vs mmfast's Philox), so the runs part after
    one step; the first step's coefficients agree, and both perturb the gradients by noise of the
    gradient's std: the distance between the two updates is of that size."""
    trainer, naive, batches = pair(dataset, tmp_path, "ogm_ge", 3, alpha=1.5, form="reference")
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.train_step(batches[0])
    naive(batches[0])
    coeffs = [float(trainer.balancer.metrics[f"coeff/{m}"]) for m in trainer.modalities]
    assert coeffs == pytest.approx(naive.coeffs, rel=1e-5, abs=1e-6)
    name = next(n for n, p in trainer.model.named_parameters() if p.dim() == 4 and n.startswith("encoders.visual"))
    a, b = trainer.model.state_dict()[name], naive.model.state_dict()[name]
    step_a, step_b = a - before[name], b - before[name]
    # Same deterministic part, independent N(0, sd^2) noise: the difference has std sqrt(2) lr sd.
    ratio = float((step_a - step_b).std() / step_a.std())
    assert 0.5 < ratio < 2.0


def test_opm_same_drop_probabilities_and_parameters(dataset, tmp_path):
    """The research code measures every sample's undropped features and drops the same batch
    with the probabilities it measured: mmfast's opm with timing="current". Over 8 steps
    (two passes over the split), with drops on several, both give the same probabilities and parameters."""
    seed = int.from_bytes(os.urandom(2), "little")
    trainer, naive, batches = pair(dataset, tmp_path, "opm", seed, steps=8, p_exe=1.0, q_base=0.6, timing="current")
    steps = step_both(trainer, naive, batches, "drop_prob", lambda n: n.drop_probs)
    assert sum(any(q > 0 for q in step) for step in steps) >= 3, "fewer than 3 steps dropped: little compared"
    assert_same_parameters(trainer, naive)


def test_joint_same_parameters(dataset, tmp_path):
    trainer, naive, batches = pair(dataset, tmp_path, "joint", 1)
    for batch in batches:
        trainer.train_step(batch)
        naive(batch)
    assert_same_parameters(trainer, naive)
    assert not any(math.isnan(float(v.float().sum())) for v in naive.model.state_dict().values())


def test_bad_arguments_are_named(dataset, tmp_path):
    trainer, _, _ = pair(dataset, tmp_path, "joint", 0)
    opt = torch.optim.SGD(trainer.model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        NaiveStep(trainer.model, opt, "olm")
    with pytest.raises(ValueError, match="form must be"):
        NaiveStep(trainer.model, opt, "ogm", form="star")
