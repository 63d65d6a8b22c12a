"""Prints the path of the cuBLASLt library that the installed torch loads (the same major version
as torch's CUDA), or nothing when there is none. setup.py and CMakeLists.txt link gkv's
tuned_linear (csrc/ops/tuned_linear.cpp) against it; without it that path is left out."""
import glob
import os
import sys


def cublaslt_library():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return None
    major = torch.version.cuda.split(".")[0]
    # pip's nvidia wheels (nvidia/cu13/lib or nvidia/cublas/lib), then the toolkit's lib64.
    roots = [os.path.join(p, "nvidia") for p in sys.path if os.path.isdir(os.path.join(p, "nvidia"))]
    patterns = [os.path.join(r, "**", f"libcublasLt.so.{major}") for r in roots]
    if CUDA_HOME:
        patterns += [os.path.join(CUDA_HOME, d, f"libcublasLt.so.{major}") for d in ("lib64", "lib")]
    for pattern in patterns:
        found = sorted(glob.glob(pattern, recursive=True))
        if found:
            return found[0]
    return None


if __name__ == "__main__":
    print(cublaslt_library() or "")
