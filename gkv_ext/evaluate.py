"""The evaluation harness: eviction policies x budgets on one model and one data set.

``python -m gkv_ext eval --model PATH --policies gkv,snapkv,streamingllm,fullkv --budgets 64,128
--data tinystories|gsm8k|synthetic|FILE.jsonl``

Metrics, per policy and budget, against FullKV on the same prompts and batches:

    accuracy        mean reward of the decoded greedy output, for examples with an answer
    agree_prefix    tokens equal to FullKV's greedy output before the first divergence, over
                    FullKV's length (1 = identical)
    agree_overall   positions equal to FullKV's greedy output, over FullKV's length
    nll_increase    mean NLL per token of a reference continuation under teacher forcing with the
                    policy, minus FullKV's (the data's reference response, the story's
                    continuation, else FullKV's own greedy output)

FullKV is also run as a policy (its row checks that the engine is deterministic: agreement 1,
NLL increase 0). Writes results.json, results.md (the table, also printed) and results.png
(each metric against the budget, one line per policy) to ``--out``.
"""
import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from itertools import islice
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

from . import policies
from . import tasks
from ._checks import MODEL_DTYPES, check_seed, distinct, model_dtype, output_dir
from .engine import generate, load_model, teacher_forced

METRICS = ("accuracy", "agree_prefix", "agree_overall", "nll_increase")
DATA_SETS = ("tinystories", "gsm8k", "math500", "synthetic")


@dataclass
class Example:
    prompt: List[int]
    reference: Optional[List[int]] = None  # a continuation to teacher-force (else FullKV's output)
    answer: Optional[str] = None
    answer_kind: Optional[str] = None


@dataclass
class Run:
    """One policy's outputs over every example, in order."""
    outputs: List[List[int]] = field(default_factory=list)   # generated tokens, stop included
    nll: List[Optional[float]] = field(default_factory=list)  # mean NLL per reference token


# ---- data ------------------------------------------------------------------------------------

def _tinystories(args, tokenizer) -> Iterator[Example]:
    for story in tasks.read_stories():
        ids = tokenizer.encode(story)
        if len(ids) > args.prompt_tokens:  # some continuation to compare
            yield Example(ids[:args.prompt_tokens],
                          ids[args.prompt_tokens:args.prompt_tokens + args.max_new_tokens])


def _problems(name):
    def load(args, tokenizer) -> Iterator[Example]:
        for p in tasks.read_problems(name, "test"):
            yield Example(tokenizer.encode(p.question), tokenizer.encode(p.solution, special=False),
                          p.answer, p.answer_kind)
    return load


def _synthetic(args, tokenizer) -> Iterator[Example]:
    options = tasks.synthetic_options(args.synthetic_length)
    for seed in range(args.seed, args.seed + args.limit):
        ex = tasks.make_example(seed, options)
        yield Example(tokenizer.encode(ex["prompt"]),
                      tokenizer.encode(ex["response"], special=False), ex["answer"], "exact")


def _token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) for t in value)


def _jsonl(path: Path) -> Iterator[Example]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e})") from None
            if not isinstance(row, dict) or not _token_ids(row.get("prompt")) or \
                    ("response" in row and not _token_ids(row["response"])):
                raise ValueError(f"{path}:{n}: expected an object with 'prompt' (and optionally "
                                 "'response') lists of token ids")
            kind = row.get("answer_kind")
            if "answer" in row and kind not in tasks.ANSWER_KINDS:
                raise ValueError(f"{path}:{n}: answer_kind must be one of "
                                 f"{', '.join(tasks.ANSWER_KINDS)}, got {kind!r}")
            yield Example(row["prompt"], row.get("response"), row.get("answer"), kind)


def load_examples(args, tokenizer) -> List[Example]:
    """The first ``args.limit`` examples of ``args.data`` (a name in DATA_SETS or a JSONL file
    of token ids with vocab.json beside it)."""
    loaders = {"tinystories": _tinystories, "gsm8k": _problems("gsm8k"),
               "math500": _problems("math500"), "synthetic": _synthetic}
    source = (loaders[args.data](args, tokenizer) if args.data in loaders
              else _jsonl(Path(args.data)))
    examples = list(islice(source, args.limit))
    if not examples:
        raise ValueError(f"--data {args.data}: no examples")
    return examples


def text_decoder(args, tokenizer, examples, model_eos: Sequence[int]) -> Callable[[List[int]], str]:
    """Generated tokens -> text, without the stop token: the tokenizer's decode, or vocab.json's
    bytes for a JSONL data file (needed only when some example has an answer)."""
    if tokenizer is not None:
        return tokenizer.decode
    vocab_path = Path(args.data).parent / "vocab.json"
    if not vocab_path.is_file():
        if any(ex.answer is not None for ex in examples):
            raise ValueError(f"--data {args.data}: accuracy needs {vocab_path} (the examples "
                             "have answers)")
        return lambda ids: ""
    vocab = tasks.Vocab.load(str(vocab_path))

    def decode(ids):
        """Ids past vocab.json (a model's padded embedding rows) decode as U+FFFD."""
        if ids and ids[-1] in model_eos:
            ids = ids[:-1]
        return b"".join(vocab.decode([t]) if t < len(vocab) else "\ufffd".encode()
                        for t in ids).decode("utf-8", errors="replace")
    return decode


