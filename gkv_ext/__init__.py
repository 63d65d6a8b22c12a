"""gkv_ext: G-KV decoding-time KV-cache eviction for PyTorch.

Importing the package loads the compiled library, which registers the ``torch.ops.gkv`` ops;
``gkv_ext.ops`` has their typed wrappers, ``gkv_ext.policies`` the eviction policies, and
``generate`` / ``load_model`` the native engine, ``switches`` the A/B switches between two
implementations of a result (``gkv_ext.runtime``), ``gkv_ext.hf`` (imported on first use: it needs
transformers) compressed-cache generation for transformers models.
"""
import torch  # noqa: F401  (loads libtorch before our library)

from . import _C  # noqa: F401  (registers torch.ops.gkv.*)
from . import ops, policies
from ._C import CompressedKVCache, DecodeStepper, Model, ModelConfig, Policy, Tokenizer
from .engine import Generation, generate, load_model, teacher_forced
from .runtime import set_switch, switch_on, switches

built_with_cuda: bool = _C.built_with_cuda

__all__ = ["ops", "policies", "built_with_cuda", "Model", "ModelConfig", "Tokenizer", "Policy",
           "CompressedKVCache", "DecodeStepper", "Generation", "generate", "load_model",
           "teacher_forced", "switches", "switch_on", "set_switch"]


def __getattr__(name):
    if name == "hf":  # transformers is optional: import it only when asked for
        import importlib
        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'gkv_ext' has no attribute {name!r}")
