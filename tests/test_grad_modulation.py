"""mmfast.ops.grad_modulate_ against its slow reference, on fresh random inputs each run."""
import numpy as np
import pytest
import torch
from scipy import stats

import mmfast
from mmfast.ops import (
    gaussian_noise,
    gaussian_noise_reference,
    grad_modulate_,
    grad_modulate_reference_,
    philox4x32_10_reference,
)

from conftest import requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tolerances for "equal up to float rounding of the transform": a few float32 ulps of the noise
# plus one ulp of the destination dtype.
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def random_grads(gen, shapes, dtypes, scale=1.0):
    grads = []
    for i, shape in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        mean = torch.randn((), generator=gen) * scale
        grads.append((mean + scale * torch.randn(shape, generator=gen)).to(dtype))
    return grads


def random_int(gen, low, high):
    return int(torch.randint(low, high, (), generator=gen))


def assert_close_to_reference(out, ref, sd=None):
    for i, (a, b) in enumerate(zip(out, ref)):
        atol = 0.0 if sd is None else 1e-5 * sd[i]
        torch.testing.assert_close(a.float(), b.float(), rtol=RTOL[a.dtype], atol=atol, equal_nan=True,
                                   msg=lambda m: f"grads[{i}] ({a.dtype}, {tuple(a.shape)}): {m}")


# --- the noise stream ----------------------------------------------------------------------------

