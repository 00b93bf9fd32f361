"""mmfast.ops.feature_drop (OPM / ModDrop) against its per-sample reference."""
import math

import pytest
import torch

from mmfast.ops import feature_drop, feature_drop_reference, weighted_mean


def random_features(gen, M, B, requires_grad=False):
    dims = [int(torch.randint(1, 20, (), generator=gen)) for _ in range(M)]
    return [torch.randn(B, d, generator=gen).requires_grad_(requires_grad) for d in dims]


@pytest.mark.parametrize("M,B", [(2, 1), (2, 64), (3, 33), (4, 7)])
@pytest.mark.parametrize("p_exe", [1.0, 0.7, 0.0])
def test_matches_reference(gen, M, B, p_exe):
    features = random_features(gen, M, B)
    probs = torch.rand(M, generator=gen) * 1.2 - 0.1  # outside [0, 1] too: clamped
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    out = feature_drop(features, probs, p_exe=p_exe, generator=torch.Generator().manual_seed(seed))
    ref_features, ref_keep, ref_weight = feature_drop_reference(features, probs, p_exe=p_exe,
                                                                generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out.keep.double(), ref_keep)
    assert torch.equal(out.sample_weight.double(), ref_weight)
    for a, b in zip(out.features, ref_features):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)  # float32 1/(1-theta)
    if p_exe == 0.0:
        assert out.keep.all() and float(out.scale) == 1.0


def test_drop_frequency_and_rescaling(gen):
    B = 20000
    features = [torch.ones(B, 3), torch.ones(B, 1)]
    probs = torch.tensor([0.4, 0.1])
    out = feature_drop(features, probs, generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, (), generator=gen))))
    for m, q in enumerate(probs.tolist()):
        dropped = 1 - float(out.keep[m].mean())
        assert abs(dropped - q) < 5 * math.sqrt(q * (1 - q) / B)
    theta = (3 * 0.4 + 1 * 0.1) / 4
    assert math.isclose(float(out.scale), 1 / (1 - theta), rel_tol=1e-6)
    # kept entries carry the scale, dropped ones are zero; expected value preserved per entry
    values = out.features[0]
    kept = out.keep[0].bool()
    assert torch.equal(values[~kept], torch.zeros_like(values[~kept]))
    torch.testing.assert_close(values[kept], torch.full_like(values[kept], 1 / (1 - theta)))


def test_gradient_carries_the_same_factor(gen):
    features = random_features(gen, 2, 16, requires_grad=True)
    out = feature_drop(features, torch.tensor([0.5, 0.2]), generator=torch.Generator().manual_seed(3))
    sum(f.sum() for f in out.features).backward()
    for m, f in enumerate(features):
        expected = (out.keep[m] * out.scale)[:, None].expand_as(f)
        torch.testing.assert_close(f.grad, expected)


def test_everything_dropped_leaves_no_sample_in_the_loss():
    out = feature_drop([torch.ones(4, 2), torch.ones(4, 3)], torch.ones(2), generator=torch.Generator().manual_seed(0))
    assert not out.keep.any() and not out.sample_weight.any() and float(out.scale) == 0.0
    assert all(torch.equal(f, torch.zeros_like(f)) for f in out.features)
    assert float(weighted_mean(torch.ones(4), out.sample_weight)) == 0.0


def test_weighted_mean_counts_kept_samples_only():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert float(weighted_mean(loss, torch.tensor([1.0, 0.0, 1.0, 0.0]))) == 2.0
    assert float(weighted_mean(loss, None)) == 2.5


@pytest.mark.parametrize("call,needle", [
    (lambda: feature_drop(torch.ones(4, 2), torch.ones(1)), "features must be a list"),
    (lambda: feature_drop([torch.ones(4, 2), torch.ones(5, 2)], torch.ones(2)), r"features\[1\]"),
    (lambda: feature_drop([torch.ones(4, 2), torch.ones(4)], torch.ones(2)), r"features\[1\]"),
    (lambda: feature_drop([torch.ones(4, 2), torch.ones(4, 2)], torch.ones(3)), "drop_probs"),
    (lambda: feature_drop([torch.ones(4, 2), torch.ones(4, 2)], torch.ones(2, dtype=torch.long)), "drop_probs"),
    (lambda: feature_drop([torch.ones(4, 2), torch.ones(4, 2)], torch.ones(2, device="meta")), "drop_probs is on meta"),
    (lambda: feature_drop([torch.ones(4, 2), torch.ones(4, 2)], torch.ones(2), p_exe=1.5), "p_exe"),
])
def test_bad_input(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


@pytest.mark.parametrize("total,world", [(9, 2), (8, 3), (5, 5)])
def test_shards_of_a_global_batch_drop_what_the_global_batch_drops(gen, total, world):
    """A distributed run's ranks each pass their rows with shard=(start, total): together they
    keep exactly the samples one process keeps on the whole batch, with the same scale."""
    from mmfast.distributed import shard_bounds

    features = random_features(gen, 3, total)
    probs = torch.rand(3, generator=gen)
    seed = int(torch.randint(0, 2**31, (), generator=gen))
    whole = feature_drop(features, probs, p_exe=0.8, generator=torch.Generator().manual_seed(seed))
    for rank in range(world):
        lo, hi = shard_bounds(total, rank, world)
        part = feature_drop([f[lo:hi] for f in features], probs, p_exe=0.8, shard=(lo, total),
                            generator=torch.Generator().manual_seed(seed))
        assert torch.equal(part.keep, whole.keep[:, lo:hi]) and torch.equal(part.scale, whole.scale)
        for a, b in zip(part.features, whole.features):
            assert torch.equal(a, b[lo:hi])


def test_bad_shard_is_named():
    features = [torch.ones(4, 2), torch.ones(4, 3)]
    for shard in [(3, 6), (-1, 8), (0.5, 8)]:
        with pytest.raises(ValueError, match=r"shard must be \(start, total\)"):
            feature_drop(features, torch.zeros(2), shard=shard)
