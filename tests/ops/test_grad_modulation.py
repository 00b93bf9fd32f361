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

from support import no_device_sync, requires_cuda

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


# --- memory layouts: any dense tensor, modulated where it lies ---------------------------------

def conv_model_grads(gen, memory_format):
    """The conv-weight gradients of a small CNN trained in `memory_format`."""
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    net = net.to(memory_format=memory_format)
    x = torch.randn(4, 3, 12, 12, generator=gen).to(memory_format=memory_format)
    torch.nn.functional.cross_entropy(net(x), torch.randint(0, 4, (4,), generator=gen)).backward()
    return [p.grad for p in net.parameters() if p.dim() == 4]


@pytest.mark.parametrize("noise", [True, False])
def test_channels_last_gradients_are_modulated_in_place(gen, noise):
    grads = conv_model_grads(gen, torch.channels_last)
    assert all(g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous() for g in grads)
    ref = [g.clone(memory_format=torch.preserve_format) for g in grads]
    before = [g.clone() for g in grads]
    pointers = [g.data_ptr() for g in grads]
    coeffs = torch.rand(2, generator=gen)
    seed, step = random_int(gen, 0, 2**62), random_int(gen, 0, 10**6)
    grad_modulate_(grads, coeffs, [0, 1], noise=noise, seed=seed, step=step)
    grad_modulate_reference_(ref, coeffs, [0, 1], noise=noise, seed=seed, step=step)
    assert [g.data_ptr() for g in grads] == pointers  # the gradients themselves, not copies
    assert all((g != b).any() for g, b in zip(grads, before))
    assert_close_to_reference(grads, ref, [float(g.double().std()) for g in before])
    if not noise:
        for g, r in zip(grads, ref):
            assert torch.equal(g, r)


def test_noise_follows_memory_order(gen):
    # The same values in two layouts get the same noise stream in memory order, so the
    # channels_last result, read in memory order, equals the contiguous result of the
    # memory-ordered values.
    g = torch.randn(6, 5, 4, 3, generator=gen).to(memory_format=torch.channels_last)
    in_memory_order = g.permute(0, 2, 3, 1).contiguous()
    grad_modulate_([g], torch.tensor([0.7]), [0], seed=5, step=3)
    grad_modulate_([in_memory_order], torch.tensor([0.7]), [0], seed=5, step=3)
    assert torch.equal(g.permute(0, 2, 3, 1), in_memory_order)


