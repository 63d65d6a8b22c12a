"""Argument checks shared by the Python entry points, raising ValueError that names the argument
(the command line prints it as one line)."""
import numbers
import operator
from pathlib import Path
from typing import Optional, Union

import torch

MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_seed(seed: int, name: str = "seed") -> int:
    """``seed`` as the C++ side takes it, an unsigned 64-bit integer."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {seed}")
    return seed


def integer(value, name: str) -> int:
    """``value`` as an int (Python, NumPy or a 0-d tensor's); TypeError naming ``name`` when it
    is not one, where the binding would only list the signatures it accepts."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def real(value, name: str) -> float:
    """``value`` as a float (any real number, NumPy's included); TypeError naming ``name``."""
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def token_ids(values, name: str) -> list:
    """``values`` (an iterable of ints) as a list of ints; TypeError naming the first bad one."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a list of token ids (ints), got {type(values).__name__}")
    return [integer(v, f"{name}[{i}]") for i, v in enumerate(values)]


def model_dtype(dtype: Union[None, str, torch.dtype], name: str = "dtype") -> Optional[torch.dtype]:
    """``dtype`` as a torch.dtype: given as one, or by one of MODEL_DTYPES' names (None stays
    None). A torch.dtype the decoder does not support is named by the C++ side."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"{name} must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")
    return MODEL_DTYPES[dtype]


def output_dir(path, flag: str = "--out") -> Path:
    """``path`` as the directory results go to, refused up front (before the work whose results
    it would hold) when it names a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} must be a directory (made when absent), got the file {path}")
    return path


def distinct(items: list, flag: str) -> list:
    """``items`` (a comma-separated flag's values), refused when one comes twice: its rows would
    run twice."""
    twice = sorted({str(i) for i in items if items.count(i) > 1})
    if twice:
        raise ValueError(f"{flag} names {', '.join(twice)} more than once")
    return items
