"""Every op declared in csrc/torch_bindings.cpp has CPU, Meta and (when built) CUDA kernels, the
differentiable ones an Autograd kernel, and a test that calls it: adding an op without them fails
here."""
import re
from pathlib import Path

import pytest
import torch

import gkv_ext

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "csrc" / "torch_bindings.cpp"
OPS = re.findall(r'"(\w+)\(', SCHEMAS.read_text())
DIFFERENTIABLE = {"gather_tokens", "lifetime_attention", "rms_norm", "add_rms_norm",
                  "silu_mul", "apply_rope"}


def test_schemas_found():
    assert len(OPS) >= 8, OPS


@pytest.mark.parametrize("name", OPS)
def test_op_has_kernels(name):
    qualified = f"gkv::{name}"
    keys = ["CPU", "Meta"] + (["CUDA"] if gkv_ext.built_with_cuda else [])
    for key in keys:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key), (
            f"{qualified} has no {key} kernel")
    if name in DIFFERENTIABLE:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "Autograd"), (
            f"{qualified} has no Autograd kernel")


@pytest.mark.parametrize("name", OPS)
def test_op_has_a_test(name):
    tests = (ROOT / "tests" / "python").glob("test_*.py")
    pattern = re.compile(rf"\b(ops|gkv)\.{name}\b")
    assert any(pattern.search(p.read_text()) for p in tests if p.name != "test_registry.py"), (
        f"no test uses {name}")
