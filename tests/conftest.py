import os

import pytest
import torch


@pytest.fixture
def gen(request):
    """A torch.Generator with a fresh seed every run; the seed is printed when a test fails."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    request.node.user_properties.append(("torch_seed", seed))
    print(f"torch seed for {request.node.name}: {seed}")
    return g


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
