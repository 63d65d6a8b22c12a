"""Tiny transformers models for tests: random weights of a visible size, and stories260K
converted to LlamaForCausalLM by our own save()."""
import torch
import transformers

import gkv_ext

from conftest import shared_dir

STORIES = shared_dir() / "models" / "stories260k"
STORIES_BIN = STORIES / "tinystories_260k_v1.bin"
STORIES_TOK = STORIES / "tok512.bin"
HAVE_STORIES = STORIES_BIN.exists() and STORIES_TOK.exists()

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=97,
             max_position_embeddings=256)


def random_hf(cls_name: str, extra: dict, dtype=torch.float32, seed: int = 0):
    """A transformers *ForCausalLM of config class ``cls_name`` (SMALL plus ``extra``). The
    default init (std 0.02, norms 1) would hide most mistakes: weights N(0, 0.15), norms
    U(0.5, 1.5)."""
    config = getattr(transformers, cls_name)(**SMALL, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0.0, 0.15)
    return model.to(dtype)


def stories_hf(out_dir):
    """stories260K as a transformers LlamaForCausalLM (our save() is the converter), and the
    checkpoint directory it was loaded from."""
    gkv_ext.load_model(STORIES_BIN).save(str(out_dir))
    return transformers.LlamaForCausalLM.from_pretrained(out_dir).eval(), out_dir
