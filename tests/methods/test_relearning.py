"""``relearning`` (mmfast/methods/relearning.py): purity of k-means clusters on features with a
known structure, the re-initialisation as the convex mix with the initial parameters, and when it
fires (peer-methods step-level test)."""
import math

import pytest
import torch
from torch import nn

import mmfast
from mmfast.methods.relearning import purity

pytest.importorskip("sklearn")


def blobs(gen, counts, d=5, spread=0.05):
    """Features of well-separated blobs (one per entry of counts: {label: n}) and their labels."""
    feats, labels = [], []
    for k, blob in enumerate(counts):
        centre = torch.zeros(d)
        centre[k % d] = 10.0 * (1 + k // d)
        for label, n in blob.items():
            feats.append(centre + spread * torch.randn(n, d, generator=gen))
            labels += [label] * n
    return torch.cat(feats), torch.tensor(labels)


def test_purity_is_the_share_of_each_clusters_majority_class(gen):
    x, y = blobs(gen, [{0: 10}, {1: 10}, {2: 10}])
    assert purity(x, y, 3) == 1.0
    x, y = blobs(gen, [{0: 10}, {1: 10}, {2: 6, 1: 4}])  # one blob holds two classes
    assert purity(x, y, 3) == pytest.approx(26 / 30)
    constant = torch.cat([x, torch.full((30, 1), 3.0)], dim=1)  # a constant dimension changes nothing
    assert purity(constant, y, 3) == pytest.approx(26 / 30)
    assert purity(x[:2], y[:2], 3) == 1.0  # (fewer samples than classes: a cluster each)


def make_encoders(seed=0):
    torch.manual_seed(seed)
    encoders = {"audio": nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)), "visual": nn.Linear(3, 4)}
    head = nn.Linear(8, 3)
    return encoders, head


def test_relearning_mixes_each_encoder_toward_its_initial_parameters(gen):
    encoders, head = make_encoders()
    bal = mmfast.Balancer("relearning", encoders, interval=2, times=1, lam=3.0)
    initial = {n: [p.detach().clone() for p in e.parameters()] for n, e in encoders.items()}
    with torch.no_grad():  # (training moved them)
        for p in [*encoders["audio"].parameters(), *encoders["visual"].parameters(), *head.parameters()]:
            p.add_(torch.randn(p.shape, generator=gen))
    trained = {n: [p.detach().clone() for p in e.parameters()] for n, e in encoders.items()}
    head_before = [p.detach().clone() for p in head.parameters()]
    buffers = encoders["audio"][1].running_mean.clone()
    assert [bal.evaluations(e) for e in (None, 0, 1, 2, 3, 4)] == [(), (), (), ("train", "val"), (), ()]
    # audio: purity 1 on train, 26/30 on val; visual: 1 on both
    x_train, y_train = blobs(gen, [{0: 10}, {1: 10}, {2: 10}])
    x_val, y_val = blobs(gen, [{0: 10}, {1: 10}, {2: 6, 1: 4}])
    for split, xa, y in (("train", x_train, y_train), ("val", x_val, y_val)):
        fused = torch.randn(30, 3, generator=gen)
        by_label = 10.0 * torch.eye(3)[y] + 0.05 * torch.randn(30, 3, generator=gen)  # (a blob per class)
        bal.observe_evaluation(split, fused, torch.stack([fused, fused]), y, epoch=2, features=[xa, by_label])
    for n, e in encoders.items():  # nothing moves before the next epoch starts
        assert all(torch.equal(p, t) for p, t in zip(e.parameters(), trained[n]))
    bal.start_epoch(3)
    alpha = {"audio": math.tanh(3.0 * 4 / 30), "visual": 0.0}
    for n, e in encoders.items():
        for p, p0, t in zip(e.parameters(), initial[n], trained[n]):
            torch.testing.assert_close(p, alpha[n] * p0 + (1 - alpha[n]) * t, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(p, t) for p, t in zip(head.parameters(), head_before))
    assert torch.equal(encoders["audio"][1].running_mean, buffers)  # buffers are not parameters
    diagnosis = bal.summary()["relearning"]["diagnoses"][0]
    assert diagnosis["epoch"] == 2 and diagnosis["alpha"]["audio"] == pytest.approx(alpha["audio"])
    assert diagnosis["purity_val"]["audio"] == pytest.approx(26 / 30) and diagnosis["purity_train"]["visual"] == 1.0
    moved = [p.detach().clone() for p in encoders["audio"].parameters()]
    bal.start_epoch(4)  # applied once
    assert all(torch.equal(p, q) for p, q in zip(encoders["audio"].parameters(), moved))


def test_relearning_fires_every_interval_at_most_times():
    encoders, _ = make_encoders()
    bal = mmfast.Balancer("relearning", encoders, interval=3, times=2)
    assert [e for e in range(12) if bal.evaluations(e)] == [3, 6]
    assert [e for e in range(12) if mmfast.Balancer("relearning", encoders, interval=3, times=0).evaluations(e)] == []
    with pytest.raises(ValueError, match="relearning.interval"):
        mmfast.Balancer("relearning", encoders, interval=0)
