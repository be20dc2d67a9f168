"""Build dit_fast: the Python packages, and the C++/CUDA extension dit_fast._C when it can be built.

The extension is a CUDAExtension when torch is a CUDA build and nvcc is found, a CppExtension
(CPU kernels only) otherwise; DIT_FAST_SKIP_EXT=1 skips it. Build against the installed torch:
    pip install --no-build-isolation -e .
"""
import glob
import os
import sys

from setuptools import setup


def extension_kwargs():
    if os.environ.get("DIT_FAST_SKIP_EXT") == "1":
        return {}
    sources_cpp = sorted(glob.glob("csrc/*.cpp"))
    if not sources_cpp:
        return {}
    from torch.utils import cpp_extension

    sources_cu = sorted(glob.glob("csrc/*.cu"))
    with_cuda = bool(sources_cu) and _torch_has_cuda() and _nvcc_found(cpp_extension)
    # at::parallel_for is OpenMP code inlined from ATen's headers: without -fopenmp it runs on one
    # thread. libgomp resolves at run time to the copy torch has already loaded.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++17, C++20 from 2.10).
    cxx = ["-O3"] + openmp
    common = {
        "depends": sorted(glob.glob("csrc/*.h") + glob.glob("csrc/*.inc")),
        "extra_link_args": openmp,
    }
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        ext = cpp_extension.CUDAExtension(
            "dit_fast._C",
            sources_cpp + sources_cu,
            define_macros=[("DIT_FAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            **common,
        )
    else:
        ext = cpp_extension.CppExtension("dit_fast._C", sources_cpp, extra_compile_args={"cxx": cxx}, **common)
    os.environ.setdefault("MAX_JOBS", str(_max_jobs()))
    return {
        "ext_modules": [ext],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    }


def _torch_has_cuda():
    import torch

    return torch.version.cuda is not None


def _nvcc_found(cpp_extension):
    home = cpp_extension.CUDA_HOME
    return home is not None and os.path.exists(os.path.join(home, "bin", "nvcc"))


def _max_jobs():
    # nvcc and template-heavy C++ take ~2-3 GB per job; never more jobs than memory allows.
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        by_mem = max(1, avail_kb // (3 * 1024 * 1024))
    except (OSError, StopIteration, ValueError):
        by_mem = 1
    return max(1, min(os.cpu_count() or 1, by_mem))


setup(
    packages=["dit_fast", "dit_fast.ops", "dit_fast.bench", "dit_fast.diffusion", "dit_fast.transport",
              "dit_fast.kernels"],
    package_dir={"dit_fast.kernels": "kernels"},
    **extension_kwargs(),
)
