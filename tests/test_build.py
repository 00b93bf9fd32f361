"""The package installs, imports from anywhere, and reports how its extension was built."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import mmfast

def test_build_info_fields():
    info = mmfast.build_info()
    assert isinstance(info["cuda"], bool)
    assert info["version"] == mmfast.__version__
    assert info["cpu_isa"] in info["cpu_isas"]
    assert "generic" in info["cpu_isas"]
    assert info["num_threads"] == torch.get_num_threads()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    if info["cuda"]:
        assert info["cuda_arch_list"]


def test_cuda_kernels_compiled_whenever_possible():
    # CI has nvcc and the CUDA build of torch but no GPU: the CUDA sources must still be built.
    if os.environ.get("MMFAST_WITH_CUDA") == "0":
        return
    nvcc = shutil.which("nvcc") or (Path("/usr/local/cuda/bin/nvcc").exists() or None)
    if torch.version.cuda is not None and nvcc:
        assert mmfast.build_info()["cuda"], "torch has CUDA and nvcc exists, but the CUDA kernels were not built"


def test_ops_are_registered_custom_ops():
    schema = str(torch.ops.mmfast.grad_modulate_.default._schema)
    assert "Tensor(a!)[] grads" in schema
    assert torch.ops.mmfast.gaussian_noise_.default is not None


def test_import_from_another_directory(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import mmfast, mmfast.kernels, mmfast.ops; print(mmfast.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    init = Path(out.stdout.strip())
    assert init.name == "__init__.py" and init.parent.name == "mmfast"
    assert not init.resolve().is_relative_to(tmp_path.resolve())


def test_cli_info(tmp_path):
    exe = Path(sys.executable).parent / "mmfast"
    cmd = [str(exe), "info"] if exe.exists() else [sys.executable, "-m", "mmfast.cli", "info"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == mmfast.build_info()
