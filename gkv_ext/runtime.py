"""Switches between two implementations of the same result (csrc/switches.h), for A/B timing and
debugging in one process:

- ``chained_launch`` (on unless ``GKV_CHAINED_LAUNCH=0``): our kernels launched chained
  (programmatic dependent launch) rather than plainly.
- ``decode_linear`` (on unless ``GKV_DECODE_LINEAR=0``): the decoder's projections of at most 16
  rows (a decode step's) through ``gkv::decode_linear`` rather than ATen's linear (cuBLAS).
- ``tuned_linear`` (off unless ``GKV_TUNED_LINEAR=1``): the decoder's CUDA projections of one
  token in each of 17-1024 rows through the cuBLASLt algorithm timed fastest for their shape
  (``gkv_ext._C.tuned_linear``) rather than ATen's linear. Off by default because the pick is
  timed: two processes may pick differently and round differently.

A switch acts where it is read (a kernel launch, a projection); a CUDA graph keeps what was on when
it was captured::

    with gkv_ext.switches(decode_linear=False):
        out = gkv_ext.generate(model, prompts)
"""
import contextlib

from . import _C

__all__ = ["switch_on", "set_switch", "switches"]


def switch_on(name: str) -> bool:
    return _C.switch_on(name)


def set_switch(name: str, on: bool) -> None:
    _C.set_switch(name, bool(on))


@contextlib.contextmanager
def switches(**values: bool):
    """Sets the named switches for the block, then restores what they were."""
    before = {name: switch_on(name) for name in values}  # unknown names raise before any change
    try:
        for name, on in values.items():
            set_switch(name, on)
        yield
    finally:
        for name, on in before.items():
            set_switch(name, on)
