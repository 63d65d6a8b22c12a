"""Builds gkv_ext._C from csrc/sources.txt (the list CMakeLists.txt also reads).

CUDA kernels are compiled when the installed torch has CUDA and nvcc is found; otherwise the
extension is CPU-only. GKV_CUDA_ARCHS (e.g. "80;90a") overrides the default target, sm_90a.
MAX_JOBS (default: all cores) sets ninja's parallelism.
"""
import os
import runpy
import shutil
import subprocess
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent.resolve()


def core_sources():
    lines = (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def cuda_available():
    return torch.version.cuda is not None and (
        CUDA_HOME is not None or shutil.which("nvcc") is not None)


def gencode_flags():
    archs = os.environ.get("GKV_CUDA_ARCHS", "90a").replace(",", ";").split(";")
    flags = []
    for arch in filter(None, (a.strip() for a in archs)):
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


# torch's libraries export the statically linked libstdc++ they were built with (std::filesystem,
# iostream internals). On a machine whose compiler is newer than torch's, calls from our library
# can bind to torch's older copies and crash (seen with torch 2.11 + g++ 13). Linking our own
# libstdc++ statically, with its symbols hidden, and binding our own (inline) definitions
# symbolically, ties every call to the copy we compiled against.
# The archive also goes in with the objects, ahead of LibTorch on the link line, so the linker
# resolves std::filesystem and iostream from it rather than from LibTorch's exports.
LINK_ARGS = ["-static-libstdc++", "-Wl,--exclude-libs,ALL", "-Wl,-Bsymbolic"]
LIBSTDCXX_A = subprocess.run([os.environ.get("CXX", "c++"), "-print-file-name=libstdc++.a"],
                             capture_output=True, text=True, check=True).stdout.strip()


def extension():
    with_cuda = cuda_available()
    sources = [s for s in core_sources() if with_cuda or not s.endswith(".cu")]
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "python").glob("*.cpp"))
    cxx = ["-O3", "-std=c++20"]
    include_dirs = [str(ROOT / "csrc")]
    if not with_cuda:
        print("gkv_ext: building CPU-only (torch has no CUDA or nvcc was not found)")
        return CppExtension("gkv_ext._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=LINK_ARGS,
                            extra_objects=[LIBSTDCXX_A])
    print(f"gkv_ext: building with CUDA {torch.version.cuda} for {gencode_flags()}")
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"] + gencode_flags()
    macros, objects = [("GKV_WITH_CUDA", "1")], [LIBSTDCXX_A]
    cublaslt = runpy.run_path(str(ROOT / "csrc" / "cublaslt_library.py"))["cublaslt_library"]()
    if cublaslt:  # linked by path: its soname is the one torch has already loaded
        macros.append(("GKV_WITH_CUBLASLT", "1"))
        objects.append(cublaslt)
    else:
        print("gkv_ext: no cuBLASLt library found; tuned_linear falls back to ATen's linear")
    return CUDAExtension("gkv_ext._C", sources, include_dirs=include_dirs, define_macros=macros,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=LINK_ARGS, extra_objects=objects)


os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

setup(
    packages=find_packages(include=["gkv_ext", "gkv_ext.*"]),
    package_data={"gkv_ext": ["data/bundled/*", "data/bundled/tokenizer/*"]},  # the demo's model
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
