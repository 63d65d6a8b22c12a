"""Argument checks shared by the Python entry points, raising ValueError that names the argument
(the command line prints it as one line)."""


def check_seed(seed: int, name: str = "seed") -> int:
    """``seed`` as the C++ side takes it, an unsigned 64-bit integer."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {seed}")
    return seed