@pytest.mark.parametrize("counter,key,expected", [
    # Random123's published known-answer vectors for Philox4x32-10.
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_reference_philox_known_answers(counter, key, expected):
    assert tuple(int(x) for x in philox4x32_10_reference([counter], key)[0]) == expected


@pytest.mark.parametrize("isa", mmfast.build_info()["cpu_isas"])
def test_native_stream_matches_reference_on_every_isa(gen, use_cpu_isa, isa):
    use_cpu_isa(isa)
    for numel in (1, 255, 1024, 1025, 3000):
        seed = random_int(gen, 0, 2**62) * 3  # exercises both key words
        step = random_int(gen, 0, 2**40)
        position = random_int(gen, 0, 2**31)
        z = gaussian_noise(numel, seed=seed, step=step, position=position)
        ref = gaussian_noise_reference(numel, seed=seed, step=step, position=position)
        torch.testing.assert_close(z, ref, rtol=1e-5, atol=2e-6)


def test_stream_is_standard_normal(gen):
    seed, step = random_int(gen, 0, 2**31), random_int(gen, 0, 2**31)
    z = gaussian_noise(1 << 20, seed=seed, step=step, position=3).double().numpy()
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.std() - 1) < 5 * np.sqrt(0.5 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    # Consecutive elements and the four lanes of a counter are uncorrelated.
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 5 / np.sqrt(n)
    lanes = z[: (n // 1024) * 1024].reshape(-1, 4, 256)
    for a, b in ((0, 1), (0, 2), (1, 3)):
        assert abs(np.corrcoef(lanes[:, a].ravel(), lanes[:, b].ravel())[0, 1]) < 5 / np.sqrt(n / 4)


def test_streams_differ_by_seed_step_and_position(gen):
    seed, step = random_int(gen, 0, 2**31), random_int(gen, 0, 2**31)
    base = gaussian_noise(4096, seed=seed, step=step, position=0)
    for other in (dict(seed=seed + 1, step=step, position=0), dict(seed=seed, step=step + 1, position=0),
                  dict(seed=seed, step=step, position=1), dict(seed=seed + (1 << 32), step=step, position=0),
                  dict(seed=seed, step=step + (1 << 32), position=0)):
        z = gaussian_noise(4096, **other)
        assert (z != base).float().mean() > 0.99, other
        assert abs(np.corrcoef(z.numpy(), base.numpy())[0, 1]) < 0.1, other


# --- grad_modulate_ ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_free_is_exact(gen, dtype):
    shapes = [(64, 3, 7, 7), (17,), (5, 1000), (0,), (1,), (3, 3)]
    grads = random_grads(gen, shapes, [dtype])
    coeffs = torch.rand(3, generator=gen) * 1.5
    index = [random_int(gen, 0, 3) for _ in shapes]
    ref = [g.clone() for g in grads]
    grad_modulate_(grads, coeffs, index, noise=False)
    grad_modulate_reference_(ref, coeffs, index, noise=False)
    for a, b in zip(grads, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_noise_matches_reference(gen, dtype):
    shapes = [(32, 16, 3, 3), (2000,), (7, 7), (1025,), (1023,), (16384 + 5,)]
    grads = random_grads(gen, shapes, [dtype], scale=float(torch.rand((), generator=gen)) + 1e-3)
    coeffs = torch.rand(2, generator=gen)
    index = [random_int(gen, 0, 2) for _ in shapes]
    seed, step = random_int(gen, 0, 2**62), random_int(gen, 0, 10**6)
    ref = [g.clone() for g in grads]
    sd = [float(g.double().std()) for g in grads]
    grad_modulate_(grads, coeffs, index, seed=seed, step=step)
    grad_modulate_reference_(ref, coeffs, index, seed=seed, step=step)
    assert_close_to_reference(grads, ref, sd)


def test_mixed_dtypes_in_one_call(gen):
    shapes = [(300,), (40, 40), (5000,)]
    grads = random_grads(gen, shapes, DTYPES)
    coeffs = torch.rand(3, generator=gen)
    ref = [g.clone() for g in grads]
    sd = [float(g.double().std()) for g in grads]
    grad_modulate_(grads, coeffs, [2, 0, 1], seed=5, step=9)
    grad_modulate_reference_(ref, coeffs, [2, 0, 1], seed=5, step=9)
    assert_close_to_reference(grads, ref, sd)


def test_same_seed_and_step_is_bitwise_identical_and_other_steps_differ(gen):
    grads = random_grads(gen, [(128, 64, 3, 3), (1000,)], [torch.float32])
    coeffs = torch.tensor([0.3, 1.0])
    a, b, c = ([g.clone() for g in grads] for _ in range(3))
    grad_modulate_(a, coeffs, [0, 1], seed=11, step=4)
    grad_modulate_(b, coeffs, [0, 1], seed=11, step=4)
    grad_modulate_(c, coeffs, [0, 1], seed=11, step=5)
    for x, y, w in zip(a, b, c):
        assert torch.equal(x, y)
        assert (x != w).float().mean() > 0.99


def test_noise_has_mean_zero_and_std_of_the_gradient(gen):
    scale = float(torch.rand((), generator=gen)) * 10 + 0.01
    g = scale * torch.randn(1 << 20, generator=gen) + 3 * scale
    k = float(torch.rand((), generator=gen))
    out = g.clone()
    grad_modulate_([out], torch.tensor([k]), [0], seed=random_int(gen, 0, 2**31), step=1)
    sd = float(g.double().std()) + 1e-8
    noise = (out.double() - k * g.double()) / sd
    n = noise.numel()
    assert abs(float(noise.mean())) < 5 / np.sqrt(n)
    assert abs(float(noise.std()) - 1) < 5 * np.sqrt(0.5 / n)
    assert stats.kstest(noise.numpy(), "norm").pvalue > 1e-4


def test_results_do_not_depend_on_thread_count(gen):
    grads = random_grads(gen, [(64, 64, 3, 3), (256, 128, 3, 3), (10,)], [torch.float32, torch.bfloat16])
    coeffs = torch.rand(2, generator=gen)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = [g.clone() for g in grads]
            grad_modulate_(out, coeffs, [0, 1, 0], seed=3, step=8)
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("numel", [0, 1, 2, 3, 255, 1023, 1024, 1025, 16384, 16385])
def test_empty_and_tiny_tensors(gen, numel):
    grads = random_grads(gen, [(numel,), (numel, 1)], [torch.float32, torch.float16])
    coeffs = torch.rand(1, generator=gen)
    ref = [g.clone() for g in grads]
    grad_modulate_(grads, coeffs, [0, 0], seed=1, step=2)
    grad_modulate_reference_(ref, coeffs, [0, 0], seed=1, step=2)
    assert_close_to_reference(grads, ref, [1.0, 1.0])
    if numel == 1:  # std of one element is NaN in torch, so the noisy result is too
        assert all(torch.isnan(g).all() for g in grads)


def test_non_finite_gradient_only_poisons_its_own_tensor(gen):
    grads = random_grads(gen, [(100,), (100,), (100,), (50,)], [torch.float32])
    grads[0][17] = float("nan")
    grads[1][3] = float("inf")
    coeffs = torch.tensor([0.5, 0.9])
    ref = [g.clone() for g in grads]
    grad_modulate_(grads, coeffs, [0, 1, 0, 1], seed=2, step=3)
    grad_modulate_reference_(ref, coeffs, [0, 1, 0, 1], seed=2, step=3)
    assert torch.isnan(grads[0]).all() and torch.isnan(grads[1]).all()
    assert torch.isfinite(grads[2]).all() and torch.isfinite(grads[3]).all()
    assert_close_to_reference(grads, ref, [1.0] * 4)
    # Without noise the non-finite values are just scaled, like the plain formula.
    g = torch.tensor([1.0, float("inf"), float("nan"), -2.0])
    grad_modulate_([g], torch.tensor([0.5]), [0], noise=False)
    assert torch.equal(g[[0, 1, 3]], torch.tensor([0.5, float("inf"), -1.0])) and torch.isnan(g[2])


def test_torch_compile_traces_the_op(gen):
    grads = random_grads(gen, [(64, 3, 3, 3), (100,)], [torch.float32])
    scores = torch.rand(2, generator=gen) + 0.5

    def step_fn(grads, scores):
        coeffs = 1 - torch.tanh(0.5 * scores)  # a device-side coefficient, as the trainer makes it
        grad_modulate_(grads, coeffs, [0, 1], seed=7, step=1)

    eager = [g.clone() for g in grads]
    step_fn(eager, scores)
    compiled = [g.clone() for g in grads]
    torch.compile(step_fn, backend="aot_eager", fullgraph=True)(compiled, scores)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


# --- bad arguments -------------------------------------------------------------------------------

def _bad_call_cases():
    g = lambda *s: torch.randn(*s)  # noqa: E731
    c2 = torch.ones(2)
    shared = g(10)
    return [
        ("grads[1]", TypeError, lambda: ([g(4), g(4).double()], c2, [0, 1])),
        ("grads[0]", TypeError, lambda: ([torch.arange(4)], c2, [0])),
        ("coeffs", TypeError, lambda: ([g(4)], torch.ones(2, dtype=torch.float64), [0])),
        ("coeffs", TypeError, lambda: ([g(4)], [1.0, 1.0], [0])),
        ("coeffs", ValueError, lambda: ([g(4)], torch.ones(2, 2), [0])),
        ("coeffs", ValueError, lambda: ([g(4)], torch.ones(0), [0])),
        ("modality_index", ValueError, lambda: ([g(4), g(4)], c2, [0])),
        ("modality_index[1]", ValueError, lambda: ([g(4), g(4)], c2, [0, 2])),
        ("modality_index[0]", ValueError, lambda: ([g(4)], c2, [-1])),
        ("grads[0]", ValueError, lambda: ([g(4, 6).t()], c2, [0])),
        ("share memory", ValueError, lambda: ([shared, g(3), shared], c2, [0, 1, 0])),
        ("grads must be a list", TypeError, lambda: (g(4), c2, [0])),
    ]


@pytest.mark.parametrize("needle,error,make", _bad_call_cases())
def test_bad_arguments_raise_clear_errors_and_change_nothing(needle, error, make):
    grads, coeffs, index = make()
    before = [t.clone() for t in grads] if isinstance(grads, list) else None
    with pytest.raises(error, match=needle.replace("[", r"\[").replace("]", r"\]")):
        grad_modulate_(grads, coeffs, index)
    if before is not None:
        for t, b in zip(grads, before):
            assert torch.equal(t, b)


@pytest.mark.parametrize("kwargs,needle", [(dict(step=-1), "step"), (dict(eps=-1.0), "eps"),
                                           (dict(eps=float("nan")), "eps")])
def test_bad_scalar_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        grad_modulate_([torch.randn(3)], torch.ones(1), [0], **kwargs)


# --- CUDA (skipped without a GPU) ----------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(gen, dtype):
    shapes = [(64, 3, 7, 7), (128, 64, 3, 3), (1,), (0,), (1025,), (16384 * 3 + 7,)]
    grads = random_grads(gen, shapes, [dtype])
    coeffs = torch.rand(2, generator=gen)
    index = [i % 2 for i in range(len(shapes))]
    cpu = [g.clone() for g in grads]
    dev = [g.cuda() for g in grads]
    grad_modulate_(cpu, coeffs, index, seed=9, step=21)
    grad_modulate_(dev, coeffs.cuda(), index, seed=9, step=21)
    assert_close_to_reference([d.cpu() for d in dev], cpu, [float(g.double().std()) for g in grads])
    z = gaussian_noise(5000, seed=4, step=2, position=1, device="cuda").cpu()
    torch.testing.assert_close(z, gaussian_noise(5000, seed=4, step=2, position=1), rtol=1e-5, atol=2e-6)


@requires_cuda
def test_cuda_step_does_not_synchronise(gen):
    grads = [g.cuda() for g in random_grads(gen, [(256, 256, 3, 3)] * 4, [torch.float32])]
    scores = torch.rand(2, device="cuda") + 0.5
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grad_modulate_(grads, 1 - torch.tanh(scores), [0, 1, 0, 1], seed=1, step=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.stack([g.float().std() for g in grads])).all()


@requires_cuda
def test_cuda_device_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"grads\[0\] is on cpu"):
        grad_modulate_([torch.randn(4)], torch.ones(1, device="cuda"), [0])
