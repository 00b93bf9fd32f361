"""``resample`` (mmfast/methods/resample.py): the per-sample valuation and the copies of the sample
and modality levels against the official computation written out sample by sample
(peer-methods step-level test), and the loaders' copies (mmfast/data/base.py set_copies): both
backends alike, each copy its own draws and its kept modality, resumable mid-epoch."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import mmfast
from mmfast.methods.resample import copy_counts, modality_level_copies
from mmfast.models.fusion import make_fusion

C = 4


def official_count(phi: float) -> int:
    """The official sample-level dataset's if-chain for one value."""
    if 0.4 < phi < 0.9:
        return 1
    if -0.1 < phi < 0.4:
        return 2
    if phi < -0.1:
        return 3
    return 0


def test_copy_counts_follow_the_official_buckets(gen):
    assert copy_counts(np.array([-0.5, 0.0, 0.5, 1.0, 1.5])).tolist() == [3, 2, 1, 0, 0]
    assert copy_counts(np.array([0.4, -0.1, 0.9, 1.0])).tolist() == [0, 0, 0, 0]  # (boundaries: no bucket)
    values = (torch.rand(200, generator=gen) * 3 - 1.2).double().numpy()
    assert copy_counts(values).tolist() == [official_count(v) for v in values]


def reference_phi(head, features, labels):
    """Per sample, M = 2: right/wrong of the fused head on (a, v), (a, 0), (0, v); v_av counts 2;
    phi_a = (v_a + v_av - v_v) / 2, phi_v = (v_v + v_av - v_a) / 2 (the official closed form)."""
    out = []
    for i in range(len(labels)):
        a, v = features[0][i:i + 1], features[1][i:i + 1]
        right = lambda fa, fv: float(head([fa, fv])[0].argmax(1).item() == labels[i].item())  # noqa: E731
        v_av, v_a, v_v = 2 * right(a, v), right(a, torch.zeros_like(v)), right(torch.zeros_like(a), v)
        out.append(((v_a + v_av - v_v) / 2, (v_v + v_av - v_a) / 2))
    return np.array(out).T


@pytest.mark.parametrize("level", ["sample", "modality"])
def test_resample_values_each_training_sample_and_makes_the_officials_copies(gen, level):
    torch.manual_seed(int(torch.randint(1 << 30, (), generator=gen)))
    N, dims = 60, (5, 3)
    head = make_fusion("concat", list(dims), C)
    encoders = {"audio": nn.Linear(2, dims[0]), "visual": nn.Linear(2, dims[1])}
    features = [torch.randn(N, d, generator=gen) for d in dims]
    labels = torch.randint(0, C, (N,), generator=gen)
    index = torch.randperm(N + 5, generator=gen)[:N]  # (rows of a split some of whose clips were skipped)
    bal = mmfast.Balancer("resample", encoders, head=head, seed=11, level=level, warmup_epochs=2)
    assert bal.evaluations(0) == () and bal.evaluations(1) == ("train",) and bal.evaluations(None) == ()
    fused = head(features)[0]
    bal.observe_evaluation("train", fused, torch.zeros(2, N, C), labels, epoch=1, features=features, index=index)
    phi = reference_phi(head, features, labels)
    if level == "sample":
        expected = np.array([[official_count(p) for p in row] for row in phi]).T
    else:  # the official modality level, drawn from the same generator, written out
        rng = np.random.default_rng([11, 1, 16])
        subset = rng.integers(0, N, size=int(0.2 * N))
        gap = [1 - np.mean([phi[m][j] for j in subset]) for m in range(2)]
        rate = abs(gap[0] - gap[1]) * 2 / 3
        expected = np.zeros((N, 2), dtype=np.int64)
        for j in rng.integers(0, N, size=math.floor(rate * N)):
            expected[j, int(np.argmax(gap))] += 1
    positions, counts = bal.sample_copies(2)
    assert positions.tolist() == index.tolist() and counts.tolist() == expected.tolist()
    assert bal.sample_copies(3) is None  # (copies are made for the next epoch only)
    method = bal.methods[0]
    restored = mmfast.Balancer("resample", encoders, head=head, seed=11, level=level, warmup_epochs=2).methods[0]
    restored.load_state_dict(method.state_dict())
    assert [a.tolist() for a in restored.sample_copies(2)] == [positions.tolist(), counts.tolist()]


def test_modality_level_copies_keep_the_modality_with_the_larger_gap():
    phi = np.stack([np.full(100, 1.2), np.full(100, 0.1)])  # visual contributes less: its gap is larger
    counts = modality_level_copies(phi, 0.2, 1.0, np.random.default_rng(0))
    assert counts[:, 0].sum() == 0 and counts[:, 1].sum() == math.floor(abs(-0.2 - 0.9) * 2 / 3 * 100)
    with pytest.raises(ValueError, match="two modalities"):
        mmfast.Balancer("resample", {m: nn.Linear(2, 2) for m in ("a", "b", "c")}, level="modality")
    with pytest.raises(ValueError, match="resample.level"):
        mmfast.Balancer("resample", {m: nn.Linear(2, 2) for m in ("a", "b")}, level="clip")


