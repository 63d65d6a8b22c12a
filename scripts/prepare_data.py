"""Token-id data files for gkv-train and `python -m gkv_ext eval` (format: csrc/tasks/tasks.h).

    python scripts/prepare_data.py --data gsm8k --tokenizer ../shared/tokenizers/qwen3 \\
        --splits train=2000,test=200 --chat-template --out data/gsm8k-qwen3
    python scripts/prepare_data.py --data synthetic --tokenizer char --synthetic-length 1024 \\
        --splits train=20000,test=256 --out data/synthetic-1k

Writes <out>/<split>.jsonl ({"prompt", "response", "answer", "answer_kind"} with token ids) and
<out>/vocab.json (each token id's bytes); with --tokenizer char also the character tokenizer in
<out>/tokenizer/ (transformers-loadable). Prompts get the tokenizer's special tokens (BOS, or the
chat template's user turn with --chat-template); responses are the worked solution (GSM8K
without its calculator notes) or the synthetic chain of thought, followed by the EOS token.
Sources: shared/data (DATA.md): gsm8k (train, test), math500 (test); synthetic makes any split,
with disjoint seeds.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

from tqdm import tqdm

from gkv_ext import tasks
from gkv_ext._checks import output_dir

DATA_SETS = ("gsm8k", "math500", "synthetic")


def parse_splits(text: str) -> List[Tuple[str, int]]:
    """'train=1000,test=200' -> [('train', 1000), ('test', 200)]; 'test' alone: all of it (-1)."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, count = item.partition("=")
        try:
            n = int(count) if count else -1
        except ValueError:
            n = 0
        if not name or (count and n < 1):
            raise ValueError(f"--splits: expected name=count with count >= 1 (or a bare name), "
                             f"got {item!r}")
        if any(name == seen for seen, _ in out):  # its file would be written twice
            raise ValueError(f"--splits: {name!r} is named twice")
        out.append((name, n))
    if not out:
        raise ValueError("--splits: empty")
    return out


def problems(data: str, split: str, count: int, first_seed: int,
             synthetic: tasks.SyntheticOptions) -> Tuple[Iterable[tasks.Problem], int]:
    """The split's first ``count`` problems (all when count < 0) and how many; synthetic ones are
    made lazily (the arguments checked here, before any progress bar starts)."""
    if data != "synthetic":
        rows = tasks.read_problems(data, split)
        rows = rows if count < 0 else rows[:count]
        return rows, len(rows)
    if count < 0:
        raise ValueError(f"--splits: synthetic split {split!r} needs a count (name=count)")
    def made():
        for seed in range(first_seed, first_seed + count):
            ex = tasks.make_example(seed, synthetic)
            yield tasks.Problem(ex["prompt"], ex["response"], ex["answer"], "exact")
    return made(), count


def encode(tokenizer, problem: tasks.Problem) -> Dict:
    response = tokenizer.encode(problem.solution, special=False)
    if tokenizer.eos_token_id is not None:
        response.append(tokenizer.eos_token_id)
    return {"prompt": tokenizer.encode(problem.question), "response": response,
            "answer": problem.answer, "answer_kind": problem.answer_kind}


def prepare(args) -> Dict[str, int]:
    """Writes the files; returns the examples written per split."""
    if args.data not in DATA_SETS:
        raise ValueError(f"--data must be one of {', '.join(DATA_SETS)}, got {args.data!r}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise ValueError(f"--max-prompt-tokens must be >= 1, got {args.max_prompt_tokens}")
    splits = parse_splits(args.splits)
    overrides = {k: getattr(args, k) for k in tasks.SYNTHETIC_FIELDS if getattr(args, k) is not None}
    if args.synthetic_length is not None and not 64 <= args.synthetic_length <= 65536:
        raise ValueError(f"--synthetic-length must be in [64, 65536], got {args.synthetic_length}")
    synthetic = tasks.synthetic_options(args.synthetic_length, **overrides)
    out = output_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_path = args.tokenizer
    if args.tokenizer == "char":
        tokenizer_path = tasks.save_char_tokenizer(out / "tokenizer")
    tokenizer = tasks.load_tokenizer(tokenizer_path, chat_template=args.chat_template)
    tasks.write_vocab(out / "vocab.json", tasks.token_bytes(tokenizer))

    sources, first_seed = [], args.seed
    for split, count in splits:  # every split checked before writing any
        sources.append((split, problems(args.data, split, count, first_seed, synthetic)))
        first_seed += max(count, 0)
    written = {}
    for split, (source, total) in sources:
        kept = dropped = 0
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for problem in tqdm(source, desc=split, unit="ex", total=total):
                record = encode(tokenizer, problem)
                if args.max_prompt_tokens and len(record["prompt"]) > args.max_prompt_tokens:
                    dropped += 1
                    continue
                f.write(json.dumps(record) + "\n")
                kept += 1
        written[split] = kept
        note = f" ({dropped} over --max-prompt-tokens left out)" if dropped else ""
        print(f"{out / (split + '.jsonl')}: {kept} examples{note}")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help=f"one of {', '.join(DATA_SETS)}")
    p.add_argument("--tokenizer", required=True,
                   help="a transformers tokenizer directory, a llama2.c .bin (stories260K), "
                        "or 'char' (the synthetic task's character tokenizer)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--splits", default="test",
                   help="name=count pairs, e.g. train=1000,test=200; a bare name takes all "
                        "(gsm8k: train, test; math500: test; synthetic: any name, with a count)")
    p.add_argument("--chat-template", action="store_true",
                   help="prompts as a user turn of the tokenizer's chat template")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="leave out examples with longer prompts")
    p.add_argument("--synthetic-length", type=int, default=1024,
                   help="synthetic: characters per example, prompt plus response (64..65536)")
    for name in tasks.SYNTHETIC_FIELDS:
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None,
                       help=f"synthetic: override the {name} that --synthetic-length chose")
    p.add_argument("--seed", type=int, default=0, help="synthetic: the first split's first seed")
    args = p.parse_args(argv)
    try:
        prepare(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