# ---- running policies ------------------------------------------------------------------------

def _batches(n: int, size: int):
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _generate_all(model, examples, policy, args, progress) -> List[List[int]]:
    outputs = []
    for rows in _batches(len(examples), args.batch_size):
        gen = generate(model, [examples[i].prompt for i in rows], policy=policy,
                       max_new_tokens=args.max_new_tokens)
        outputs += gen.sequences
        progress.update(len(rows))
    return outputs


def _nll_all(model, examples, references, policy, args, progress) -> List[Optional[float]]:
    """Mean NLL per token of each reference under teacher forcing (None for an empty one)."""
    out: List[Optional[float]] = []
    for rows in _batches(len(examples), args.batch_size):
        refs = [references[i] for i in rows]
        width = max(1, max(len(r) for r in refs))
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for j, ref in enumerate(refs):
            tokens[j, :len(ref)] = torch.tensor(ref, dtype=torch.long)
            mask[j, :len(ref)] = True
        logprobs, _ = teacher_forced(model, [examples[i].prompt for i in rows],
                                     tokens.to(model.device), policy=policy, eviction_log=False)
        logprobs = logprobs.float().cpu()
        for j, ref in enumerate(refs):
            out.append(-logprobs[j][mask[j]].double().mean().item() if ref else None)
        progress.update(len(rows))
    return out


def _agreement(output: List[int], reference: List[int]):
    """(prefix, overall) fractions of ``reference`` that ``output`` reproduces."""
    if not reference:
        return 1.0, 1.0
    prefix = 0
    while prefix < min(len(output), len(reference)) and output[prefix] == reference[prefix]:
        prefix += 1
    same = sum(a == b for a, b in zip(output, reference))
    return prefix / len(reference), same / len(reference)


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def score(run: Run, full: Run, examples: List[Example], decode) -> Dict[str, Optional[float]]:
    """The metrics of one run against the FullKV run."""
    agree = [_agreement(o, f) for o, f in zip(run.outputs, full.outputs)]
    rewards = [tasks.reward(ex.answer_kind, decode(out), ex.answer)
               for ex, out in zip(examples, run.outputs) if ex.answer is not None]
    increase = [None if p is None or f is None else p - f for p, f in zip(run.nll, full.nll)]
    return {"accuracy": _mean(rewards),
            "agree_prefix": _mean(a for a, _ in agree),
            "agree_overall": _mean(b for _, b in agree),
            "nll_increase": _mean(increase),
            "nll": _mean(run.nll)}