@pytest.mark.parametrize("make", [lambda t: t.reshape(30, 40).t(), lambda t: t.reshape(2, 3, 200).permute(2, 0, 1),
                                  lambda t: t.reshape(1, 1200)[:, :].transpose(0, 1),
                                  lambda t: t.reshape(6, 200).as_strided((6, 1, 200), (200, 7, 1))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_other_dense_layouts_match_reference(gen, make, dtype):
    g = make(torch.randn(1200, generator=gen).to(dtype))
    ref = g.clone(memory_format=torch.preserve_format)
    sd = float(g.double().std())
    grad_modulate_([g], torch.tensor([0.4]), [0], seed=9, step=1)
    grad_modulate_reference_([ref], torch.tensor([0.4]), [0], seed=9, step=1)
    assert_close_to_reference([g], [ref], [sd])


def test_non_dense_gradient_error_does_not_suggest_a_copy():
    with pytest.raises(ValueError, match="dense") as info:
        grad_modulate_([torch.randn(8, 8)[::2]], torch.ones(1), [0])
    assert "contiguous()" not in str(info.value)


# --- views of one buffer ------------------------------------------------------------------------

@pytest.mark.parametrize("views,pair", [
    (lambda f: [f[0:100], f[50:150]], (0, 1)),
    (lambda f: [f[50:150], f[0:100]], (0, 1)),
    (lambda f: [f[0:300], f[100:120]], (0, 1)),
    (lambda f: [f[0:300], f[310:320], f[100:120]], (0, 2)),  # overlaps the first, not its neighbour
    (lambda f: [f[300:400], f[0:300], f[290:291].view(1, 1)], (1, 2)),
    (lambda f: [f[0:200].view(10, 20)[:, :10].t().contiguous(), f[0:200].view(20, 10).t(), f[190:201]], (1, 2)),
])
def test_overlapping_gradients_are_refused(views, pair):
    flat = torch.randn(400)
    grads = views(flat)
    before = flat.clone()
    with pytest.raises(ValueError, match=rf"grads\[{pair[0]}\] and grads\[{pair[1]}\] overlap"):
        grad_modulate_(grads, torch.ones(1), [0] * len(grads))
    assert torch.equal(flat, before)


def test_disjoint_views_of_one_buffer_are_modulated(gen):
    flat = torch.randn(5000, generator=gen)
    views = [flat[0:1000], flat[1000:1003], flat[1003:4003].view(30, 100), flat[4003:5000]]
    refs = [v.clone() for v in views]
    coeffs = torch.rand(2, generator=gen)
    grad_modulate_(views, coeffs, [0, 1, 1, 0], seed=4, step=8)
    grad_modulate_reference_(refs, coeffs, [0, 1, 1, 0], seed=4, step=8)
    assert_close_to_reference(views, refs, [1.0] * 4)
    assert_close_to_reference([flat], [torch.cat([r.reshape(-1) for r in refs])], [1.0])


# --- the noise counter as a device tensor -------------------------------------------------------

def test_tensor_seed_and_step_give_the_int_result(gen):
    grads = random_grads(gen, [(64, 3, 3, 3), (2000,), (7,)], DTYPES)
    coeffs = torch.rand(2, generator=gen)
    seed, step = random_int(gen, 0, 2**62), random_int(gen, 0, 2**40)
    ints = [g.clone() for g in grads]
    grad_modulate_(ints, coeffs, [0, 1, 0], seed=seed, step=step)
    for seed_arg in (seed, torch.tensor(seed)):
        tensors = [g.clone() for g in grads]
        step_tensor = torch.tensor(step)
        grad_modulate_(tensors, coeffs, [0, 1, 0], seed=seed_arg, step=step_tensor)
        assert all(torch.equal(a, b) for a, b in zip(ints, tensors))
        assert int(step_tensor) == step  # read, not incremented


def test_increment_step_advances_the_counter_each_call(gen):
    grads = random_grads(gen, [(3000,)], [torch.float32])
    step = torch.tensor(random_int(gen, 0, 2**20))
    start = int(step)
    by_tensor, by_int = [grads[0].clone()], [grads[0].clone()]
    for i in range(3):
        grad_modulate_(by_tensor, torch.ones(1), [0], seed=2, step=step, increment_step=True)
        grad_modulate_(by_int, torch.ones(1), [0], seed=2, step=start + i)
        assert torch.equal(by_tensor[0], by_int[0])
        assert int(step) == start + i + 1
    # increment_step counts steps, with noise or without
    grad_modulate_(by_tensor, torch.ones(1), [0], noise=False, step=step, increment_step=True)
    assert int(step) == start + 4


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_compiles_once_and_matches_eager(gen, backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    def step_fn(grads, coeffs, step):
        grad_modulate_(grads, coeffs * 1.0, [0, 1], seed=7, step=step, increment_step=True)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled_fn = torch.compile(step_fn, backend=counter, fullgraph=True)
    start = conv_model_grads(gen, torch.channels_last)
    eager, compiled = [g.clone() for g in start], [g.clone() for g in start]
    eager_step, compiled_step = torch.tensor(0), torch.tensor(0)
    previous = [g.clone() for g in start]
    for i in range(20):
        coeffs = torch.rand(2, generator=gen) + 0.5  # changes the grads' scale as the run goes
        step_fn(eager, coeffs, eager_step)
        compiled_fn(compiled, coeffs, compiled_step)
        for a, b, p in zip(eager, compiled, previous):
            assert torch.equal(a, b), f"step {i}"
            noise = a.double() - coeffs[0 if a.shape[1] == 3 else 1].double() * p.double()
            assert noise.abs().max() > 0  # noise was drawn for step i
        previous = [g.clone() for g in eager]
    assert counter.frame_count == 1
    assert int(eager_step) == int(compiled_step) == 20


# --- autograd bookkeeping -----------------------------------------------------------------------

def test_written_tensors_bump_their_version_counters(gen):
    grads = random_grads(gen, [(10,), (20,)], [torch.float32])
    step = torch.tensor(0)
    before = [g._version for g in grads] + [step._version]
    grad_modulate_(grads, torch.ones(1), [0, 0], step=step, increment_step=True)
    assert [g._version for g in grads] + [step._version] == [v + 1 for v in before]
    out = torch.empty(5)
    v = out._version
    torch.ops.mmfast.gaussian_noise_(out, 1, 2, 3)
    assert out._version == v + 1


def _saved_then_modified(modify):
    p = torch.randn(10, requires_grad=True)
    g = p * 2
    y = (g ** 2).sum()  # saves g for backward
    with torch.no_grad():
        modify(g)
    return y


def test_tensor_saved_for_backward_then_modulated_raises_like_torch_inplace_ops():
    y = _saved_then_modified(lambda g: g.mul_(0.5))
    with pytest.raises(RuntimeError, match="modified by an inplace operation") as torch_error:
        y.backward()
    y = _saved_then_modified(lambda g: grad_modulate_([g], torch.tensor([0.5]), [0], noise=False))
    with pytest.raises(RuntimeError, match="modified by an inplace operation") as our_error:
        y.backward()
    assert str(our_error.value) == str(torch_error.value)


def test_tensor_requiring_grad_is_refused_while_grad_is_recorded():
    p = torch.randn(10, requires_grad=True)
    g = p * 2
    with pytest.raises(RuntimeError, match=r"grads\[1\] requires grad.*no derivative"):
        grad_modulate_([torch.randn(3), g], torch.ones(1), [0, 0])
    with pytest.raises(RuntimeError, match=r"grads\[0\] requires grad"):
        grad_modulate_([p], torch.ones(1), [0])
    assert p.grad is None


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
        ("grads[0]", ValueError, lambda: ([g(4, 6)[:, ::2]], c2, [0])),
        ("grads[0]", ValueError, lambda: ([g(4, 1).expand(4, 6)], c2, [0])),
        ("grads[0] and grads[2] overlap", ValueError, lambda: ([shared, g(3), shared], c2, [0, 1, 0])),
        ("grads must be a list", TypeError, lambda: (g(4), c2, [0])),
        ("modality_index must be a list", TypeError, lambda: ([g(4), g(4)], c2, np.array([0, 1]))),
        ("modality_index must be a list", TypeError, lambda: ([g(4)], c2, torch.tensor([0]))),
        ("modality_index[1]", TypeError, lambda: ([g(4), g(4)], c2, [0, True])),
        ("modality_index[0]", TypeError, lambda: ([g(4)], c2, [np.int64(0)])),
        ("modality_index[0]", TypeError, lambda: ([g(4)], c2, [0.0])),
        ("grads[0] is on cpu but coeffs is on meta", ValueError, lambda: ([g(4)], torch.ones(2, device="meta"), [0])),
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


@pytest.mark.parametrize("kwargs,error,needle", [
    (dict(step=-1), ValueError, "step"), (dict(eps=-1.0), ValueError, "eps"), (dict(eps=float("nan")), ValueError, "eps"),
    (dict(seed=1.5), TypeError, "seed must be a Python int"), (dict(step=2.0), TypeError, "step must be a Python int"),
    (dict(step=True), TypeError, "step must be a Python int"), (dict(seed=np.int64(3)), TypeError, "seed"),
    (dict(step=torch.tensor(1.0)), TypeError, "step as a tensor must be a 0-dim int64"),
    (dict(step=torch.tensor([1])), TypeError, "step as a tensor must be a 0-dim int64"),
    (dict(seed=torch.tensor(1, dtype=torch.int32)), TypeError, "seed as a tensor must be a 0-dim int64"),
    (dict(step=torch.tensor(-1)), ValueError, "step must be >= 0"),
    (dict(step=torch.tensor(1, device="meta")), ValueError, "step is on meta but the gradients are on cpu"),
    (dict(step=3, increment_step=True), ValueError, "increment_step=True needs step as a 0-dim int64 tensor"),
    (dict(noise=1), TypeError, "noise must be a bool"),
])
def test_bad_scalar_arguments(kwargs, error, needle):
    g = torch.randn(3)
    before = g.clone()
    with pytest.raises(error, match=needle):
        grad_modulate_([g], torch.ones(1), [0], **kwargs)
    assert torch.equal(g, before)


def test_meta_tensors_are_refused_by_the_op_itself():
    # torch would dispatch a call mixing meta and CPU tensors to the (no-op) meta kernel.
    with pytest.raises(ValueError, match=r"grads\[0\] is on cpu but coeffs is on meta"):
        torch.ops.mmfast.grad_modulate_([torch.randn(4)], torch.ones(1, device="meta"), [0])
    with pytest.raises(ValueError, match=r"step is on meta but the gradients are on cpu"):
        torch.ops.mmfast.grad_modulate_([torch.randn(4)], torch.ones(1), [0], step_tensor=torch.tensor(1, device="meta"))


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
    with no_device_sync("cuda"):
        grad_modulate_(grads, 1 - torch.tanh(scores), [0, 1, 0, 1], seed=1, step=1)
    assert torch.isfinite(torch.stack([g.float().std() for g in grads])).all()


@requires_cuda
def test_cuda_device_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"grads\[0\] is on cpu"):
        grad_modulate_([torch.randn(4)], torch.ones(1, device="cuda"), [0])


@requires_cuda
def test_cuda_channels_last_and_tensor_step_match_cpu(gen):
    grads = conv_model_grads(gen, torch.channels_last)
    coeffs = torch.rand(2, generator=gen)
    cpu = [g.clone(memory_format=torch.preserve_format) for g in grads]
    dev = [g.cuda() for g in grads]
    assert all(d.is_contiguous(memory_format=torch.channels_last) for d in dev)
    step = torch.tensor(12, device="cuda")
    grad_modulate_(cpu, coeffs, [0, 1], seed=3, step=12)
    grad_modulate_(dev, coeffs.cuda(), [0, 1], seed=torch.tensor(3, device="cuda"), step=step, increment_step=True)
    assert_close_to_reference([d.cpu() for d in dev], cpu, [float(g.double().std()) for g in grads])
    assert int(step) == 13


@requires_cuda
def test_cuda_graph_replays_draw_new_noise_each_step(gen):
    grads = [g.cuda() for g in random_grads(gen, [(64, 32, 3, 3), (5000,)], [torch.float32])]
    coeffs = torch.tensor([0.9, 0.6], device="cuda")
    step = torch.tensor(0, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
        grad_modulate_(grads, coeffs, [0, 1], seed=5, step=step, increment_step=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        grad_modulate_(grads, coeffs, [0, 1], seed=5, step=step, increment_step=True)
    # Capturing runs nothing: the counter still reads 1. Each replay is one eager call at that step.
    expected = [g.clone() for g in grads]
    for s in range(1, 4):
        graph.replay()
        grad_modulate_(expected, coeffs, [0, 1], seed=5, step=s)
        torch.cuda.synchronize()
        for a, b in zip(grads, expected):
            torch.testing.assert_close(a, b)
        assert int(step) == s + 1


@requires_cuda
def test_cuda_tensor_step_does_not_synchronise(gen):
    grads = [g.cuda() for g in random_grads(gen, [(256, 256, 3, 3)] * 2, [torch.float32])]
    step = torch.tensor(0, device="cuda")
    grad_modulate_(grads, torch.ones(2, device="cuda"), [0, 1], step=step, increment_step=True)  # plan cached
    with no_device_sync("cuda"):
        for _ in range(3):
            grad_modulate_(grads, torch.ones(2, device="cuda"), [0, 1], step=step, increment_step=True)
    assert int(step) == 4
