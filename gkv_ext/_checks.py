"""Argument checks shared by the Python entry points, raising ValueError that names the argument
(the command line prints it as one line)."""
from typing import Optional, Union

import torch

MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_seed(seed: int, name: str = "seed") -> int:
    """``seed`` as the C++ side takes it, an unsigned 64-bit integer."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {seed}")
    return seed


def model_dtype(dtype: Union[None, str, torch.dtype], name: str = "dtype") -> Optional[torch.dtype]:
    """``dtype`` as a torch.dtype: given as one, or by one of MODEL_DTYPES' names (None stays
    None). A torch.dtype the decoder does not support is named by the C++ side."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"{name} must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")
    return MODEL_DTYPES[dtype]