def parse_list(text: str, name: str, cast=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{name}: expected a comma-separated list, got {text!r}")
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated integers, got {text!r}") from None


def _check_args(args):
    for name in ("limit", "max_new_tokens", "batch_size", "prompt_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model_dtype(args.dtype, "--dtype")
    # The synthetic examples' seeds, checked before the model loads.
    check_seed(args.seed, "--seed")
    check_seed(args.seed + args.limit - 1, "--seed + --limit - 1")
    if args.data not in DATA_SETS and not Path(args.data).is_file():
        raise ValueError(f"--data: {args.data!r} is neither a file nor one of "
                         f"{', '.join(DATA_SETS)}")
    if not Path(args.model).exists():
        raise ValueError(f"--model: {args.model} not found")
    output_dir(args.out)


def _check_token_ids(examples: List[Example], vocab_size: int):
    def fits(ids):
        return min(ids) >= 0 and max(ids) < vocab_size
    for i, ex in enumerate(examples):
        if not ex.prompt or not fits(ex.prompt) or (ex.reference and not fits(ex.reference)):
            raise ValueError(f"example {i}: token ids must lie in [0, {vocab_size}) (the model's "
                             "vocabulary) and the prompt must not be empty; was the data "
                             "prepared with another tokenizer?")


def _policy_grid(args):
    """[(name, budget or None, Policy)]; built up front so a bad name or budget fails at once."""
    names = parse_list(args.policies, "policies")
    budgets = parse_list(args.budgets, "budgets", int)
    if any(b < 1 for b in budgets):
        raise ValueError(f"--budgets must be positive, got {args.budgets!r}")
    distinct([policies.canonical_name(n) for n in names], "--policies")
    distinct(budgets, "--budgets")
    extra = {} if args.divide_length is None else {"divide_length": args.divide_length}
    grid = []
    for name in names:
        if policies.canonical_name(name) == "fullkv":  # no budget
            grid.append(("fullkv", None, policies.FullKV()))
            continue
        for budget in budgets:
            grid.append((name, budget, policies.by_name(name, budget, **extra)))
    return grid


def evaluate(args) -> dict:
    """Runs the grid; returns the results dict written to results.json."""
    from tqdm import tqdm

    grid = _policy_grid(args)
    _check_args(args)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    tokenizer = (tasks.load_tokenizer(args.tokenizer or args.model, chat_template=args.chat_template)
                 if args.data in DATA_SETS else None)
    examples = load_examples(args, tokenizer)
    _check_token_ids(examples, model.config.vocab_size)
    decode = text_decoder(args, tokenizer, examples, model.config.eos_token_ids)

    runs = 1 + len(grid)  # the FullKV reference, then every row of the grid
    with tqdm(total=2 * runs * len(examples), desc="eval", unit="ex") as progress:
        full = Run(_generate_all(model, examples, policies.FullKV(), args, progress))
        references = [ex.reference[:args.max_new_tokens] if ex.reference else out
                      for ex, out in zip(examples, full.outputs)]
        full.nll = _nll_all(model, examples, references, policies.FullKV(), args, progress)
        rows = []
        for name, budget, policy in grid:
            progress.set_postfix_str(f"{name} {budget if budget is not None else ''}")
            run = Run(_generate_all(model, examples, policy, args, progress))
            run.nll = _nll_all(model, examples, references, policy, args, progress)
            rows.append({"policy": name, "budget": budget, **score(run, full, examples, decode)})
    config = {k: v for k, v in vars(args).items() if k != "func"}
    return {"config": config, "examples": len(examples), "rows": rows}


# ---- outputs ---------------------------------------------------------------------------------

def _cell(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def table(results: dict) -> str:
    """The results as a Markdown table."""
    head = ["policy", "budget", *METRICS, "nll"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["rows"]:
        budget = "all" if row["budget"] is None else str(row["budget"])
        cells = [row["policy"], budget] + [_cell(row[m]) for m in (*METRICS, "nll")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    """Each metric with values against the budget, one line per policy (FullKV dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    metrics = [m for m in METRICS if any(r[m] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    for ax, metric in zip(axes[0], metrics):
        for name in dict.fromkeys(r["policy"] for r in rows):
            points = [(r["budget"], r[metric]) for r in rows
                      if r["policy"] == name and r[metric] is not None]
            if not points:
                continue
            if points[0][0] is None:  # FullKV: one value for every budget
                ax.axhline(points[0][1], linestyle="--", color="black", label=name)
            else:
                ax.plot(*zip(*points), marker="o", label=name)
        if len(budgets) > 1:
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, labels=[str(b) for b in budgets])
            ax.minorticks_off()
        ax.set_xlabel("budget (tokens per KV head)")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{Path(results['config']['model']).name} on {results['config']['data']} "
                 f"({results['examples']} examples)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(results: dict, out_dir: Path) -> Dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "table": out_dir / "results.md",
             "plot": out_dir / "results.png"}
    paths["json"].write_text(json.dumps(results, indent=2))
    paths["table"].write_text(table(results) + "\n")
    plot(results, paths["plot"])
    return paths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or llama2.ts .bin file")
    p.add_argument("--policies", default="gkv,rkv,snapkv,h2o,tova,streamingllm,fullkv",
                   help="comma-separated policy names (default: all)")
    p.add_argument("--budgets", default="64,128,256", help="comma-separated budgets")
    p.add_argument("--data", required=True,
                   help="tinystories, gsm8k, math500 (test splits), synthetic or a token-id "
                        "JSONL file "
                        "(scripts/prepare_data.py; vocab.json beside it)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or .bin (default: the model's)")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap gsm8k/synthetic/tinystories prompts in the tokenizer's chat template")
    p.add_argument("--limit", type=int, default=32, help="examples (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=64,
                   help="tinystories: the first N tokens of a story are the prompt (64)")
    p.add_argument("--synthetic-length", type=int, default=1024,
                   help="synthetic: characters per example, prompt plus response (1024)")
    p.add_argument("--seed", type=int, default=0, help="synthetic: the first example's seed")
    p.add_argument("--divide-length", type=int, default=None,
                   help="compression every D forwards (policy default 128)")
    p.add_argument("--device", default=None, help="e.g. cpu or cuda")
    p.add_argument("--dtype", default=None, help=f"one of {', '.join(MODEL_DTYPES)} (default: the model's)")
    p.add_argument("--out", default="eval_results", help="output directory (eval_results)")


def run(args) -> int:
    """The eval subcommand: evaluate, print the table, write the files."""
    results = evaluate(args)
    paths = write_outputs(results, Path(args.out))
    print(table(results))
    print(f"wrote {paths['json']}, {paths['table']}, {paths['plot']}")
    return 0
