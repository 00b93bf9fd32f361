"""How well each modality alone predicts the batch, and what the balancing methods make of it.

OGM, OGM-GE and OPM as TPAMI 2024 defines them (eq. 6-8, 11-17; docs/reference-semantics.md). For uni-modal
logits o_m [M, B, C] (mmfast.models.estimators; the methods measure the undropped features of every
sample), labels y [B] and an optional sample mask w ([B] or [M, B], e.g. a part of the batch):

    s[m, i] = softmax(o_m[i])[y_i]                       per-sample true-class probability
    S[m]    = sum_i w[m, i] * s[m, i]                      batch score (samples with w = 0 skipped)
    rho[m]  = 1/(M-1) * sum_{j != m} S[m] / S[j]           kind="ratio" (two modalities: S_a / S_v)
            = 1/(M-1) * sum_{j != m} (S[m] - S[j])         kind="difference" (TPAMI 4.5.1)
    z(x)    = tanh(x - 1)  (z="tanh")  or  sigmoid(x)  (z="sigmoid")

    OGM coefficient k[m] (1 = untouched; only rho > 1, the dominant modalities, are modulated):
      form="paper":     k = max(1 - alpha * z(rho), 0)   if rho > 1 else 1
      form="reference": k = 1 - tanh(alpha * rho)        if rho > 1 else 1   (the public code)
      form="star":      k = 1 + alpha * z(1 / rho)       if rho < 1 else 1   (OGM*: boost the weak
                        modalities instead; the paper gives no formula, this mirrors the paper form
                        with 1/rho, the weak modality's ratio against the others; kind="ratio" only)
    OPM drop probability for the next step:
      q[m] = clip(q_base * (1 + lam * z(rho)), 0, 1)      if rho > 1 else 0

A NaN rho (0/0 scores) compares false everywhere, so nothing is modulated.

Every op dispatches (mmfast.dispatch): Triton kernels (kernels/modality_scores.py,
kernels/balance_coefficients.py) on CUDA tensors, the extension's C++ kernels
(csrc/cpu/balance_cpu.cpp) on CPU tensors; backend="triton" forces the Triton kernels (on CPU
under TRITON_INTERPRET=1), backend="torch" the vectorised PyTorch path (the kernels' reference). Results stay on the
device, float32, outside autograd (they are measurements); nothing reads them on the host. The
``*_reference`` functions at the end are slow, obvious loops for the tests.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..dispatch import choose_backend

KINDS = ("ratio", "difference")
FORMS = ("paper", "reference", "star")
ZS = ("tanh", "sigmoid")
# alpha of each coefficient form (one form's alpha damps very differently in the other: at rho 1.5,
# alpha 0.8 gives k 0.63 in the paper form and 0.17 in the public code's).
ALPHA_DEFAULTS = {
    "paper": 1.0,  # no published value (TPAMI 2024 gives none; section 4.5.3 finds results insensitive to it);
    #                1.0 lets k span the paper's whole range (1 - alpha, 1] down to its floor 0 (eq. 11)
    "reference": 0.8,  # the public code's CREMA-D scripts (its VGGSound scripts: 0.1)
    "star": 0.8,  # no published value (OGM*, TPAMI 4.4.2, gives no formula): mmfast's reading
}


class BalanceStats(NamedTuple):
    """Everything one balancing step measures, each a float32 device tensor."""

    scores: torch.Tensor  # S [M]
    sample_scores: torch.Tensor  # s [M, B]
    ratio: torch.Tensor  # rho [M]
    coeffs: torch.Tensor  # OGM k [M]
    drop_probs: torch.Tensor  # OPM q [M]


# --------------------------------------------------------------------------------------------
# Public API. Every op is the same two stages, each with a Triton, a C++ and a PyTorch version:
#   1. scores: logits, labels, mask -> s [M, B], partial sums [M, NB]
#   2. coefficients: partial sums (or S, or rho) -> rows S, rho, k, q of a [4, M] tensor
# (balance_coefficients is stage 2 alone, from S.)

def modality_scores(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, *,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Batch scores S [M] and per-sample true-class probabilities s [M, B] (float32).

    logits: [M, B, C] float (M >= 2); labels: [B] integer in [0, C); mask: None, [B] or [M, B],
    bool or float weights. Two kernel launches, no host synchronisation."""
    op = "modality_scores"
    be = choose_backend(op, logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu"), backend)
    logits, labels, mask = _check_scores_inputs(op, logits, labels, mask, check_range=be != "native")
    s, partial = _scores_stage(be, logits, labels, mask)
    return _coefficients_stage(be, partial, False, 0, 0, 0, 0.0, 0.0, 0.0)[0], s


def discrepancy_ratio(S: torch.Tensor, kind: str = "ratio", *, backend: str = "auto") -> torch.Tensor:
    """rho [M] from batch scores S [M] (M >= 2); kind "ratio" or "difference"."""
    op = "discrepancy_ratio"
    S = _check_vector(op, "S", S, min_len=2)
    kind_code = _choice(op, "kind", kind, KINDS)
    be = choose_backend(op, S.device, backend)
    return _coefficients_stage(be, S.float().view(-1, 1), False, kind_code, 0, 0, 0.0, 0.0, 0.0)[1]


def ogm_coefficients(rho: torch.Tensor, alpha: float, form: str = "paper", z: str = "tanh", *,
                     backend: str = "auto") -> torch.Tensor:
    """OGM gradient coefficients k [M] from rho [M] (see the module docstring for the forms)."""
    op = "ogm_coefficients"
    rho = _check_vector(op, "rho", rho, min_len=1)
    form_code, z_code = _choice(op, "form", form, FORMS), _choice(op, "z", z, ZS)
    _check_params(op, alpha=alpha)
    be = choose_backend(op, rho.device, backend)
    return _coefficients_stage(be, rho.float(), True, 0, form_code, z_code, alpha, 0.0, 0.0)[2]


def opm_drop_probabilities(rho: torch.Tensor, q_base: float = 0.5, lam: float = 0.5, z: str = "tanh", *,
                           backend: str = "auto") -> torch.Tensor:
    """OPM feature-drop probabilities q [M] for the next step, from rho [M]."""
    op = "opm_drop_probabilities"
    rho = _check_vector(op, "rho", rho, min_len=1)
    z_code = _choice(op, "z", z, ZS)
    _check_params(op, q_base=q_base, lam=lam)
    be = choose_backend(op, rho.device, backend)
    return _coefficients_stage(be, rho.float(), True, 0, 0, z_code, 0.0, q_base, lam)[3]


class Coefficients(NamedTuple):
    """What the coefficient stage makes of batch scores S, each a float32 [M] device tensor."""

    scores: torch.Tensor  # S [M], as given
    ratio: torch.Tensor  # rho [M]
    coeffs: torch.Tensor  # OGM k [M]
    drop_probs: torch.Tensor  # OPM q [M]


def balance_coefficients(S: torch.Tensor, *, kind: str = "ratio", alpha: float = ALPHA_DEFAULTS["paper"],
                         form: str = "paper",
                         z: str = "tanh", q_base: float = 0.5, lam: float = 0.5,
                         backend: str = "auto") -> Coefficients:
    """rho, OGM k and OPM q from batch scores S [M] (M >= 2): the second stage of balance_stats
    on its own (one launch), for scores summed elsewhere first, e.g. all-reduced over the
    processes of a distributed run so that every rank computes the same coefficients."""
    op = "balance_coefficients"
    S = _check_vector(op, "S", S, min_len=2)
    codes = _check_coefficient_params(op, kind, form, z, alpha, q_base, lam)
    be = choose_backend(op, S.device, backend)
    out = _coefficients_stage(be, S.float().contiguous().view(-1, 1), False, *codes, alpha, q_base, lam)
    return Coefficients(out[0], out[1], out[2], out[3])


def balance_stats(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None, *,
                  kind: str = "ratio", alpha: float = ALPHA_DEFAULTS["paper"], form: str = "paper", z: str = "tanh",
                  q_base: float = 0.5, lam: float = 0.5, reduce_scores=None, backend: str = "auto") -> BalanceStats:
    """All of the above from one call: S, s, rho, OGM k and OPM q (two kernel launches).

    reduce_scores: None, or a function S [M] -> S [M] applied between the two stages (a
    distributed run passes an all-reduce sum: coefficients of the global batch on every rank)."""
    op = "balance_stats"
    codes = _check_coefficient_params(op, kind, form, z, alpha, q_base, lam)
    be = choose_backend(op, logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu"), backend)
    logits, labels, mask = _check_scores_inputs(op, logits, labels, mask, check_range=be != "native")
    s, partial = _scores_stage(be, logits, labels, mask)
    if reduce_scores is not None:
        partial = reduce_scores(partial.sum(dim=1)).view(-1, 1)
    out = _coefficients_stage(be, partial, False, *codes, alpha, q_base, lam)
    return BalanceStats(out[0], s, out[1], out[2], out[3])


def _check_coefficient_params(op, kind, form, z, alpha, q_base, lam):
    """(kind, form, z) codes of the kernels, after checking every coefficient parameter."""
    codes = _choice(op, "kind", kind, KINDS), _choice(op, "form", form, FORMS), _choice(op, "z", z, ZS)
    if form == "star" and kind != "ratio":
        raise ValueError(f"{op}: form='star' (OGM*) mirrors the ratio with 1/rho, so it needs kind='ratio'")
    _check_params(op, alpha=alpha, q_base=q_base, lam=lam)
    return codes


def _scores_stage(backend, logits, labels, mask):
    if backend == "triton":
        from mmfast.kernels.modality_scores import modality_scores as scores_kernel

        return scores_kernel(logits, labels, mask)
    if backend == "native":
        return torch.ops.mmfast.modality_scores(logits, labels, mask)
    with torch.no_grad():
        return _scores_torch(logits, labels, mask)


def _coefficients_stage(backend, inp, input_is_rho, kind, form, z, alpha, q_base, lam):
    if backend == "triton":
        from mmfast.kernels.balance_coefficients import balance_coefficients

        return balance_coefficients(inp.contiguous(), input_is_rho=input_is_rho, kind=kind, form=form, z=z,
                                    alpha=alpha, q_base=q_base, lam=lam)
    if backend == "native":
        return torch.ops.mmfast.balance_coefficients(inp, input_is_rho, kind, form, z, float(alpha), float(q_base),
                                                     float(lam))
    return _coefficients_torch(inp, input_is_rho, kind, form, z, alpha, q_base, lam)


# --------------------------------------------------------------------------------------------
# Argument checks: clear errors naming the argument, before any work.

def _check_scores_inputs(op, logits, labels, mask, check_range=True):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op}: logits must be a torch.Tensor [M, B, C], got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{op}: logits must be floating point, got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"{op}: logits must have shape [M, B, C], got {tuple(logits.shape)}")
    M, B, C = logits.shape
    if M < 2:
        raise ValueError(f"{op}: needs at least 2 modalities to compare, got M={M}")
    if B < 1 or C < 1:
        raise ValueError(f"{op}: logits must have at least one sample and one class, got shape {tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be a torch.Tensor [B], got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{op}: labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != (B,):
        raise ValueError(f"{op}: labels must have shape [B] = [{B}] to match logits {tuple(logits.shape)}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"{op}: labels are on {labels.device} but logits on {logits.device}")
    labels = labels.long().contiguous()
    if labels.device.type != "cpu":
        # Checking on the host would synchronise; the kernels give NaN for such rows meanwhile.
        torch._assert_async(((labels >= 0) & (labels < C)).all(), f"{op}: a label is out of range [0, {C})")
    elif check_range:  # (the C++ kernel checks while it reads them)
        in_range = (labels >= 0) & (labels < C)
        if not bool(in_range.all()):
            i = int((~in_range).nonzero()[0, 0])
            raise ValueError(f"{op}: labels[{i}] = {int(labels[i])} is out of range [0, {C}) for C={C} classes")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{op}: mask must be a torch.Tensor ([B] or [M, B]) or None")
        if not (mask.dtype == torch.bool or mask.is_floating_point()):
            raise TypeError(f"{op}: mask must be bool or floating point, got {mask.dtype}")
        if mask.shape not in ((B,), (M, B)):
            raise ValueError(f"{op}: mask must have shape [B] = [{B}] or [M, B] = [{M}, {B}], got {tuple(mask.shape)}")
        if mask.device != logits.device:
            raise ValueError(f"{op}: mask is on {mask.device} but logits on {logits.device}")
        mask = mask.to(torch.float32).expand(M, B)
    return logits.detach(), labels, mask


def _check_vector(op, name, x, min_len):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")
    if x.dim() != 1 or x.numel() < min_len:
        raise ValueError(f"{op}: {name} must be 1-D with at least {min_len} entries (one per modality), "
                         f"got shape {tuple(x.shape)}")
    return x.detach()


def _choice(op, name, value, choices):
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {choices}, got {value!r}")
    return choices.index(value)


def _check_params(op, **params):
    for name, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{op}: {name} must be a finite number, got {value!r}")
        if value < 0 or (name == "q_base" and value > 1):
            limits = "[0, 1]" if name == "q_base" else ">= 0"
            raise ValueError(f"{op}: {name} must be {limits}, got {value}")


# --------------------------------------------------------------------------------------------
# Vectorised PyTorch path (backend="torch", or CUDA without Triton): the kernels' reference.

def _scores_torch(logits, labels, mask):
    """(s [M, B], per-modality sums [M, 1])."""
    M, B, C = logits.shape
    x = logits.float()
    # exp(x_y - max) / sum exp(x - max): unlike exp(x_y - logsumexp), no rounding of a large
    # logsumexp enters the exponent (logits of magnitude 1e4 keep full relative precision).
    top = x.amax(dim=2, keepdim=True)
    label_logit = x.gather(2, labels.view(1, B, 1).expand(M, B, 1))
    s = (torch.exp(label_logit - top) / torch.exp(x - top).sum(dim=2, keepdim=True)).squeeze(2)
    if mask is None:
        S = s.sum(dim=1)
    else:
        S = torch.where(mask != 0, s * mask, 0.0).sum(dim=1)
    return s, S.view(M, 1)


def _ratio_torch(S, kind):
    M = S.shape[0]
    pair = S[:, None] / S[None, :] if kind == 0 else S[:, None] - S[None, :]
    off_diag = ~torch.eye(M, dtype=torch.bool, device=S.device)
    return torch.where(off_diag, pair, 0.0).sum(dim=1) / (M - 1)


def _z_torch(x, z):
    return torch.tanh(x - 1.0) if z == 0 else torch.sigmoid(x)


def _coefficients_torch(inp, input_is_rho, kind, form, z, alpha, q_base, lam):
    """Rows S, rho, k, q [4, M] from partial sums [M, NB] or from rho [M]."""
    if input_is_rho:
        rho, S = inp, torch.zeros_like(inp)
    else:
        S = inp.sum(dim=1)
        rho = _ratio_torch(S, kind)
    one = torch.ones_like(rho)
    if form == 0:
        k = torch.where(rho > 1, torch.clamp(1 - alpha * _z_torch(rho, z), min=0.0), one)
    elif form == 1:
        k = torch.where(rho > 1, 1 - torch.tanh(alpha * rho), one)
    else:
        k = torch.where(rho < 1, 1 + alpha * _z_torch(1.0 / rho, z), one)
    q = torch.where(rho > 1, torch.clamp(q_base * (1 + lam * _z_torch(rho, z)), 0.0, 1.0), torch.zeros_like(rho))
    return torch.stack([S, rho, k, q])


# --------------------------------------------------------------------------------------------
# Slow references: per-sample and per-modality Python loops in float64, for the tests.

def modality_scores_reference(logits, labels, mask=None):
    M, B, _ = logits.shape
    s = torch.zeros(M, B, dtype=torch.float64)
    S = torch.zeros(M, dtype=torch.float64)
    for m in range(M):
        for i in range(B):
            row = logits[m, i].double().cpu()
            p = torch.exp(row - row.max())
            s[m, i] = p[int(labels[i])] / p.sum()
            w = 1.0 if mask is None else float(mask[i] if mask.dim() == 1 else mask[m, i])
            if w != 0:
                S[m] += w * s[m, i]
    return S, s


def discrepancy_ratio_reference(S, kind="ratio"):
    S = [torch.tensor(float(v), dtype=torch.float64) for v in S]  # IEEE division: x/0 = inf, 0/0 = nan
    M = len(S)
    rho = []
    for m in range(M):
        terms = [S[m] / S[j] if kind == "ratio" else S[m] - S[j] for j in range(M) if j != m]
        rho.append(float(sum(terms)) / (M - 1))
    return torch.tensor(rho, dtype=torch.float64)


def _z_reference(x, z):
    return math.tanh(x - 1.0) if z == "tanh" else 0.5 * (1.0 + math.tanh(x / 2.0))  # = sigmoid(x)


def ogm_coefficients_reference(rho, alpha, form="paper", z="tanh"):
    out = []
    for r in (float(v) for v in rho):
        if form == "paper":
            out.append(max(1.0 - alpha * _z_reference(r, z), 0.0) if r > 1 else 1.0)
        elif form == "reference":
            out.append(1.0 - math.tanh(alpha * r) if r > 1 else 1.0)
        else:
            inverse = 1.0 / r if r != 0 else math.inf
            out.append(1.0 + alpha * _z_reference(inverse, z) if r < 1 else 1.0)
    return torch.tensor(out, dtype=torch.float64)


def opm_drop_probabilities_reference(rho, q_base=0.5, lam=0.5, z="tanh"):
    out = []
    for r in (float(v) for v in rho):
        out.append(min(max(q_base * (1.0 + lam * _z_reference(r, z)), 0.0), 1.0) if r > 1 else 0.0)
    return torch.tensor(out, dtype=torch.float64)
