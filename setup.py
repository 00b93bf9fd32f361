"""Build script: drives CMake (CMakeLists.txt) to build the native extension mmfast._C.

Environment:
  MMFAST_WITH_CUDA=0|1   force the CUDA kernels off/on (default: on when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default: those of the installed torch's own build, PTX of the
                         newest; without that list 8.0;8.6;8.9;9.0;10.0;12.0+PTX; see mmfast/_cuda_arch.py)
  MMFAST_BUILD_JOBS      parallel compile jobs (default: number of CPUs)
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"


def find_cuda_root():
    """The CUDA toolkit root (holding bin/nvcc and include/cuda_runtime.h), or None.

    Looks at CUDA_HOME, CUDA_PATH, the folder above the nvcc on PATH, then /usr/local/cuda
    (an nvcc on PATH may be a wrapper script outside the toolkit it runs)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        if (Path(root) / "bin" / "nvcc").exists() and (Path(root) / "include" / "cuda_runtime.h").exists():
            return str(Path(root))
    return None


def want_cuda(cuda_root):
    import torch

    forced = os.environ.get("MMFAST_WITH_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            raise SystemExit(f"MMFAST_WITH_CUDA must be 0 or 1, got {forced!r}")
        if forced == "1" and (torch.version.cuda is None or cuda_root is None):
            raise SystemExit("MMFAST_WITH_CUDA=1 needs a CUDA build of torch and nvcc")
        return forced == "1"
    return torch.version.cuda is not None and cuda_root is not None


def load_cuda_arch_module():
    """mmfast/_cuda_arch.py, loaded from its path: the package itself is not importable yet."""
    spec = importlib.util.spec_from_file_location("mmfast_cuda_arch", ROOT / "mmfast" / "_cuda_arch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_tool(module, attr, exe):
    """A build tool from its pip package (the cmake/ninja build requirements), else from PATH."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr)) / exe
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which(exe)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        # A fixed build folder (not pip's temporary one) makes rebuilds incremental.
        build_temp = ROOT / "build" / f"cmake-py{sys.version_info[0]}{sys.version_info[1]}"
        build_temp.mkdir(parents=True, exist_ok=True)
        cuda_root = find_cuda_root()
        cuda = want_cuda(cuda_root)
        env = dict(os.environ)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DMMFAST_VERSION={VERSION}",
            f"-DMMFAST_WITH_CUDA={'ON' if cuda else 'OFF'}",
        ]
        cmake = find_tool("cmake", "CMAKE_BIN_DIR", "cmake")
        if cmake is None:
            raise SystemExit("mmfast: cmake >= 3.27 is required to build (pip install cmake)")
        ninja = find_tool("ninja", "BIN_DIR", "ninja")
        if ninja:
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = os.environ.get("MMFAST_BUILD_JOBS", str(os.cpu_count() or 1))
        if cuda:
            arch_list, arch_source = load_cuda_arch_module().default_arch_list()
            env["TORCH_CUDA_ARCH_LIST"] = arch_list
            nvcc = str(Path(cuda_root) / "bin" / "nvcc")
            # nvcc compiles the architectures of one .cu file in `jobs` threads.
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_root}",
                     f"-DCUDAToolkit_ROOT={cuda_root}", f"-DMMFAST_CUDA_ARCH_SOURCE={arch_source}",
                     f"-DMMFAST_NVCC_THREADS={jobs}"]
        print(f"mmfast: building with CUDA kernels: {cuda}"
              + (f" (nvcc {nvcc}, TORCH_CUDA_ARCH_LIST={arch_list} from {arch_source})" if cuda else ""))
        subprocess.run([cmake, str(ROOT), *args], cwd=build_temp, env=env, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_temp, env=env, check=True)


setup(
    name="mmfast",
    version=VERSION,
    description="Fast training engine for balanced multimodal learning",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mmfast", "mmfast.*"]) + ["mmfast.kernels"],
    package_dir={"mmfast.kernels": "kernels"},
    ext_modules=[CMakeExtension("mmfast._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=["torch>=2.4", "numpy", "pyyaml", "tqdm"],
    package_data={"mmfast": ["configs/*.yaml"]},
    extras_require={
        "data": ["nvidia-dali-cuda130", "librosa", "av", "soundfile", "pillow", "scikit-learn"],
        "test": ["pytest", "scipy"],
    },
    entry_points={"console_scripts": ["mmfast=mmfast.cli:main"]},
    zip_safe=False,
)
