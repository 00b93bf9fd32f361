"""Modality scores, discrepancy ratios, OGM coefficients and OPM drop probabilities: the PyTorch
path and the Triton kernels (interpreted on the CPU, compiled on a GPU) against slow loops."""
import math

import pytest
import torch

import mmfast
from support import TRITON_DEVICE, no_device_sync, requires_cuda
from mmfast.ops import (
    balance_coefficients,
    balance_stats,
    discrepancy_ratio,
    discrepancy_ratio_reference,
    modality_scores,
    modality_scores_reference,
    ogm_coefficients,
    ogm_coefficients_reference,
    opm_drop_probabilities,
    opm_drop_probabilities_reference,
)

BACKENDS = ["native", "torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def device_of(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def close(actual, expected, rtol=1e-5, atol=1e-7, msg=""):
    torch.testing.assert_close(actual.detach().double().cpu(), expected.double(), rtol=rtol, atol=atol,
                               equal_nan=True, msg=lambda m: f"{msg}: {m}" if msg else m)


def random_case(gen, M, B, C, dtype=torch.float32, scale=None):
    scale = float(torch.rand((), generator=gen)) * 8 + 0.1 if scale is None else scale
    logits = (scale * torch.randn(M, B, C, generator=gen)).to(dtype)
    labels = torch.randint(0, C, (B,), generator=gen)
    return logits, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,B,C", [(2, 1, 2), (2, 64, 6), (3, 37, 31), (4, 5, 1000), (2, 512, 309),
                                   (3, 3, 1025), (2, 7, 1)])