# ---- the loaders' copies ---------------------------------------------------------------------------

pytest.importorskip("nvidia.dali")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mmfast.data import generate

    return generate(tmp_path_factory.mktemp("resample") / "data", clips=30, seed=4)


def loader_for(dataset, backend, cache="off"):
    from mmfast.data import build_loader
    from mmfast.trainer import data_config
    from support import small_run_config

    cfg = small_run_config(dataset, "unused", f"data.cache={cache}")
    return build_loader(data_config(cfg, torch.device("cpu")), "train", backend)


def collect(loader, start=0):
    batches = list(loader.batches(start=start))
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def test_both_loaders_train_on_the_copies_each_with_its_own_draws(dataset, tmp_path, gen):
    out, rows = {}, None
    for backend, cache in (("dali", "off"), ("naive", "off"), ("dali", str(tmp_path / "cache"))):
        loader = loader_for(dataset, backend, cache)
        N = len(loader.base_clips)
        rows = torch.randperm(N, generator=gen)[:6].numpy() if rows is None else rows
        counts = np.array([[0, 2], [1, 0], [3, 1], [0, 0], [1, 1], [2, 0]])
        loader.set_copies(counts, index=rows)
        loader.epoch = 1
        assert len(loader.clips) == N + counts.sum() and len(loader) == -(-(N + counts.sum()) // 8)
        out[backend, cache] = collect(loader)
        loader.epoch = 1  # (a completed pass moved it on)
        tail = collect(loader, start=1)  # (a resumed pass: the same plan from batch 1 on)
        for k in tail:
            assert torch.equal(tail[k], out[backend, cache][k][8:]), k
    dali, naive, cached = out.values()
    for k in ("index", "label", "keep"):
        assert torch.equal(dali[k], naive[k]) and torch.equal(dali[k], cached[k]), k
    for k in ("audio", "visual"):
        assert torch.equal(dali[k], cached[k]), k  # (the decoded-sample cache gives the copies bit for bit)
        assert (dali[k] - naive[k]).abs().max() < 0.1, k  # (the two backends' decoders: rounding)
    index, keep = dali["index"], dali["keep"]
    for row, (n_a, n_v) in zip(rows, counts):  # each clip once whole, then its copies keeping one modality
        kept = keep[index == int(row)].tolist()
        assert sorted(map(tuple, kept)) == sorted([(True, True)] + [(True, False)] * n_a + [(False, True)] * n_v)
    clip = int(rows[2])  # (3 + 1 copies): every item of the clip drew its own crop
    frames = dali["visual"][index == clip]
    assert all(not torch.equal(frames[i], frames[j]) for i in range(len(frames)) for j in range(i))
    assert sorted(index.tolist()) == sorted(list(range(N)) + [int(r) for r, c in zip(rows, counts) for _ in
                                                              range(int(c.sum()))])


def test_copies_are_refused_when_malformed(dataset):
    loader = loader_for(dataset, "dali")
    N = len(loader.base_clips)
    with pytest.raises(ValueError, match="non-negative integers"):
        loader.set_copies(np.full((N, 2), -1))
    with pytest.raises(ValueError, match="non-negative integers"):
        loader.set_copies(np.zeros((N, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="outside"):
        loader.set_copies(np.ones((1, 2), dtype=np.int64), index=[N])
    loader.set_copies(np.ones((N, 2), dtype=np.int64))
    loader.set_copies(None)  # (back to the clips alone: no keep in the batches)
    assert len(loader.clips) == N and "keep" not in next(iter(loader.batches()))


def test_the_trainer_zeroes_the_features_a_sample_does_not_keep(dataset, tmp_path, gen):
    """A batch with `keep` (copies): the step's forward is the model's with those features zeros
    from the encoders on, and a training step hands the mask to it."""
    from mmfast.trainer import Trainer
    from support import small_run_config

    trainer = Trainer(small_run_config(dataset, tmp_path / "run", "method=joint"))
    batch = next(iter(trainer.loaders["train"].batches()))
    B = len(batch["label"])
    keep = torch.rand(B, 2, generator=gen) < 0.6
    keep[0] = torch.tensor([True, False])
    keep[1] = torch.tensor([False, True])
    inputs, _ = trainer.steps.inputs(batch)
    model = trainer.model.eval()
    with torch.no_grad():
        fused, unimodal, _, measured = trainer.steps.forward(inputs, keep=keep)
        features = [f * keep[:, m, None] for m, f in enumerate(model.encode(inputs))]
        expected, expected_uni = model.head(features)[:2]
    torch.testing.assert_close(fused, expected)
    torch.testing.assert_close(measured, expected_uni)
    model.train()
    seen = []
    original = trainer.steps.step
    trainer.steps.step = lambda *a, **k: (seen.append(k.get("keep")), original(*a, **k))[1]
    trainer.train_step({**batch, "keep": keep})
    trainer.train_step(batch)
    assert torch.equal(seen[0], keep) and seen[1] is None
