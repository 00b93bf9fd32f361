"""Triton kernel: batch scores, discrepancy ratios, OGM coefficients and OPM drop probabilities.

One program (M is small). From per-block partial sums [M, NB] (or, with INPUT_IS_RHO, from rho):

    S[m]   = sum_b partial[m, b]
    rho[m] = 1/(M-1) sum_{j != m} S[m] / S[j]        (KIND 0: ratio)
           = 1/(M-1) sum_{j != m} (S[m] - S[j])      (KIND 1: difference)
    k[m]   = max(1 - alpha * z(rho), 0) if rho > 1 else 1      (FORM 0: paper)
           = 1 - tanh(alpha * rho)      if rho > 1 else 1      (FORM 1: reference code)
           = 1 + alpha * z(1 / rho)     if rho < 1 else 1      (FORM 2: OGM*, boost the weak)
    q[m]   = clip(q_base * (1 + lam * z(rho)), 0, 1) if rho > 1 else 0
    z(x)   = tanh(x - 1) (Z 0) or sigmoid(x) (Z 1)

The formulas are stated once for users in mmfast/ops/balance.py; the PyTorch reference is
mmfast.ops.balance._coefficients_torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import on_device

@triton.jit
def _tanh(x):
    # exp of a non-positive argument only: no overflow; NaN stays NaN.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _z(x, Z: tl.constexpr):
    if Z == 0:
        return _tanh(x - 1.0)
    else:
        return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _balance_coefficients_kernel(
    in_ptr, out_ptr, M, NB, alpha, q_base, lam,
    INPUT_IS_RHO: tl.constexpr, KIND: tl.constexpr, FORM: tl.constexpr, Z: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_NB: tl.constexpr,
):
    mm = tl.arange(0, BLOCK_M)
    m_ok = mm < M
    if INPUT_IS_RHO:
        rho = tl.load(in_ptr + mm, mask=m_ok, other=0.0)
        S = tl.zeros([BLOCK_M], tl.float32)
    else:
        S = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, NB, BLOCK_NB):
            nn = n0 + tl.arange(0, BLOCK_NB)
            p = tl.load(in_ptr + mm[:, None] * NB + nn[None, :], mask=m_ok[:, None] & (nn[None, :] < NB), other=0.0)
            S += tl.sum(p, axis=1)
        off_diag = (mm[:, None] != mm[None, :]) & m_ok[:, None] & m_ok[None, :]
        if KIND == 0:
            pair = S[:, None] / tl.where(m_ok, S, 1.0)[None, :]  # padding lanes divide by 1
        else:
            pair = S[:, None] - S[None, :]
        rho = tl.sum(tl.where(off_diag, pair, 0.0), axis=1) / (M - 1)

    if FORM == 0:
        k = tl.where(rho > 1.0, tl.maximum(1.0 - alpha * _z(rho, Z), 0.0), 1.0)
    elif FORM == 1:
        k = tl.where(rho > 1.0, 1.0 - _tanh(alpha * rho), 1.0)
    else:
        k = tl.where(rho < 1.0, 1.0 + alpha * _z(1.0 / tl.where(m_ok, rho, 1.0), Z), 1.0)
    q = tl.where(rho > 1.0, tl.minimum(tl.maximum(q_base * (1.0 + lam * _z(rho, Z)), 0.0), 1.0), 0.0)

    tl.store(out_ptr + mm, S, mask=m_ok)
    tl.store(out_ptr + M + mm, rho, mask=m_ok)
    tl.store(out_ptr + 2 * M + mm, k, mask=m_ok)
    tl.store(out_ptr + 3 * M + mm, q, mask=m_ok)


def balance_coefficients(inp: torch.Tensor, *, input_is_rho: bool, kind: int, form: int, z: int,
                         alpha: float, q_base: float, lam: float) -> torch.Tensor:
    """inp: partial sums [M, NB] float32 (or rho [M] with input_is_rho); kind/form/z: the codes
    above. Returns float32 [4, M]: rows S, rho, k, q (S is zero when input_is_rho)."""
    M = inp.shape[0]
    NB = 1 if input_is_rho else inp.shape[1]
    out = torch.empty((4, M), device=inp.device, dtype=torch.float32)
    with on_device(inp.device):
        _balance_coefficients_kernel[(1,)](
            inp, out, M, NB, float(alpha), float(q_base), float(lam),
            INPUT_IS_RHO=input_is_rho, KIND=kind, FORM=form, Z=z,
            BLOCK_M=max(2, triton.next_power_of_2(M)), BLOCK_NB=min(1024, max(2, triton.next_power_of_2(NB))),
        )
    return out