def test_scores_match_reference(gen, backend, dtype, M, B, C):
    logits, labels = random_case(gen, M, B, C, dtype)
    S_ref, s_ref = modality_scores_reference(logits, labels)
    dev = device_of(backend)
    S, s = modality_scores(logits.to(dev), labels.to(dev), backend=backend)
    assert S.dtype == s.dtype == torch.float32 and S.shape == (M,) and s.shape == (M, B)
    close(s, s_ref, msg=f"s ({dtype})")
    close(S, S_ref, msg=f"S ({dtype})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_with_extreme_logits(gen, backend):
    M, B, C = 3, 40, 50
    logits = torch.where(torch.rand(M, B, C, generator=gen) < 0.5, -1e4, 1e4) + torch.randn(M, B, C, generator=gen)
    logits[0, 0] = 1e4  # ties at the top
    labels = torch.randint(0, C, (B,), generator=gen)
    dev = device_of(backend)
    S, s = modality_scores(logits.to(dev), labels.to(dev), backend=backend)
    S_ref, s_ref = modality_scores_reference(logits, labels)
    assert torch.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()
    close(s, s_ref, atol=1e-6)
    close(S, S_ref, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["bool_B", "float_MB", "one_modality_empty"])
def test_scores_with_masks(gen, backend, mask_kind):
    M, B, C = 3, 33, 7
    logits, labels = random_case(gen, M, B, C)
    if mask_kind == "bool_B":
        mask = torch.rand(B, generator=gen) < 0.6
    elif mask_kind == "float_MB":
        mask = torch.rand(M, B, generator=gen) * (torch.rand(M, B, generator=gen) < 0.7)
    else:
        mask = torch.ones(M, B, dtype=torch.bool)
        mask[1] = False
    dev = device_of(backend)
    S, s = modality_scores(logits.to(dev), labels.to(dev), mask.to(dev), backend=backend)
    S_ref, s_ref = modality_scores_reference(logits, labels, mask)
    close(S, S_ref)
    close(s, s_ref)  # per-sample scores are reported for every sample
    if mask_kind == "one_modality_empty":
        assert float(S[1]) == 0.0


def random_scores(gen, M):
    S = torch.rand(M, generator=gen) * 50 + 0.01
    if M >= 3:
        S[2] = S[1]  # equal scores: rho of a tie
    return S


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("kind", ["ratio", "difference"])
def test_discrepancy_ratio_matches_reference(gen, backend, M, kind):
    S = random_scores(gen, M)
    rho = discrepancy_ratio(S.to(device_of(backend)), kind, backend=backend)
    close(rho, discrepancy_ratio_reference(S, kind), rtol=1e-5, atol=1e-5)


def test_two_modality_ratio_is_the_papers_ratio():
    S = torch.tensor([30.0, 12.0])
    assert torch.allclose(discrepancy_ratio(S), torch.tensor([30 / 12, 12 / 30]))
    assert torch.allclose(discrepancy_ratio(S, "difference"), torch.tensor([18.0, -18.0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["paper", "reference", "star"])
@pytest.mark.parametrize("z", ["tanh", "sigmoid"])
def test_ogm_coefficients_match_reference(gen, backend, form, z):
    rho = torch.cat([torch.rand(6, generator=gen) * 4, torch.tensor([1.0, 0.0, 1e6, float("nan")])])
    alpha = float(torch.rand((), generator=gen)) * 3
    k = ogm_coefficients(rho.to(device_of(backend)), alpha, form, z, backend=backend)
    ref = ogm_coefficients_reference(rho, alpha, form, z)
    close(k, ref)
    assert float(k[6]) == 1.0 and float(k[9]) == 1.0  # rho == 1 and NaN: untouched
    if form != "star":
        assert (k >= 0).all() and (k <= 1).all()


def test_ogm_reference_form_is_the_public_code():
    # The CVPR code: coeff = 1 - tanh(alpha * relu(ratio)) for the dominant modality, 1 for the other.
    S = torch.tensor([20.0, 8.0])
    k = ogm_coefficients(discrepancy_ratio(S), 0.8, form="reference")
    assert torch.allclose(k, torch.tensor([1 - math.tanh(0.8 * 2.5), 1.0]))
    k = ogm_coefficients(discrepancy_ratio(S), 0.8, form="paper")
    assert torch.allclose(k, torch.tensor([1 - 0.8 * math.tanh(1.5), 1.0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("z", ["tanh", "sigmoid"])
def test_opm_drop_probabilities_match_reference(gen, backend, z):
    rho = torch.cat([torch.rand(6, generator=gen) * 4, torch.tensor([1.0, 0.5, 1e6, float("nan")])])
    q_base, lam = float(torch.rand((), generator=gen)), float(torch.rand((), generator=gen)) * 4
    q = opm_drop_probabilities(rho.to(device_of(backend)), q_base, lam, z, backend=backend)
    close(q, opm_drop_probabilities_reference(rho, q_base, lam, z))
    assert (q >= 0).all() and (q <= 1).all() and float(q[6]) == 0.0 and float(q[9]) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,form,z", [("ratio", "paper", "tanh"), ("difference", "reference", "sigmoid"),
                                         ("ratio", "star", "sigmoid")])
def test_balance_stats_equals_the_parts(gen, backend, kind, form, z):
    M = int(torch.randint(2, 5, (), generator=gen))
    logits, labels = random_case(gen, M, 48, 12)
    mask = torch.rand(48, generator=gen) < 0.8
    dev = device_of(backend)
    alpha, q_base, lam = 0.7, 0.4, 0.9
    st = balance_stats(logits.to(dev), labels.to(dev), mask.to(dev), kind=kind, alpha=alpha, form=form, z=z,
                       q_base=q_base, lam=lam, backend=backend)
    S_ref, s_ref = modality_scores_reference(logits, labels, mask)
    rho_ref = discrepancy_ratio_reference(S_ref, kind)
    close(st.scores, S_ref)
    close(st.sample_scores, s_ref)
    close(st.ratio, rho_ref, atol=1e-5)
    close(st.coeffs, ogm_coefficients_reference(st.ratio.cpu(), alpha, form, z))
    close(st.drop_probs, opm_drop_probabilities_reference(st.ratio.cpu(), q_base, lam, z))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,form,z", [("ratio", "paper", "tanh"), ("difference", "reference", "sigmoid"),
                                         ("ratio", "star", "tanh")])
def test_balance_coefficients_from_scores(gen, backend, kind, form, z):
    """Stage 2 alone, from S: against the references; and balance_stats with a score reducer
    (a distributed run's all-reduce) equals the coefficients of the reduced scores."""
    M = int(torch.randint(2, 5, (), generator=gen))
    S = torch.rand(M, generator=gen) * 30 + 0.5
    dev = device_of(backend)
    alpha, q_base, lam = 0.6, 0.3, 0.8
    out = balance_coefficients(S.to(dev), kind=kind, alpha=alpha, form=form, z=z, q_base=q_base, lam=lam,
                               backend=backend)
    rho_ref = discrepancy_ratio_reference(S.double(), kind)
    close(out.scores, S)
    close(out.ratio, rho_ref, atol=1e-5)
    close(out.coeffs, ogm_coefficients_reference(rho_ref, alpha, form, z), atol=1e-6)
    close(out.drop_probs, opm_drop_probabilities_reference(rho_ref, q_base, lam, z), atol=1e-6)

    logits, labels = random_case(gen, M, 24, 7)
    other = torch.rand(M, generator=gen) * 10  # the other ranks' score sums
    st = balance_stats(logits.to(dev), labels.to(dev), kind=kind, alpha=alpha, form=form, z=z, q_base=q_base, lam=lam,
                       reduce_scores=lambda local: local + other.to(dev), backend=backend)
    S_local, _ = modality_scores_reference(logits, labels)
    expected = balance_coefficients(S_local.float().to(dev) + other.to(dev), kind=kind, alpha=alpha, form=form, z=z,
                                    q_base=q_base, lam=lam, backend="torch")
    for a, b in zip((st.scores, st.ratio, st.coeffs, st.drop_probs), expected):
        close(a, b.cpu(), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_scores_modulate_nothing(backend):
    dev = device_of(backend)
    k = ogm_coefficients(discrepancy_ratio(torch.zeros(2, device=dev), backend=backend), 0.8, backend=backend)
    q = opm_drop_probabilities(discrepancy_ratio(torch.zeros(3, device=dev), backend=backend), backend=backend)
    assert torch.equal(k.cpu(), torch.ones(2)) and torch.equal(q.cpu(), torch.zeros(3))


def test_scores_are_measurements_outside_autograd(gen):
    logits, labels = random_case(gen, 2, 8, 5)
    logits.requires_grad_(True)
    st = balance_stats(logits, labels)
    assert not any(t.requires_grad for t in st)


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_label_out_of_range_is_named(backend):
    dev = device_of(backend)
    logits = torch.randn(2, 4, 3, device=dev)
    with pytest.raises(ValueError, match=r"labels\[2\] = 3 is out of range \[0, 3\)"):
        modality_scores(logits, torch.tensor([0, 1, 3, 2], device=dev), backend=backend)
    with pytest.raises(ValueError, match=r"labels\[0\] = -1"):
        balance_stats(logits, torch.tensor([-1, 1, 0, 2], device=dev), backend=backend)


@pytest.mark.parametrize("call,error,needle", [
    (lambda: modality_scores(torch.randn(1, 4, 3), torch.zeros(4, dtype=torch.long)), ValueError, "at least 2 modalities"),
    (lambda: modality_scores(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), ValueError, r"shape \[M, B, C\]"),
    (lambda: modality_scores(torch.randn(2, 4, 3), torch.zeros(5, dtype=torch.long)), ValueError, "labels must have shape"),
    (lambda: modality_scores(torch.randn(2, 4, 3), torch.zeros(4)), TypeError, "labels must be an integer"),
    (lambda: modality_scores(torch.zeros(2, 4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long)), TypeError, "floating"),
    (lambda: modality_scores(torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.long), torch.ones(3)), ValueError, "mask must have shape"),
    (lambda: modality_scores(torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)), TypeError, "mask must be bool"),
    (lambda: discrepancy_ratio(torch.ones(1)), ValueError, "at least 2"),
    (lambda: discrepancy_ratio(torch.ones(2), "log"), ValueError, "kind must be one of"),
    (lambda: ogm_coefficients(torch.ones(2), 0.5, form="fancy"), ValueError, "form must be one of"),
    (lambda: ogm_coefficients(torch.ones(2), -0.5), ValueError, "alpha must be >= 0"),
    (lambda: ogm_coefficients(torch.ones(2), float("nan")), ValueError, "alpha must be a finite"),
    (lambda: opm_drop_probabilities(torch.ones(2), q_base=1.5), ValueError, r"q_base must be \[0, 1\]"),
    (lambda: opm_drop_probabilities(torch.ones(2), z="relu"), ValueError, "z must be one of"),
    (lambda: balance_stats(torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.long), kind="difference", form="star"),
     ValueError, "needs kind='ratio'"),
    (lambda: balance_stats(torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.long), backend="cuda"), ValueError, "backend must be"),
    (lambda: discrepancy_ratio(torch.ones(2, device="meta"), backend="native"), ValueError, "backend=.native. has kernels for"),
    (lambda: balance_coefficients(torch.ones(1)), ValueError, "balance_coefficients: S must be 1-D with at least 2"),
    (lambda: balance_coefficients(torch.ones(2, dtype=torch.long)), TypeError, "S must be floating point"),
    (lambda: balance_coefficients(torch.ones(2), form="star", kind="difference"), ValueError, "needs kind='ratio'"),
    (lambda: balance_coefficients(torch.ones(2), lam=-1.0), ValueError, "lam must be >= 0"),
])
def test_bad_input_raises_clear_errors(call, error, needle):
    with pytest.raises(error, match=needle):
        call()


