"""The fusion registry (mmfast/models/registry.py) tells the truth about every head: each name
builds, its properties match what the built model does, configs offer exactly its names, and
the task loss is the fused cross-entropy plus, for heads with classifiers of their own, each
modality's (written out here the obvious way)."""
import pytest
import torch
import torch.nn.functional as F

from mmfast.config import CHOICES
from mmfast.methods.base import GENERIC_FUSIONS, POOLED_FUSIONS
from mmfast.models import FUSION_KINDS, FUSION_NAMES, build_model, fusion_kind, fusions_where, task_loss_per_sample

MODALITIES = {"audio": "audio", "visual": "frames"}


def batch(B=3):
    return {"audio": torch.randn(B, 40, 30), "visual": torch.randn(B, 3, 32, 32)}


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_every_fusion_builds_and_its_properties_hold(name):
    options = {"irfb": {"dim": 16, "depth": 1, "heads": 2}, "in_dims": {"audio": 40}} if name == "irfb" else {}
    model = build_model(MODALITIES, 5, fusion=name, width=8, **options)
    kind = fusion_kind(name)
    features = model.encode(batch())
    assert model.fused_representation == (not kind.pooled)
    assert getattr(model.fusion, "trains_unimodal", False) == kind.trains_unimodal
    fused, unimodal, *_ = model.head(features)
    assert fused.shape == (3, 5) and unimodal.shape == (2, 3, 5)
    assert unimodal.requires_grad == kind.trains_unimodal  # (estimates are detached measurements)


def test_choices_and_method_defaults_come_from_the_registry():
    assert CHOICES["model.fusion"] == ("auto", *FUSION_KINDS)
    assert set(GENERIC_FUSIONS) == {n for n, k in FUSION_KINDS.items() if not k.method_specific}
    assert set(POOLED_FUSIONS) == {n for n, k in FUSION_KINDS.items() if k.pooled and not k.method_specific}
    assert fusions_where(splittable=True) == ("concat", "sum", "cosine")
    with pytest.raises(ValueError, match="fusion must be one of"):
        fusion_kind("nope")


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_task_loss_per_sample(name, gen):
    fused, unimodal = torch.randn(4, 3, generator=gen), torch.randn(2, 4, 3, generator=gen)
    labels = torch.randint(0, 3, (4,), generator=gen)
    expected = torch.stack([F.cross_entropy(fused[i:i + 1], labels[i:i + 1]) for i in range(4)])
    if fusion_kind(name).trains_unimodal:
        expected = expected + torch.stack([sum(F.cross_entropy(unimodal[m, i:i + 1], labels[i:i + 1]) for m in range(2))
                                           for i in range(4)])
    torch.testing.assert_close(task_loss_per_sample(name, fused, unimodal, labels), expected)
