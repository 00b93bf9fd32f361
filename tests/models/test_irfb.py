"""IRFB (OLM's intermediate representation fusion block): shapes and gradients with two and
three modalities, decoupled uni-modal streams, token masks, and the fusion update against a
slow rewrite of eq. 2-4."""
import pytest
import torch

from mmfast.models.irfb import IRFBEncoder, attention

KINDS = {"audio": "audio", "visual": "frames", "text": "features"}


def inputs(names, B=3, gen=None):
    out = {"audio": torch.randn(B, 33, 24, generator=gen), "visual": torch.randn(B, 2, 3, 16, 16, generator=gen),
           "text": torch.randn(B, 7, 12, generator=gen)}
    return {n: out[n] for n in names}


def build(names, **kw):
    return IRFBEncoder({n: KINDS[n] for n in names}, in_dims={"audio": 33, "text": 12}, dim=32, depth=2, heads=4,
                       bottleneck_tokens=3, **kw)


@pytest.mark.parametrize("names", [("audio", "visual"), ("audio", "visual", "text")])
def test_shapes_and_every_parameter_gets_a_gradient(names):
    torch.manual_seed(0)
    model = build(names)
    unimodal, fused = model(inputs(names))
    assert len(unimodal) == len(names) and all(u.shape == (3, 32) for u in unimodal) and fused.shape == (3, 32)
    (sum(u.square().sum() for u in unimodal) + fused.square().sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


@pytest.mark.parametrize("names", [("audio", "visual"), ("audio", "visual", "text")])
def test_uni_modal_streams_do_not_depend_on_other_modalities(names):
    """Decoupled learning: changing or masking one modality's tokens leaves every other
    modality's [CLS] output unchanged, while the fused output changes; the gradient of one
    modality's output reaches no other modality's parameters."""
    torch.manual_seed(1)
    model = build(names).eval()
    x = inputs(names)
    base_uni, base_fused = model(x)
    changed = dict(x, audio=torch.randn_like(x["audio"]))
    keep = {"audio": torch.rand(3, 6) > 0.5}  # 24 frames / patch 4 = 6 audio tokens
    for uni, fused in (model(changed), model(x, keep=keep)):
        for m, name in enumerate(names):
            if name != "audio":
                assert torch.equal(uni[m], base_uni[m]), name
        assert not torch.allclose(fused, base_fused)
    uni, _ = model(x)
    uni[names.index("visual")].sum().backward()
    for name, p in model.named_parameters():
        if name.startswith(("streams.audio", "bottleneck", "fusion")):
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name


def test_masked_tokens_are_ignored():
    torch.manual_seed(2)
    model = build(("audio", "visual")).eval()
    x = inputs(("audio", "visual"))
    keep = {"audio": torch.ones(3, 6, dtype=torch.bool)}
    keep["audio"][:, 4:] = False
    a = model(x, keep=keep)
    spectrogram = x["audio"].clone()
    spectrogram[:, :, 16:] = torch.randn_like(spectrogram[:, :, 16:])  # frames 16.. feed tokens 4..
    b = model(dict(x, audio=spectrogram), keep=keep)
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(a[0], b[0])) and torch.allclose(a[1], b[1], atol=1e-5)


def test_fusion_layer_matches_a_slow_rewrite_of_the_equations():
    torch.manual_seed(3)
    model = build(("audio", "visual", "text")).eval()
    layer = model.fusion[0]
    B, d, Tb = 2, 32, 3
    streams = [torch.randn(B, L, d) for L in (5, 9, 4)]
    zb = torch.randn(B, Tb, d)
    got = layer(streams, zb, [None, None, None])
    expected = torch.empty_like(zb)
    for i in range(B):
        summary = torch.cat([z[i, 0] for z in streams] + [zb[i].mean(0)])
        parts = []
        for m, z in enumerate(streams):
            q = layer.q[m](zb[i])
            k, v = layer.kv[m](z[i]).chunk(2, dim=-1)
            heads = []
            for h in range(4):
                s = slice(8 * h, 8 * h + 8)
                w = torch.softmax(q[:, s] @ k[:, s].T / 8 ** 0.5, dim=-1)
                heads.append(w @ v[:, s])
            z_mb = layer.norm_att[m](zb[i] + torch.cat(heads, dim=-1))
            g = torch.sigmoid(layer.gate[m](summary))
            parts.append(layer.norm_gate[m](z_mb + g * z_mb))
        z_g = torch.cat(parts)
        alpha = torch.softmax(layer.pool_v(torch.tanh(layer.pool(z_g))).squeeze(-1), dim=0)
        expected[i] = zb[i] + alpha @ z_g
    assert torch.allclose(got, expected, atol=1e-5)


def test_attention_with_a_mask_equals_attention_over_the_kept_keys():
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 3, 16), torch.randn(1, 6, 16), torch.randn(1, 6, 16)
    keep = torch.tensor([[True, False, True, True, False, True]])
    kept = keep[0]
    assert torch.allclose(attention(q, k, v, 2, keep), attention(q, k[:, kept], v[:, kept], 2, None), atol=1e-6)


def test_bad_input_is_named():
    model = build(("audio", "visual"))
    with pytest.raises(KeyError, match="no input for modality 'visual'"):
        model({"audio": torch.randn(2, 33, 24)})
    with pytest.raises(ValueError, match=r"keep\['audio'\] must be bool"):
        model(inputs(("audio", "visual"), B=2), keep={"audio": torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="at least 2 modalities"):
        IRFBEncoder({"audio": "audio"}, in_dims={"audio": 33})
    with pytest.raises(ValueError, match="needs in_dim"):
        IRFBEncoder({"audio": "audio", "visual": "frames"})