def test_forced_triton_without_gpu_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        modality_scores(torch.randn(2, 4, 3), torch.zeros(4, dtype=torch.long), backend="triton")


# --- GPU ----------------------------------------------------------------------------------------

@requires_cuda
def test_cuda_auto_backend_is_triton_and_does_not_synchronise(gen):
    from mmfast.dispatch import choose_backend

    assert choose_backend("balance_stats", torch.device("cuda")) == "triton"
    logits, labels = random_case(gen, 3, 256, 309)
    logits, labels = logits.cuda(), labels.cuda()
    balance_stats(logits, labels)  # compile first
    with no_device_sync("cuda"):
        st = balance_stats(logits, labels, alpha=0.5)
    ref = balance_stats(logits.cpu(), labels.cpu(), alpha=0.5)
    for a, b in zip(st, ref):
        close(a, b)


@pytest.mark.parametrize("isa", mmfast.build_info()["cpu_isas"])
def test_native_scores_on_every_cpu_isa(gen, use_cpu_isa, isa):
    use_cpu_isa(isa)
    logits, labels = random_case(gen, 3, 20, 300)
    logits[0, 1, 5] = float("-inf")  # a -inf logit is a zero probability, not a NaN
    logits[1, 2, 7] = float("nan")  # a NaN logit makes that sample's score NaN, as softmax does
    S, s = modality_scores(logits, labels, backend="native")
    S_ref, s_ref = modality_scores_reference(logits, labels)
    close(s, s_ref)
    assert torch.isfinite(s[0, 1]) and torch.isnan(s[1, 2])
