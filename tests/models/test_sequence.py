"""The encoder of pre-extracted feature sequences (mmfast/models/sequence.py) and features
modalities in build_model and IRFB: the masked pooling against a per-sample reference on the
unpadded sequences, whatever lies in the padding; every pooled fusion with three modalities."""
import pytest
import torch
import torch.nn.functional as F

from mmfast.models import SequenceEncoder, build_model, fusion_kind, fusions_where


def random_batch(gen, B=5, L=9, D=6):
    """Values [B, L, D], lengths in [0, L] (one full, one empty) and the mask they give."""
    lengths = torch.randint(1, L, (B,), generator=gen)
    lengths[0], lengths[-1] = L, 0
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return torch.randn(B, L, D, generator=gen), lengths, mask


def with_garbage(x, mask, gen):
    """x with NaN, Inf and huge values in the padding."""
    junk = torch.randn(x.shape, generator=gen) * 1e30
    junk[..., 0] = float("nan")
    junk[..., -1] = float("inf")
    return torch.where(mask[..., None], x, junk)


def reference(enc, x, length):
    """The feature of one sequence, the slow way: its `length` steps alone, no mask."""
    if length == 0:
        return torch.zeros(enc.out_dim)
    h = F.layer_norm(x[:length] @ enc.proj.weight.T + enc.proj.bias, (enc.out_dim,), enc.norm.weight, enc.norm.bias)
    h = h.T[None]  # [1, d, length]
    for conv in enc.convs:
        h = torch.relu(F.conv1d(h, conv.weight, conv.bias, padding=conv.padding))
    return h[0].mean(dim=1)


def test_masked_pooling_ignores_the_padding_exactly(gen):
    enc = SequenceEncoder(6, width=4)
    x, lengths, mask = random_batch(gen)
    clean = enc(torch.where(mask[..., None], x, 0.0), mask)
    assert torch.equal(enc(with_garbage(x, mask, gen), mask), clean)  # bitwise: the padding never enters
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(clean[b], reference(enc, x[b], n), rtol=1e-5, atol=1e-6)
    assert torch.equal(clean[-1], torch.zeros(enc.out_dim))  # no real step: the zero feature
    longer = torch.cat([x, torch.randn(x.shape[0], 4, x.shape[2], generator=gen)], dim=1)  # more padding
    torch.testing.assert_close(enc(longer, torch.cat([mask, torch.zeros(x.shape[0], 4, dtype=torch.bool)], 1)), clean,
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(enc(x), clean)  # (without the mask the padding counts: the test can fail)


def test_garbage_in_the_padding_leaves_gradients_finite(gen):
    enc = SequenceEncoder(6, width=4)
    x, _, mask = random_batch(gen)
    enc(with_garbage(x, mask, gen), mask).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters())


def test_the_model_reads_the_mask_under_the_data_layer_s_key():
    from mmfast.data import mask_key as data_key
    from mmfast.models.sequence import mask_key

    for name in ("text", "rgb_flow", "a"):
        assert mask_key(name) == data_key(name) == f"{name}_mask"


def test_bad_inputs_are_refused(gen):
    enc = SequenceEncoder(6, width=4)
    with pytest.raises(ValueError, match=r"expected \[B, L, 6\]"):
        enc(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="mask must be bool"):
        enc(torch.randn(2, 5, 6), torch.ones(2, 5))
    with pytest.raises(ValueError, match="kernel odd"):
        SequenceEncoder(6, kernel=2)


THREE = {"audio": "audio", "visual": "frames", "text": "features"}


def three_modality_batch(gen, B=4, L=7, D=5):
    x, _, mask = random_batch(gen, B, L, D)
    return {"audio": torch.randn(B, 65, 20, generator=gen), "visual": torch.randn(B, 2, 3, 32, 32, generator=gen),
            "text": x, "text_mask": mask}


@pytest.mark.parametrize("fusion", fusions_where(pooled=True))
def test_every_pooled_fusion_takes_a_features_modality(gen, fusion):
    batch = three_modality_batch(gen)
    if fusion_kind(fusion).two_modalities:
        with pytest.raises(ValueError, match=f"fusion={fusion!r} combines exactly 2 modalities, got 3"):
            build_model(THREE, 3, fusion=fusion, width=4, in_dims={"text": 5})
        return
    model = build_model(THREE, 3, fusion=fusion, width=4, in_dims={"text": 5}).eval()
    fused, unimodal, *_ = model.head(model.encode(batch))
    assert fused.shape == (4, 3) and unimodal.shape == (3, 4, 3)
    garbage = dict(batch, text=with_garbage(batch["text"], batch["text_mask"], gen))
    assert torch.equal(model.head(model.encode(garbage))[0], fused)  # the batch's mask reaches the encoder


def test_film_and_gated_take_a_features_modality_with_one_other(gen):
    batch = three_modality_batch(gen)
    for fusion in fusions_where(two_modalities=True):
        model = build_model({"audio": "audio", "text": "features"}, 3, fusion=fusion, width=4, in_dims={"text": 5})
        assert model(batch)[0].shape == (4, 3)


def test_build_model_needs_the_size_of_a_features_modality():
    with pytest.raises(ValueError, match=r"features modality 'text' needs in_dims\['text'\]"):
        build_model(THREE, 3)
    with pytest.raises(ValueError, match="features modalities take a SequenceEncoder"):
        build_model(THREE, 3, encoder="resnet18", in_dims={"text": 5}, weights={"text": "x.pt"})


def test_irfb_masks_the_padded_tokens_of_a_features_modality(gen):
    model = build_model(THREE, 3, fusion="irfb", in_dims={"audio": 65, "text": 5},
                        irfb={"dim": 16, "depth": 1, "heads": 2}).eval()
    batch = three_modality_batch(gen)
    mask = batch["text_mask"].clone()
    mask[-1, 0] = True  # (every sequence keeps a step: IRFB's [CLS] attends to the others)
    batch["text_mask"] = mask
    junk = torch.randn(batch["text"].shape, generator=gen) * 1e3  # (finite: attention weighs it by exactly 0)
    garbage = dict(batch, text=torch.where(mask[..., None], batch["text"], junk))
    with torch.no_grad():
        clean, dirty = model.encode(batch), model.encode(garbage)
        unmasked = model.encode({k: v for k, v in garbage.items() if k != "text_mask"})
    for a, b in zip(clean, dirty):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[2], clean[2], atol=1e-3)  # (without the mask the padding is attended)
