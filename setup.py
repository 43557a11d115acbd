"""Builds aanet_kernels._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build
and a CUDA toolkit is found (decided without a GPU, so the CUDA code compiles on any machine).

Environment:
  AANET_KERNELS_SKIP_CUDA=1   build the CPU kernels only
  TORCH_CUDA_ARCH_LIST        GPU archs to compile for (default "8.0;9.0": Ampere and Hopper)
  AANET_KERNELS_PORTABLE=1    no -march=native for the CPU kernels (for binaries run elsewhere)
  AANET_KERNELS_SANITIZE=1    build the C++ CPU code with AddressSanitizer and UBSan
  AANET_KERNELS_NO_EXTENSION=1  install the Python packages only (the Makefile builds the
                              extension in place itself, incrementally, with build_ext --inplace)
  MAX_JOBS                    parallel compile jobs (ninja)
"""

from __future__ import annotations

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _with_cuda() -> bool:
    if _flag("AANET_KERNELS_SKIP_CUDA"):
        return False
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    _check_toolkit_root(CUDA_HOME)
    return True


def _check_toolkit_root(cuda_home: str) -> None:
    """Fail before compiling when CUDA_HOME is not a toolkit root.

    Without CUDA_HOME, torch takes the folder above the `nvcc` on PATH, which is wrong where that
    nvcc is a wrapper (/usr/local/bin/nvcc): the build would stop deep inside ninja at a missing
    cuda_runtime_api.h.
    """
    header = os.path.join(cuda_home, "include", "cuda_runtime_api.h")
    if not os.path.isfile(header):
        raise SystemExit(
            f"setup.py: CUDA_HOME={cuda_home!r} is not a CUDA toolkit root (no {header}). Set "
            "CUDA_HOME to the folder holding include/ and lib64/ (e.g. /usr/local/cuda), or "
            "AANET_KERNELS_SKIP_CUDA=1 to build the CPU kernels only."
        )


def _write_build_info(with_cuda: bool) -> None:
    """Record what the extension is built against, for the load-failure message."""
    path = os.path.join(ROOT, "aanet_kernels", "_build_info.py")
    with open(path, "w") as handle:
        handle.write(
            "# Written by setup.py at build time.\n"
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"CUDA_VERSION = {torch.version.cuda if with_cuda else None!r}\n"
        )


def _extension():
    with_cuda = _with_cuda()
    _write_build_info(with_cuda)
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    if not _flag("AANET_KERNELS_PORTABLE"):
        cxx.append("-march=native")
    if _flag("AANET_KERNELS_SANITIZE"):
        cxx = [f for f in cxx if f != "-O3"] + [
            "-O1",
            "-g",
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
        ]
        link.append("-fsanitize=address,undefined")
    if not with_cuda:
        return CppExtension(
            "aanet_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
            py_limited_api=True,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    nvcc = [
        "-O3",
        "-lineinfo",
        "--expt-relaxed-constexpr",
    ]
    return CUDAExtension(
        "aanet_kernels._C",
        sources,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
        py_limited_api=True,
    )


setup(
    license="BSD-3-Clause",  # see pyproject.toml: dynamic
    packages=find_packages(include=["aanet_kernels*", "aanet*"]),
    ext_modules=[] if _flag("AANET_KERNELS_NO_EXTENSION") else [_extension()],
    cmdclass={"build_ext": BuildExtension},
    # The stable ABI of the oldest Python supported: torch compiles a py_limited_api extension
    # with Py_LIMITED_API=0x030A0000 (3.10), as pyproject's requires-python says.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
