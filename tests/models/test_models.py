"""Encoders (pooled features, frame stacks, weights from a file), fusion heads with their uni-modal
estimators against plain references, and the encode -> head model contract."""
import pytest
import torch
from torch import nn

from mmfast.models import FUSIONS, MultimodalModel, SmallConvEncoder, build_model, make_fusion, resnet18_encoder


def test_resnet18_encoder_shape_and_size(gen):
    enc = resnet18_encoder(3)
    # torchvision's resnet18 has 11,689,512 parameters, 513,000 of them in its 1000-way classifier.
    assert sum(p.numel() for p in enc.parameters()) == 11_689_512 - 513_000
    assert sum(1 for p in enc.parameters() if p.dim() == 4) == 20
    x = torch.randn(2, 3, 64, 96, generator=gen)
    assert enc.feature_map(x).shape == (2, 512, 2, 3)
    assert enc(x).shape == (2, 512)
    audio = resnet18_encoder(1)
    assert audio(torch.randn(1, 1, 257, 188, generator=gen)).shape == (1, 512)


@pytest.mark.parametrize("make", [lambda: SmallConvEncoder(3, 8), lambda: resnet18_encoder(3)])
def test_frame_stacks_are_pooled_over_space_then_time(gen, make):
    enc = make().eval()  # batch norm with running statistics: frames encode independently
    x = torch.randn(2, 3, 3, 40, 40, generator=gen)
    with torch.no_grad():
        stacked = enc(x)
        one_by_one = torch.stack([enc(x[:, t]) for t in range(3)]).mean(dim=0)
    torch.testing.assert_close(stacked, one_by_one, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] or \[B, T, C, H, W\]"):
        enc(torch.randn(3, 40, 40))


def test_resnet18_weights_from_a_local_file(tmp_path, gen):
    source = resnet18_encoder(1)
    state = dict(source.state_dict(), **{"fc.weight": torch.randn(10, 512), "fc.bias": torch.randn(10)})
    torch.save({"state_dict": state}, tmp_path / "audio.pt")
    loaded = resnet18_encoder(1, tmp_path / "audio.pt")
    for a, b in zip(source.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not fit a ResNet-18 with 3 input"):
        resnet18_encoder(3, tmp_path / "audio.pt")  # conv1 has 1 input channel there
    torch.save({"layer9.weight": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="missing"):
        resnet18_encoder(1, tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        resnet18_encoder(1, tmp_path / "nope.pt")


def random_features(gen, dims, B=5, requires_grad=False):
    return [torch.randn(B, d, generator=gen).requires_grad_(requires_grad) for d in dims]


def test_concat_and_sum_heads_against_plain_linear_layers(gen):
    dims = [4, 7, 3]
    feats = random_features(gen, dims)
    concat = make_fusion("concat", dims, 6)
    fused, uni = concat(feats)
    torch.testing.assert_close(fused, concat.fc(torch.cat(feats, dim=1)))
    w = torch.split(concat.fc.weight, dims, dim=1)
    for m in range(3):
        torch.testing.assert_close(uni[m], feats[m] @ w[m].T + concat.fc.bias / 3)
    summed = make_fusion("sum", dims, 6)
    fused, uni = summed(feats)
    torch.testing.assert_close(fused, sum(fc(f) for fc, f in zip(summed.fcs, feats)))
    for m in range(3):
        torch.testing.assert_close(uni[m], summed.fcs[m](feats[m]))


@pytest.mark.parametrize("name,dims", [("film", [4, 6]), ("gated", [5, 3]), ("mlp", [4, 6, 2])])
def test_zero_out_heads_estimate_each_modality_with_the_others_zeroed(gen, name, dims):
    head = make_fusion(name, dims, 5)
    feats = random_features(gen, dims, requires_grad=True)
    fused, uni = head(feats)
    assert fused.shape == (5, 5) and uni.shape == (len(dims), 5, 5) and not uni.requires_grad
    for m in range(len(dims)):
        alone = [f if j == m else torch.zeros_like(f) for j, f in enumerate(feats)]
        torch.testing.assert_close(uni[m], head.fuse(alone).detach(), rtol=1e-5, atol=1e-6)
    fused.sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


@pytest.mark.parametrize("call,needle", [
    (lambda: make_fusion("film", [3, 3, 3], 4), "exactly 2 modalities"),
    (lambda: make_fusion("gated", [3, 3], 4, condition=2), "condition must be 0 or 1"),
    (lambda: make_fusion("attention", [3, 3], 4), "fusion must be one of"),
    (lambda: make_fusion("concat", [3], 4), "at least 2 modalities"),
    (lambda: build_model({"audio": "audio", "depth": "lidar"}, 4), "kind 'lidar'"),
    (lambda: build_model({"audio": "audio", "visual": "frames"}, 4, encoder="vit"), "encoder must be one of"),
    (lambda: build_model({"audio": "audio", "visual": "frames"}, 4, weights={"audio": "a.pt"}), "resnet18"),
])
def test_bad_configurations(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def test_model_contract_with_three_modalities(gen):
    model = build_model({"audio": "audio", "rgb": "frames", "flow": "video"}, 4, fusion="sum", width=4)
    batch = {"audio": torch.randn(3, 32, 20, generator=gen), "rgb": torch.randn(3, 2, 3, 24, 24, generator=gen),
             "flow": torch.randn(3, 1, 3, 24, 24, generator=gen), "label": torch.tensor([0, 1, 2])}
    features = model.encode(batch)
    assert [f.shape for f in features] == [(3, 16)] * 3
    fused, uni = model.head(features)
    assert fused.shape == (3, 4) and uni.shape == (3, 3, 4)
    with pytest.raises(KeyError, match="no 'flow'"):
        model.encode({"audio": batch["audio"], "rgb": batch["rgb"]})
    mapping = MultimodalModel({"a": nn.Conv2d(1, 2, 3), "b": nn.Conv2d(1, 2, 3)}, make_fusion("sum", [2, 2], 3))
    with pytest.raises(ValueError, match="must return pooled features"):
        mapping.encode({"a": torch.randn(2, 1, 5, 5), "b": torch.randn(2, 1, 5, 5)})


def test_every_fusion_is_buildable_on_two_modalities():
    for name in FUSIONS:
        model = build_model({"audio": "audio", "visual": "frames"}, 3, fusion=name, width=4)
        fused, uni = model({"audio": torch.randn(2, 16, 16), "visual": torch.randn(2, 1, 3, 16, 16)})
        assert fused.shape == (2, 3) and uni.shape == (2, 2, 3)
