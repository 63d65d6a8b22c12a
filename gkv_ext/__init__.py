"""gkv_ext: G-KV decoding-time KV-cache eviction for PyTorch.

Importing the package loads the compiled library, which registers the ``torch.ops.gkv`` ops;
``gkv_ext.ops`` has their typed wrappers.
"""
import torch  # noqa: F401  (loads libtorch before our library)

from . import _C  # noqa: F401  (registers torch.ops.gkv.*)
from . import ops
from ._C import Model, ModelConfig, Tokenizer

built_with_cuda: bool = _C.built_with_cuda

__all__ = ["ops", "built_with_cuda", "Model", "ModelConfig", "Tokenizer"]
