"""mmfast: a fast training engine for balanced multimodal learning.

Import torch before the native extension: mmfast._C links against libtorch/libc10, which
`import torch` loads.
"""
import torch  # noqa: F401  (must precede the extension)

from . import _C  # noqa: E402
from . import methods, ops  # noqa: E402
from .methods import Balancer  # noqa: E402

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """How mmfast._C was built: ``cuda`` (bool), ``cuda_arch_list``, ``cpu_isa`` (the noise
    generator picked for this CPU), ``cpu_isas``, ``num_threads``, ``torch_version``, ..."""
    return _C.build_info()


__all__ = ["Balancer", "build_info", "methods", "ops", "__version__"]
