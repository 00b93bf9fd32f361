"""Uni-modal logit estimators against their definitions, computed the obvious way."""
import pytest
import torch
from torch import nn

from mmfast.models.estimators import ConcatHead, concat_head_logits, separate_head_logits, zero_out_logits


def features(gen, dims, B=6):
    return [torch.randn(B, d, generator=gen) for d in dims]


@pytest.mark.parametrize("dims", [[16, 8], [5, 7, 3]])
def test_concat_head_fused_logits_and_weight_split(gen, dims):
    feats = [f.requires_grad_(True) for f in features(gen, dims)]
    C = 4
    W = torch.randn(C, sum(dims), generator=gen, requires_grad=True)
    b = torch.randn(C, generator=gen, requires_grad=True)
    fused, unimodal = concat_head_logits(feats, W, b)
    expected = torch.cat(feats, dim=1) @ W.T + b
    torch.testing.assert_close(fused, expected)
    # o_m = W_m phi_m + b / M, the split used by the reference code.
    start = 0
    for m, f in enumerate(feats):
        W_m = W[:, start:start + f.shape[1]]
        torch.testing.assert_close(unimodal[m], f @ W_m.T + b / len(dims))
        start += f.shape[1]
    assert not unimodal.requires_grad
    # Gradients through the fused logits are those of the plain concat head.
    g = torch.randn_like(fused)
    grads = torch.autograd.grad(fused, [W, b, *feats], g)
    grads_ref = torch.autograd.grad(expected, [W, b, *feats], g)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r)


def test_concat_head_bias_shares(gen):
    feats = features(gen, [3, 3])
    W, b = torch.randn(2, 6, generator=gen), torch.randn(2, generator=gen)
    _, unimodal = concat_head_logits(feats, W, b, gamma=[1.0, 0.0])
    torch.testing.assert_close(unimodal[0], feats[0] @ W[:, :3].T + b)
    torch.testing.assert_close(unimodal[1], feats[1] @ W[:, 3:].T)


def test_concat_head_module(gen):
    head = ConcatHead([4, 6], 3)
    feats = features(gen, [4, 6])
    fused, unimodal = head(feats)
    torch.testing.assert_close(fused, head.fc(torch.cat(feats, 1)))
    assert unimodal.shape == (2, 6, 3)


class GatedHead(nn.Module):
    """A head where the weight split is undefined (as FiLM/gated fusion): a gate from audio."""

    def __init__(self, d, C):
        super().__init__()
        self.gate, self.fc = nn.Linear(d, d), nn.Linear(d, C)

    def forward(self, feats):
        a, v = feats
        return self.fc(torch.sigmoid(self.gate(a)) * v + a)


def test_zero_out_matches_one_call_per_modality(gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    head = GatedHead(5, 3)
    feats = features(gen, [5, 5], B=7)
    out = zero_out_logits(head, feats)
    assert out.shape == (2, 7, 3)
    with torch.no_grad():
        torch.testing.assert_close(out[0], head([feats[0], torch.zeros_like(feats[1])]))
        torch.testing.assert_close(out[1], head([torch.zeros_like(feats[0]), feats[1]]))


def test_separate_heads(gen):
    heads = [nn.Linear(4, 3), nn.Linear(2, 3)]
    feats = features(gen, [4, 2])
    out = separate_head_logits(heads, feats)
    torch.testing.assert_close(out, torch.stack([heads[0](feats[0]), heads[1](feats[1])]).detach())
    assert not out.requires_grad


def test_estimator_bad_input(gen):
    feats = features(gen, [3, 3])
    with pytest.raises(ValueError, match="weight must be"):
        concat_head_logits(feats, torch.randn(2, 5))
    with pytest.raises(ValueError, match="gamma needs one bias share"):
        concat_head_logits(feats, torch.randn(2, 6), torch.randn(2), gamma=[1.0])
    with pytest.raises(ValueError, match=r"features\[1\] has batch"):
        concat_head_logits([feats[0], feats[1][:2]], torch.randn(2, 6))
    with pytest.raises(ValueError, match="M >= 2"):
        separate_head_logits([nn.Linear(3, 2)], feats[:1])
    with pytest.raises(ValueError, match="2 heads for 3"):
        separate_head_logits([nn.Linear(3, 2)] * 2, features(gen, [3, 3, 3]))
