"""How the Triton kernels are launched: under the tensors' device, with 64-bit offsets and row
blocks on the grid axis that has room for them. Runs the kernels under Triton's interpreter on
the CPU (conftest sets TRITON_INTERPRET=1 without a GPU)."""
import contextlib

import pytest
import torch

import mmfast.kernels
from support import TRITON_DEVICE
from mmfast.dispatch import triton_available
from mmfast.ops import modality_scores_reference

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")


def test_on_device_makes_the_tensors_cuda_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_cuda_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_cuda_device)
    with mmfast.kernels.on_device(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    with mmfast.kernels.on_device(torch.device("cpu")):  # nothing to make current on the CPU
        pass
    assert entered == [torch.device("cuda", 1)]


class RecordingKernel:
    """Stands in for a @triton.jit kernel: records the grid and which on_device context (if
    any) was active when it was launched."""

    def __init__(self, active):
        self.active = active
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append({"grid": tuple(grid), "device": self.active[-1] if self.active else None})
        return launch


@pytest.fixture
def recorded(monkeypatch):
    """Replaces both kernels by recorders and on_device by a context that notes its device."""
    from mmfast.kernels import balance_coefficients as bc_module
    from mmfast.kernels import modality_scores as ms_module

    active = []

    @contextlib.contextmanager
    def noting_on_device(device):
        active.append(torch.device(device))
        try:
            yield
        finally:
            active.pop()

    kernels = {"scores": RecordingKernel(active), "coefficients": RecordingKernel(active)}
    for module in (ms_module, bc_module):
        monkeypatch.setattr(module, "on_device", noting_on_device)
    monkeypatch.setattr(ms_module, "_modality_scores_kernel", kernels["scores"])
    monkeypatch.setattr(bc_module, "_balance_coefficients_kernel", kernels["coefficients"])
    return ms_module, bc_module, kernels


def test_every_launch_runs_under_the_tensors_device(recorded):
    ms_module, bc_module, kernels = recorded
    logits = torch.randn(3, 200, 7)
    labels = torch.randint(0, 7, (200,))
    _, partial = ms_module.modality_scores(logits, labels, None)
    bc_module.balance_coefficients(partial, input_is_rho=False, kind=0, form=0, z=0, alpha=0.5, q_base=0.5, lam=0.5)
    assert [launch["device"] for k in kernels.values() for launch in k.launches] == [logits.device] * 2


def test_row_blocks_are_on_grid_axis_0(recorded):
    # Grid axes 1 and 2 hold at most 65,535 blocks; axis 0 holds 2^31 - 1, so the rows go there.
    ms_module, _, kernels = recorded
    M, B, C = 3, 1000, 5
    ms_module.modality_scores(torch.randn(M, B, C), torch.randint(0, C, (B,)), None)
    block_b, _ = ms_module.block_sizes(C)
    assert kernels["scores"].launches[0]["grid"] == (-(-B // block_b), M)


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="the address-space trick is for the interpreter on the CPU")
def test_scores_kernel_offsets_are_64_bit(gen):
    # Modality m's rows start at m * stride_m elements: with stride_m just above 2^30, the last
    # modality starts past 2^31, where 32-bit offset arithmetic wraps (stride_m itself still fits
    # 32 bits, so Triton passes it as i32). The buffer is 4 GiB of float16 address space of which
    # only the three small row regions are ever touched.
    M, B, C = 3, 5, 4
    stride_m = (1 << 30) + 1024
    storage = torch.empty(2 * stride_m + B * C, dtype=torch.float16)
    logits = storage.as_strided((M, B, C), (stride_m, C, 1))
    logits.copy_(3 * torch.randn(M, B, C, generator=gen))
    labels = torch.randint(0, C, (B,), generator=gen)
    mask = torch.rand(M, B, generator=gen)

    from mmfast.kernels.modality_scores import modality_scores as scores_kernel

    s, partial = scores_kernel(logits, labels, mask)
    S_ref, s_ref = modality_scores_reference(logits, labels, mask)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(partial.sum(dim=1).double(), S_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_scores_on_a_gpu_that_is_not_current(gen):
    from mmfast.ops import balance_stats

    logits = torch.randn(2, 64, 6, generator=gen)
    labels = torch.randint(0, 6, (64,), generator=gen)
    expected = balance_stats(logits, labels, backend="torch")
    with torch.cuda.device(0):
        got = balance_stats(logits.to("cuda:1"), labels.to("cuda:1"))
    assert got.coeffs.device == torch.device("cuda", 1)
    torch.testing.assert_close(got.coeffs.cpu(), expected.coeffs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.scores.cpu(), expected.scores, rtol=1e-5, atol=1e-6)
