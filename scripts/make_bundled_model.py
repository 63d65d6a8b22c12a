"""Re-creates the bundled model (gkv_ext/data/bundled): a small Qwen2 trained with `gkv-train sft`
on the synthetic long chain-of-thought task.

    python scripts/make_bundled_model.py --gkv-train build/gkv-train --export-step 6000

Steps, each skipped when its output exists in --work (so a killed run continues):
  1. data: scripts/prepare_data.py --data synthetic --tokenizer char (train and test splits);
  2. init: a randomly initialised Qwen2ForCausalLM (transformers) saved as a checkpoint dir;
  3. sft:  gkv-train sft with the config below (written to <work>/sft.json), resuming;
  4. the last checkpoint (or --export-step's) cast to bfloat16, written with its tokenizer to --out.

Needs transformers (the init and the tokenizer files) and a built gkv-train.
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gkv_ext import tasks  # noqa: E402
from gkv_ext.engine import load_model  # noqa: E402

# The default difficulty of the bundled task: examples of about 256 characters (= tokens), which
# options_for_length makes 26 shuffled definitions (two-letter names) and a chain of 4 lookups.
SYNTHETIC_LENGTH = 256
# Seeds 0.. train, the next ones the eval split. 100K examples: the run sees each about 10 times
# (20K examples were seen 40 times by the same run, enough for a model to start memorising).
TRAIN_EXAMPLES, EVAL_EXAMPLES = 100000, 256
# head_dim 64 (256 / 4) with 2 KV heads: GQA like the real reasoning models. 3 layers of 256 at
# lr 2e-3, batch 64: of six 8-minute runs sharing two H200s (2-4 layers, hidden 256-384, lr 5e-4 to
# 2e-3, and a variant of the task with one-letter names) it is the one that learned both lookups
# (99% FullKV accuracy at step 6000; every other run stayed below 15%). The vocabulary is padded
# to 80 rows (the character vocabulary has 48), as in that run.
MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=80, max_position_embeddings=512,
             rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
# About 7 minutes on one GPU (batch 64 of ~260 tokens). Accuracy jumps late: 8% at step 4000,
# 84% at 5000, 99% at 6000 (docs/results.md, section 1). The committed model is the step-6000
# checkpoint: the device's 8-minute call limit stopped its run at step 6900.
SFT = dict(steps=7000, batch_size=64, micro_batch_size=64, max_seq_len=320, lr=2e-3,
           warmup_steps=100, lr_schedule="cosine", min_lr_ratio=0.05, weight_decay=0.01,
           grad_clip=1.0, seed=0, log_every=100, save_every=1000, keep_checkpoints=2, resume=True,
           eval_every=1000, eval_samples=128, eval_max_new_tokens=96)


def prepare_data(work: Path) -> Path:
    data = work / "data"
    if not (data / "train.jsonl").is_file() or not (data / "test.jsonl").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"),
                        "--data", "synthetic", "--tokenizer", "char",
                        "--synthetic-length", str(SYNTHETIC_LENGTH),
                        "--splits", f"train={TRAIN_EXAMPLES},test={EVAL_EXAMPLES}",
                        "--out", str(data)], check=True)
    return data


def init_model(work: Path, seed: int, layers: int) -> Path:
    path = work / "init"
    if not (path / "config.json").is_file():
        import transformers
        if MODEL["vocab_size"] < len(tasks.CHAR_VOCABULARY):
            raise ValueError("MODEL vocab_size is smaller than the character vocabulary")
        torch.manual_seed(seed)
        config = transformers.Qwen2Config(**{**MODEL, "num_hidden_layers": layers})
        transformers.Qwen2ForCausalLM(config).save_pretrained(str(path))
    return path


def write_config(work: Path, data: Path, init: Path, overrides: dict) -> Path:
    config = {**SFT, **overrides, "model": str(init), "data": str(data / "train.jsonl"),
              "eval_data": str(data / "test.jsonl"), "out_dir": str(work / "sft")}
    config_path = work / "sft.json"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return config_path


def train(gkv_train: Path, work: Path, config_path: Path, export_step: int) -> Path:
    subprocess.run([str(gkv_train), "sft", "--config", str(config_path)], check=True)
    checkpoint = work / "sft" / f"step-{export_step:08d}"
    if not (checkpoint / "config.json").is_file():
        raise RuntimeError(f"gkv-train finished without writing {checkpoint}")
    return checkpoint


def export(checkpoint: Path, data: Path, out: Path) -> None:
    """bfloat16 weights (half the size of the trainer's fp32 master copy), the tokenizer (in
    tokenizer/), vocab.json and task.json: the task's difficulty and the eval split's seeds, from
    which gkv_ext.demo and `python -m gkv_ext eval --data synthetic` re-make the eval examples."""
    if out.exists():
        shutil.rmtree(out)
    model = load_model(checkpoint, dtype=torch.bfloat16)
    model.save(str(out))
    # In a subdirectory: beside config.json (model_type qwen2) transformers 5 loads it as a
    # Qwen2Tokenizer, which drops the newlines. gkv_ext.tasks.load_tokenizer looks there.
    shutil.copytree(data / "tokenizer", out / "tokenizer")
    shutil.copy(data / "vocab.json", out / "vocab.json")
    task = {"task": "synthetic", "synthetic_length": SYNTHETIC_LENGTH,
            "eval_seed": TRAIN_EXAMPLES, "eval_examples": EVAL_EXAMPLES}
    (out / "task.json").write_text(json.dumps(task, indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gkv-train", default=str(ROOT / "build" / "gkv-train"),
                   help="the gkv-train binary (default build/gkv-train)")
    p.add_argument("--work", default=str(ROOT / "out" / "bundled"),
                   help="data, init checkpoint and training run (default out/bundled)")
    p.add_argument("--out", default=str(ROOT / "gkv_ext" / "data" / "bundled"),
                   help="the exported model (default gkv_ext/data/bundled)")
    p.add_argument("--steps", type=int, default=SFT["steps"], help="sft steps")
    p.add_argument("--export-step", type=int, default=None,
                   help="export this checkpoint (a multiple of 1000) instead of the last; the "
                        "committed model is --export-step 6000 (see SFT)")
    p.add_argument("--batch-size", type=int, default=SFT["batch_size"], help="sft examples per step")
    p.add_argument("--lr", type=float, default=SFT["lr"], help="sft peak learning rate")
    p.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"], help="decoder layers")
    p.add_argument("--seed", type=int, default=0, help="the random init's seed")
    p.add_argument("--device", default="cuda", help="gkv-train's device: cuda or cpu (cuda)")
    p.add_argument("--prepare-only", action="store_true",
                   help="stop after writing the data, the init checkpoint and sft.json")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work)
    init = init_model(work, args.seed, args.layers)
    config = write_config(work, data, init, {
        "steps": args.steps, "batch_size": args.batch_size,
        "micro_batch_size": args.batch_size, "lr": args.lr, "device": args.device})
    if args.prepare_only:
        print(f"wrote {config}")
        return 0
    gkv_train = Path(args.gkv_train)
    if not gkv_train.is_file():
        print(f"error: --gkv-train {gkv_train} not found (build it: cmake --build build "
              "--target gkv-train)", file=sys.stderr)
        return 2
    checkpoint = train(gkv_train, work, config, args.export_step or args.steps)
    export(checkpoint, data, Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
