"""The package installs, imports from anywhere, and reports how its extension was built."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmfast
from mmfast import _cuda_arch

def test_build_info_fields():
    info = mmfast.build_info()
    assert isinstance(info["cuda"], bool)
    assert info["version"] == mmfast.__version__
    assert info["cpu_isa"] in info["cpu_isas"]
    assert "generic" in info["cpu_isas"]
    assert info["num_threads"] == torch.get_num_threads()
    assert info["torch_version"] == torch.__version__.split("+")[0]
    if info["cuda"]:
        assert info["cuda_arch_list"] and info["cuda_arch_source"] in ("env", "torch", "fallback")


def test_cuda_kernels_compiled_whenever_possible():
    # CI has nvcc and the CUDA build of torch but no GPU: the CUDA sources must still be built.
    if os.environ.get("MMFAST_WITH_CUDA") == "0":
        pytest.skip("MMFAST_WITH_CUDA=0: the CUDA kernels were switched off")
    nvcc = shutil.which("nvcc") or (Path("/usr/local/cuda/bin/nvcc").exists() or None)
    if torch.version.cuda is None or not nvcc:
        pytest.skip("needs a CUDA build of torch and nvcc")
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


# --- CUDA architectures -------------------------------------------------------------------------

def test_arch_flags_are_parsed_in_version_order():
    assert _cuda_arch.parse_arch_flags("sm_90 sm_75 sm_120 sm_100 sm_90a compute_120 sm_86") == [
        "7.5", "8.6", "9.0", "9.0a", "10.0", "12.0"]
    assert _cuda_arch.parse_arch_flags("") == []


def test_default_arch_list_follows_torch_then_the_fallback(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(_cuda_arch, "torch_arch_list", lambda: ["8.0", "9.0", "9.0a", "10.0"])
    assert _cuda_arch.default_arch_list() == ("8.0;9.0;9.0a;10.0+PTX", "torch")
    monkeypatch.setattr(_cuda_arch, "torch_arch_list", lambda: ["8.0", "9.0", "9.0a"])
    assert _cuda_arch.default_arch_list() == ("8.0;9.0+PTX;9.0a", "torch")  # PTX of a plain arch
    monkeypatch.setattr(_cuda_arch, "torch_arch_list", lambda: [])
    archs, source = _cuda_arch.default_arch_list()
    assert source == "fallback" and archs.endswith("+PTX")
    assert set(archs.replace("+PTX", "").split(";")) >= {"8.0", "8.6", "8.9", "9.0", "10.0", "12.0"}
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")
    assert _cuda_arch.default_arch_list() == ("8.9", "env")


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_torch_reports_its_arch_list_without_a_gpu():
    archs = _cuda_arch.torch_arch_list()
    assert archs and "9.0" in archs


def _cuobjdump():
    """cuobjdump as Triton ships it (no CUDA toolkit needed), else from PATH."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    return shutil.which("cuobjdump")


def test_extension_holds_code_for_every_listed_architecture():
    info = mmfast.build_info()
    if not info["cuda"]:
        pytest.skip("built without CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump")
    listing = subprocess.run([tool, "--list-elf", "--list-ptx", mmfast._C.__file__], capture_output=True,
                             text=True, check=True).stdout
    cubins = {tuple(line.rsplit(".", 2)[-2:]) for line in listing.splitlines() if line.startswith("ELF file")}
    ptx = {line.rsplit(".", 2)[-2] for line in listing.splitlines() if line.startswith("PTX file")}
    wanted = info["cuda_arch_list"].replace(";", " ").split()
    expected_sm = {"sm_" + a.replace("+PTX", "").replace(".", "") for a in wanted}
    assert {sm for sm, _ in cubins} == expected_sm, listing
    assert ptx == {"sm_" + a.replace("+PTX", "").replace(".", "") for a in wanted if a.endswith("+PTX")}, listing
    if info["cuda_arch_source"] == "torch":
        # Every GPU torch runs on gets a kernel image (the default since the A100/L4 report).
        assert {"sm_" + a.replace(".", "") for a in _cuda_arch.torch_arch_list()} <= expected_sm
