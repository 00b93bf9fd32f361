"""Per-sample feature dropping before fusion: OPM and ModDrop (docs/methods/opm.md).

For features phi_m [B, d_m] of M modalities and drop probabilities q [M] (on the device; OPM's
come from the previous step's balance statistics, ModDrop's are fixed):

    execute  ~ Bernoulli(p_exe)                      one draw per batch: is this batch modulated?
    q'       = q * execute
    keep[m, i] ~ Bernoulli(1 - q'[m])                one draw per sample per modality
    theta    = sum_m d_m q'[m] / sum_m d_m           expected share of dropped feature entries
    phi_m[i] <- phi_m[i] * keep[m, i] / (1 - theta)  (theta = 1: everything is dropped, scale 0)
    weight[i] = 1 if any modality of sample i is kept else 0   (samples with nothing left leave the loss)

The uniforms are drawn from `generator` in a fixed order (first the batch's execute draw, then
an [M, B] block), on the features' device; nothing is read by the host, so a step that drops
features never synchronises. The rescaling multiplies the features, so their gradients get the
same factor. ``feature_drop_reference`` is the slow per-sample loop the tests compare with.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class FeatureDrop(NamedTuple):
    features: list[torch.Tensor]  # the M feature tensors after dropping and rescaling
    keep: torch.Tensor  # [M, B] float32: 1 where modality m of sample i is kept
    sample_weight: torch.Tensor  # [B] float32: 1 where at least one modality is kept
    scale: torch.Tensor  # 0-dim float32: the factor kept features were multiplied by
    drop_probs: torch.Tensor  # [M] float32: q' = q * execute, the probabilities this batch was dropped with


def feature_drop(features: Sequence[torch.Tensor], drop_probs: torch.Tensor, *, p_exe: float = 1.0,
                 generator: torch.Generator | None = None, shard: tuple[int, int] | None = None) -> FeatureDrop:
    """Drop whole per-sample feature vectors of each modality with probability drop_probs[m].

    features: M >= 1 tensors [B, d_m] on one device (autograd flows through the kept ones);
    drop_probs: float tensor [M] in [0, 1] on that device (not checked on the host: values are
    clamped to [0, 1]); p_exe: probability that this batch is modulated at all; generator: a
    torch.Generator on the features' device (None: torch's default one); shard: (start, total)
    when these B samples are rows [start, start + B) of a global batch of `total` (a distributed
    run): the [M, total] uniforms of the global batch are drawn and this shard's columns used,
    so that every rank drops what one process would."""
    op = "feature_drop"
    if isinstance(features, torch.Tensor) or len(features) < 1:
        raise ValueError(f"{op}: features must be a list of M tensors [B, d_m], one per modality")
    B, device = features[0].shape[0], features[0].device
    for m, f in enumerate(features):
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != B or f.device != device:
            raise ValueError(f"{op}: features[{m}] must be a [B={B}, d] tensor on {device}, got "
                             + (f"{tuple(f.shape)} on {f.device}" if isinstance(f, torch.Tensor) else type(f).__name__))
    M = len(features)
    if not isinstance(drop_probs, torch.Tensor) or not drop_probs.is_floating_point() or drop_probs.shape != (M,):
        raise ValueError(f"{op}: drop_probs must be a float tensor [M={M}], got "
                         + (f"{drop_probs.dtype} {tuple(drop_probs.shape)}" if isinstance(drop_probs, torch.Tensor)
                            else type(drop_probs).__name__))
    if drop_probs.device != device:
        raise ValueError(f"{op}: drop_probs is on {drop_probs.device} but the features are on {device}")
    if isinstance(p_exe, bool) or not isinstance(p_exe, (int, float)) or not 0.0 <= p_exe <= 1.0:
        raise ValueError(f"{op}: p_exe must be a number in [0, 1], got {p_exe!r}")
    if generator is not None and generator.device != device:
        raise ValueError(f"{op}: generator is on {generator.device} but the features are on {device}")

    start, total = (0, B) if shard is None else shard
    if (not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, total))
            or start < 0 or start + B > total):
        raise ValueError(f"{op}: shard must be (start, total) with 0 <= start and start + B <= total for B={B}, "
                         f"got {shard!r}")

    execute_draw = torch.rand((), generator=generator, device=device)
    sample_draws = torch.rand((M, total), generator=generator, device=device)[:, start:start + B]
    q = drop_probs.detach().float().clamp(0.0, 1.0) * (execute_draw < p_exe).float()
    keep = (sample_draws >= q[:, None]).float()
    dims = torch.tensor([f.shape[1] for f in features], dtype=torch.float32, device=device)
    theta = (dims * q).sum() / dims.sum()
    scale = torch.where(theta < 1.0, 1.0 / (1.0 - theta).clamp_min(1e-12), 0.0)
    factors = keep * scale
    dropped = [f * factors[m].to(f.dtype)[:, None] for m, f in enumerate(features)]
    sample_weight = (keep.sum(dim=0) > 0).float()
    return FeatureDrop(dropped, keep, sample_weight, scale, q)


def weighted_mean(per_sample: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of a per-sample loss over the samples with weight 1 (all samples when None); 0 when
    none is left, without a host check."""
    if sample_weight is None:
        return per_sample.mean()
    return (per_sample * sample_weight).sum() / sample_weight.sum().clamp_min(1.0)


def feature_drop_reference(features, drop_probs, *, p_exe=1.0, generator=None):
    """Slow reference: the same uniforms (drawn from `generator` in the same order), then a Python
    loop over samples and modalities in float64. Returns (features, keep, sample_weight)."""
    M, B = len(features), features[0].shape[0]
    device = features[0].device
    execute = float(torch.rand((), generator=generator, device=device)) < p_exe
    draws = torch.rand((M, B), generator=generator, device=device).double().cpu()
    q = [min(max(float(p), 0.0), 1.0) if execute else 0.0 for p in drop_probs]
    dims = [f.shape[1] for f in features]
    theta = sum(d * qm for d, qm in zip(dims, q)) / sum(dims)
    scale = 1.0 / (1.0 - theta) if theta < 1.0 else 0.0
    keep = torch.zeros(M, B, dtype=torch.float64)
    out = [f.detach().double().cpu().clone() for f in features]
    for i in range(B):
        for m in range(M):
            keep[m, i] = 1.0 if float(draws[m, i]) >= q[m] else 0.0
            out[m][i] *= keep[m, i] * scale
    weight = torch.tensor([1.0 if keep[:, i].sum() > 0 else 0.0 for i in range(B)], dtype=torch.float64)
    return out, keep, weight
