"""The demo: what G-KV buys on the bundled reasoning model, in a few minutes on a CPU.

``python -m gkv_ext demo [--budgets 64,128,192] [--limit 64] [--device cuda]``

The bundled model (gkv_ext/data/bundled, made by scripts/make_bundled_model.py) is a small Qwen2
trained on the synthetic long chain-of-thought task: each answer needs definitions from far back
in the prompt. The demo decodes the eval split greedily with FullKV, with G-KV at each budget and
(for contrast) StreamingLLM, and prints, per row:

    accuracy   answers right (the task's verifier), over the examples
    KV memory  bytes of the KV cache the engine allocated for one batch: kv_slots x layers x KV
               heads x head_dim x 2 (K and V) x dtype size x batch size
    tokens/s   generated tokens over the wall time of the generate calls

and writes demo.png (accuracy, KV memory and tokens/s against the budget) and demo.json to ``--out``.
"""
import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import policies, tasks
from ._checks import MODEL_DTYPES, distinct, model_dtype, output_dir
from .engine import generate, load_model

BUNDLED_MODEL = Path(__file__).resolve().parent / "data" / "bundled"


@dataclass
class Row:
    policy: str
    budget: Optional[int]
    accuracy: float
    kv_bytes: int      # one batch's cache, as allocated
    tokens_per_s: float
    tokens: int        # generated, stop tokens included


@dataclass
class EvalSplit:
    prompts: List[List[int]]
    answers: List[str]
    max_new_tokens: int  # the longest reference response, its stop token included


def eval_split(model_dir: Path, limit: int) -> EvalSplit:
    """The first ``limit`` examples of the model's eval split, re-made from task.json (the same
    token ids as scripts/prepare_data.py and ``python -m gkv_ext eval --data synthetic``)."""
    task_file = model_dir / "task.json"
    if not task_file.is_file():
        raise ValueError(f"--model: {task_file} not found (a model made by "
                         "scripts/make_bundled_model.py has one)")
    task = json.loads(task_file.read_text())
    if limit > task["eval_examples"]:
        raise ValueError(f"--limit must be <= {task['eval_examples']} (the eval split), got {limit}")
    options = tasks.synthetic_options(task["synthetic_length"])
    bos = tasks.CHAR_VOCABULARY.index(tasks.CHAR_SPECIAL_TOKENS["bos_token"])
    prompts, answers, longest = [], [], 0
    for seed in range(task["eval_seed"], task["eval_seed"] + limit):
        ex = tasks.make_example(seed, options)
        prompts.append([bos] + tasks.char_token_ids(ex["prompt"]))
        answers.append(ex["answer"])
        longest = max(longest, len(ex["response"]) + 1)
    return EvalSplit(prompts, answers, longest)


def decode(ids: List[int]) -> str:
    """The character tokenizer's text of generated ids (special tokens dropped)."""
    return "".join(tasks.CHAR_VOCABULARY[t] for t in ids
                   if t < len(tasks.CHAR_VOCABULARY) and not tasks.CHAR_VOCABULARY[t].startswith("<"))


def run_policy(model, split: EvalSplit, name: str, budget: Optional[int], policy: policies.Policy,
               batch_size: int, dtype: torch.dtype, progress) -> Row:
    config = model.config
    bytes_per_slot = (config.num_layers * config.num_kv_heads * config.head_dim * 2
                      * torch.empty((), dtype=dtype).element_size())
    correct = generated = kv_bytes = 0
    seconds = 0.0
    for start in range(0, len(split.prompts), batch_size):
        prompts = split.prompts[start:start + batch_size]
        began = time.perf_counter()
        gen = generate(model, prompts, policy=policy, max_new_tokens=split.max_new_tokens)
        seconds += time.perf_counter() - began
        for out, answer in zip(gen.sequences, split.answers[start:start + batch_size]):
            correct += tasks.reward("exact", decode(out), answer)
            generated += len(out)
        kv_bytes = max(kv_bytes, gen.kv_slots * bytes_per_slot * len(prompts))
        progress.update(len(prompts))
    return Row(name, budget, correct / len(split.prompts), kv_bytes,
               generated / seconds if seconds > 0 else 0.0, generated)


