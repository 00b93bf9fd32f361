"""IRFB: the intermediate representation fusion block of OLM (IJCAI 2024, eq. 2-4), with the
per-modality Transformer encoders it sits between.

Per modality m, tokens from a stem, a [CLS] token and L pre-norm Transformer blocks give the
uni-modal streams z_m^[l] (they never see the fusion: decoupled learning). A few bottleneck
tokens z_b (T_b of them, learned) carry the multimodal interaction; after every layer l:

    z_{m->b} = LayerNorm(z_b + Att(z_b W_bm^Q, z_m W_m^K, z_m W_m^V))             (eq. 2)
    g_{m->b} = sigmoid(W_mb [cls_1, ..., cls_M, mean(z_b)] + b_mb)                (eq. 3)
    z_{m->b} = LayerNorm(z_{m->b} + g_{m->b} * z_{m->b})
    z_g      = concat over tokens of z_{m->b}, m = 1..M
    z_b     <- z_b + softmax_tokens(v^T tanh(z_g W + b)) z_g                       (eq. 4)

The paper writes the gate's input as [z_v, z_a, z_b]; streams of different lengths cannot be
concatenated feature-wise, so each stream enters through its utterance-level representation
(its [CLS] embedding; the bottleneck: its mean token), and the gate is shared by the T_b tokens.
Outputs: each modality's final [CLS] embedding (uni-modal representation) and the mean of the
final bottleneck tokens (the fused representation). Attention is
torch.nn.functional.scaled_dot_product_attention throughout.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

STEMS = ("audio", "frames", "video", "features")


def sinusoidal_positions(length: int, dim: int, device, dtype) -> torch.Tensor:
    """[length, dim] fixed sinusoidal position codes (any sequence length)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    codes = torch.zeros(length, dim, device=device)
    codes[:, 0::2] = torch.sin(position * freq)
    codes[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return codes.to(dtype)


class TokenStem(nn.Module):
    """Input of one modality -> tokens [B, L, dim].

    audio     spectrogram [B, F, T]: non-overlapping patches of `patch` frames, projected
    frames    [B, T, 3, H, W] (video too): a 3-layer strided conv stem per frame, every spatial
              position of every frame a token
    features  pre-extracted sequences [B, L, in_dim]: a linear projection
    """

    def __init__(self, kind: str, dim: int, *, in_dim: int | None = None, patch: int = 4):
        super().__init__()
        if kind not in STEMS:
            raise ValueError(f"TokenStem: kind must be one of {STEMS}, got {kind!r}")
        self.kind = "frames" if kind == "video" else kind
        if self.kind in ("audio", "features") and (in_dim is None or in_dim < 1):
            raise ValueError(f"TokenStem({kind!r}) needs in_dim (frequency bins or feature size)")
        if self.kind == "audio":
            self.proj = nn.Conv1d(in_dim, dim, kernel_size=patch, stride=patch)
        elif self.kind == "features":
            self.proj = nn.Linear(in_dim, dim)
        else:
            self.proj = nn.Sequential(nn.Conv2d(3, dim // 4, 3, 2, 1), nn.GELU(), nn.Conv2d(dim // 4, dim // 2, 3, 2, 1),
                                      nn.GELU(), nn.Conv2d(dim // 2, dim, 3, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "audio":
            if x.dim() != 3:
                raise ValueError(f"TokenStem(audio): expected a spectrogram [B, F, T], got {tuple(x.shape)}")
            return self.proj(x).transpose(1, 2)
        if self.kind == "features":
            if x.dim() != 3:
                raise ValueError(f"TokenStem(features): expected [B, L, in_dim], got {tuple(x.shape)}")
            return self.proj(x)
        if x.dim() == 4:
            x = x.unsqueeze(1)
        if x.dim() != 5 or x.shape[2] != 3:
            raise ValueError(f"TokenStem(frames): expected [B, T, 3, H, W] or [B, 3, H, W], got {tuple(x.shape)}")
        B, T = x.shape[:2]
        maps = self.proj(x.flatten(0, 1))  # [B*T, dim, h, w]
        return maps.flatten(2).transpose(1, 2).reshape(B, -1, maps.shape[1])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, keep: torch.Tensor | None):
    """Multi-head attention of q [B, Tq, d] over k, v [B, Tk, d]; keep [B, Tk] (True: attend)."""
    B, Tq, d = q.shape
    split = lambda t: t.reshape(B, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    mask = None if keep is None else keep[:, None, None, :]
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(B, Tq, d)


class Block(nn.Module):
    """Pre-norm Transformer encoder block (self-attention + MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.out(attention(q, k, v, self.heads, keep))
        return x + self.mlp(self.norm2(x))


class FusionLayer(nn.Module):
    """One IRFB update of the bottleneck tokens from the M streams of one layer (eq. 2-4)."""

    def __init__(self, num_modalities: int, dim: int, heads: int):
        super().__init__()
        M = num_modalities
        self.heads = heads
        self.q = nn.ModuleList(nn.Linear(dim, dim) for _ in range(M))  # W_bm^Q
        self.kv = nn.ModuleList(nn.Linear(dim, 2 * dim) for _ in range(M))  # W_m^K, W_m^V
        self.norm_att = nn.ModuleList(nn.LayerNorm(dim) for _ in range(M))
        self.gate = nn.ModuleList(nn.Linear((M + 1) * dim, dim) for _ in range(M))  # W_mb, b_mb
        self.norm_gate = nn.ModuleList(nn.LayerNorm(dim) for _ in range(M))
        self.pool = nn.Linear(dim, dim)  # W, b of eq. 4
        self.pool_v = nn.Linear(dim, 1, bias=False)  # v of eq. 4

    def forward(self, streams: list, bottleneck: torch.Tensor, keeps: list) -> torch.Tensor:
        summary = torch.cat([z[:, 0] for z in streams] + [bottleneck.mean(dim=1)], dim=-1)
        attended = []
        for m, z in enumerate(streams):
            k, v = self.kv[m](z).chunk(2, dim=-1)
            z_mb = self.norm_att[m](bottleneck + attention(self.q[m](bottleneck), k, v, self.heads, keeps[m]))
            gate = torch.sigmoid(self.gate[m](summary))[:, None, :]  # shared by the T_b tokens
            attended.append(self.norm_gate[m](z_mb + gate * z_mb))
        z_g = torch.cat(attended, dim=1)  # [B, M * T_b, d]
        weights = torch.softmax(self.pool_v(torch.tanh(self.pool(z_g))), dim=1)  # [B, M * T_b, 1]
        return bottleneck + (weights * z_g).sum(dim=1, keepdim=True)


class Stream(nn.Module):
    """One modality's uni-modal Transformer: stem, [CLS] token, `depth` blocks and a final norm
    (what gradient modulation treats as that modality's encoder)."""

    def __init__(self, kind: str, dim: int, depth: int, heads: int, *, in_dim: int | None, patch: int):
        super().__init__()
        self.stem = TokenStem(kind, dim, in_dim=in_dim, patch=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[CLS] followed by the stem's tokens with position codes: [B, 1 + L, dim]."""
        tokens = self.stem(x)
        B, L, d = tokens.shape
        tokens = tokens + sinusoidal_positions(L, d, tokens.device, tokens.dtype)
        return torch.cat([self.cls.expand(B, 1, d), tokens], dim=1)


class IRFBEncoder(nn.Module):
    """Per-modality Transformer encoders (``streams``) with IRFB between them.

    modalities: name -> kind ("audio", "frames", "video" or "features"); in_dims: name -> input
    size for "audio" (frequency bins) and "features" modalities. forward(inputs, keep=None)
    takes name -> tensor (and optionally name -> [B, L] bool token masks, True: a real token)
    and returns (uni-modal [CLS] embeddings, one [B, dim] per modality in order; fused [B, dim])."""

    def __init__(self, modalities: Mapping[str, str], *, in_dims: Mapping[str, int] | None = None, dim: int = 64,
                 depth: int = 2, heads: int = 4, bottleneck_tokens: int = 4, patch: int = 4):
        super().__init__()
        if len(modalities) < 2:
            raise ValueError(f"IRFBEncoder needs at least 2 modalities, got {list(modalities)}")
        if dim % heads or dim % 4 or depth < 1 or bottleneck_tokens < 1:
            raise ValueError("IRFBEncoder: dim must be a multiple of heads and of 4; depth, bottleneck_tokens >= 1")
        in_dims = dict(in_dims or {})
        self.modalities = list(modalities)
        self.out_dim = dim
        self.streams = nn.ModuleDict({m: Stream(k, dim, depth, heads, in_dim=in_dims.get(m), patch=patch)
                                      for m, k in modalities.items()})
        self.bottleneck = nn.Parameter(torch.randn(1, bottleneck_tokens, dim) * 0.02)
        self.fusion = nn.ModuleList(FusionLayer(len(modalities), dim, heads) for _ in range(depth))
        self.fused_norm = nn.LayerNorm(dim)

    def forward(self, inputs: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor] | None = None):
        keep = dict(keep or {})
        unknown = sorted(set(keep) - set(self.modalities))
        if unknown:
            raise ValueError(f"IRFBEncoder: keep names {unknown}, not modalities {self.modalities}")
        streams, keeps = [], []
        for m in self.modalities:
            if m not in inputs:
                raise KeyError(f"IRFBEncoder: no input for modality {m!r} (have {sorted(inputs)})")
            z = self.streams[m].tokens(inputs[m])
            B, L = z.shape[0], z.shape[1] - 1
            mask = keep.get(m)
            if mask is not None:
                if mask.shape != (B, L) or mask.dtype != torch.bool:
                    raise ValueError(f"IRFBEncoder: keep[{m!r}] must be bool [B={B}, L={L}] (tokens after the stem), "
                                     f"got {mask.dtype} {tuple(mask.shape)}")
                mask = torch.cat([mask.new_ones(B, 1), mask], dim=1)  # the [CLS] token always attends
            streams.append(z)
            keeps.append(mask)
        bottleneck = self.bottleneck.expand(streams[0].shape[0], -1, -1)
        for layer, fusion in enumerate(self.fusion):
            streams = [self.streams[m].blocks[layer](z, k) for m, z, k in zip(self.modalities, streams, keeps)]
            # The fusion reads the streams but never writes them back: uni-modal learning stays decoupled.
            bottleneck = fusion(streams, bottleneck, keeps)
        unimodal = [self.streams[m].norm(z[:, 0]) for m, z in zip(self.modalities, streams)]
        return unimodal, self.fused_norm(bottleneck.mean(dim=1))