def table(rows: List[Row]) -> str:
    full = next((r for r in rows if r.budget is None), None)
    head = "| policy | budget | accuracy | KV memory | vs FullKV | tokens/s |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        share = f"{r.kv_bytes / full.kv_bytes:.0%}" if full else "-"
        lines.append(f"| {r.policy} | {'all' if r.budget is None else r.budget} | "
                     f"{r.accuracy:.1%} | {r.kv_bytes / 1024:.0f} KiB | {share} | "
                     f"{r.tokens_per_s:.0f} |")
    return "\n".join(lines)


def plot(rows: List[Row], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
    for (ax, key, label) in ((axes[0], "accuracy", "accuracy"),
                             (axes[1], "kv_bytes", "KV memory (KiB, one batch)"),
                             (axes[2], "tokens_per_s", "tokens/s")):
        scale = 1 / 1024 if key == "kv_bytes" else 1.0
        for name in dict.fromkeys(r.policy for r in rows):
            points = [(r.budget, getattr(r, key) * scale) for r in rows if r.policy == name]
            if points[0][0] is None:
                ax.axhline(points[0][1], linestyle="--", color="black", label=name)
            else:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xlabel("budget (tokens per KV head)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_budgets(text: str) -> List[int]:
    try:
        budgets = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        budgets = []
    if not budgets or any(b < 1 for b in budgets):
        raise ValueError(f"--budgets: expected comma-separated positive integers, got {text!r}")
    return budgets


def demo(args) -> Dict:
    """Runs the rows; returns {"config", "rows"} (also written to demo.json)."""
    from tqdm import tqdm

    budgets = distinct(parse_budgets(args.budgets), "--budgets")
    output_dir(args.out)
    if args.limit < 1 or args.batch_size < 1:
        raise ValueError(f"--limit and --batch-size must be >= 1, got {args.limit} and "
                         f"{args.batch_size}")
    chosen_dtype = model_dtype(args.dtype, "--dtype")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"--model: {model_dir} is not a checkpoint directory (no config.json)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 on a GPU; fp32 on a CPU, where bf16 matmuls are slow on most chips
    dtype = chosen_dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    if "fullkv" in distinct([policies.canonical_name(n) for n in names], "--policies"):
        raise ValueError("--policies: FullKV always runs; name the policies to compare with it")
    # built before anything runs, so a bad name fails at once
    grid = [("fullkv", None, policies.FullKV())] + [
        (name, b, policies.by_name(name, b, divide_length=args.divide_length))
        for name in names for b in budgets]
    split = eval_split(model_dir, args.limit)
    model = load_model(model_dir, device=device, dtype=dtype)
    rows = []
    with tqdm(total=len(grid) * len(split.prompts), desc="demo", unit="ex") as progress:
        for name, budget, policy in grid:
            progress.set_postfix_str(f"{name} {budget or ''}")
            rows.append(run_policy(model, split, name, budget, policy, args.batch_size, dtype,
                                   progress))
    return {"config": {"model": str(model_dir), "device": device, "dtype": str(dtype),
                       "limit": args.limit, "batch_size": args.batch_size, "budgets": budgets,
                       "divide_length": args.divide_length},
            "rows": [asdict(r) for r in rows]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(BUNDLED_MODEL),
                   help="a model made by scripts/make_bundled_model.py (default: the bundled one)")
    p.add_argument("--budgets", default="64,128,192", help="G-KV budgets (default 64,128,192)")
    p.add_argument("--policies", default="gkv,streamingllm",
                   help="policies run at each budget besides FullKV (default gkv,streamingllm)")
    # The bundled task's responses are about 70 tokens: compressing every 128 (the default for
    # long reasoning traces) would never happen while decoding.
    p.add_argument("--divide-length", type=int, default=16,
                   help="compression every D forwards (default 16)")
    p.add_argument("--limit", type=int, default=64, help="eval examples (default 64)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None,
                   help=f"one of {', '.join(MODEL_DTYPES)} (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--out", default="demo_results", help="output directory (demo_results)")


def run(args) -> int:
    """The demo subcommand: run, print the table, write demo.json and demo.png."""
    results = demo(args)
    rows = [Row(**r) for r in results["rows"]]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(results, indent=2))
    title = (f"bundled model, {results['config']['limit']} eval examples "
             f"({results['config']['device']})")
    plot(rows, out / "demo.png", title)
    print(table(rows))
    print(f"wrote {out / 'demo.json'}, {out / 'demo.png'}")
    return 0
