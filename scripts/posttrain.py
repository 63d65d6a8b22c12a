"""Post-training under compression (G-KV paper, section 4): the same recipes run with a compressed
cache and with a full cache on the bundled model, then every model measured at several budgets.

    python scripts/posttrain.py --gkv-train build/gkv-train --out docs/results/posttrain

Runs, each a `gkv-train` job on --device that resumes from its directory if killed:
  sft-fullkv     sft on the dataset's responses with a full cache
  sft-gkv        the same sft under teacher-forced G-KV compression at --budget
  distill-gkv    KL(full-cache teacher || G-KV student at --budget); teacher = the initial weights
                 (the full-cache version of self-distillation is KL = 0: nothing to run)
  rl-fullkv      GRPO with full-cache rollouts
  rl-gkv         GRPO with G-KV rollouts at --budget, trained on the contexts they saw
Then `python -m gkv_ext eval` on the initial model and on each run's last checkpoint, G-KV at
--eval-budgets and FullKV, on the bundled eval split: accuracy and the teacher-forced NLL of the
reference responses under each cache. Writes <out>/results.json, results.md and results.png.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gkv_ext.demo import BUNDLED_MODEL  # noqa: E402

RUNS = {  # name: (recipe, keys beyond the shared ones)
    "sft-fullkv": ("sft", {"policy": "fullkv"}),
    "sft-gkv": ("sft", {"policy": "gkv", "sft_compressed": "true"}),
    "distill-gkv": ("distill", {"policy": "gkv"}),
    "rl-fullkv": ("rl", {"policy": "fullkv"}),
    "rl-gkv": ("rl", {"policy": "gkv"}),
}


def task_settings(model: Path) -> dict:
    return json.loads((model / "task.json").read_text())


def prepare_data(work: Path, model: Path, train_examples: int) -> Path:
    """Training prompts from the bundled model's own training seeds (0..), its eval split untouched."""
    data = work / "data"
    if not (data / "train.jsonl").is_file():
        task = task_settings(model)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--data", "synthetic",
                        "--tokenizer", "char", "--synthetic-length", str(task["synthetic_length"]),
                        "--splits", f"train={train_examples}", "--out", str(data)], check=True)
    return data


def train(args, work: Path, data: Path, name: str) -> Path:
    recipe, keys = RUNS[name]
    out_dir = work / name
    shared = {"model": args.model, "data": data / "train.jsonl", "out_dir": out_dir,
              "device": args.device, "seed": 0, "max_seq_len": 320, "lr_schedule": "constant",
              "warmup_steps": 0, "log_every": 10, "budget": args.budget,
              "divide_length": args.divide_length}
    if recipe == "rl":  # prompts x group samples; the reference responses are not used
        shared.update(steps=args.rl_steps, save_every=args.rl_steps, lr=args.rl_lr, batch_size=4,
                      micro_batch_size=4, group_size=8, max_new_tokens=args.max_new_tokens,
                      temperature=1.0)
    else:
        steps = args.distill_steps if recipe == "distill" else args.steps
        shared.update(steps=steps, save_every=steps, lr=args.lr, batch_size=16, micro_batch_size=16)
    if keys["policy"] == "fullkv":
        shared.pop("budget")
    overrides = [f"{k}={v}" for k, v in {**shared, **keys}.items()]
    subprocess.run([args.gkv_train, recipe, *overrides], check=True)
    steps = shared["steps"]
    return out_dir / f"step-{steps:08d}"


def evaluate(args, model: Path, out: Path) -> list:
    if not (out / "results.json").is_file():
        task = task_settings(Path(args.model))
        subprocess.run([sys.executable, "-m", "gkv_ext", "eval", "--model", str(model),
                        "--tokenizer", str(Path(args.model) / "tokenizer"), "--data", "synthetic",
                        "--synthetic-length", str(task["synthetic_length"]),
                        "--seed", str(task["eval_seed"]), "--limit", str(args.eval_limit),
                        "--policies", "gkv,fullkv", "--budgets", args.eval_budgets,
                        "--max-new-tokens", str(args.max_new_tokens),
                        "--divide-length", str(args.divide_length), "--batch-size", "64",
                        "--dtype", "float32", "--device", args.device, "--out", str(out)],
                       check=True)
    return json.loads((out / "results.json").read_text())["rows"]


def report(results: dict, budgets: list, out: Path, command: str) -> None:
    columns = [str(b) for b in budgets] + ["full"]

    def value(rows, budget, key):
        for r in rows:
            if (budget == "full") == (r["policy"] == "fullkv") and (budget == "full" or r["budget"] == int(budget)):
                return r[key]
        raise KeyError(budget)

    lines = [f"`{command}`", "",
             "| model | " + " | ".join(f"acc@{c}" for c in columns) + " | "
             + " | ".join(f"nll@{c}" for c in columns) + " |",
             "|---" * (1 + 2 * len(columns)) + "|"]
    for name, rows in results.items():
        acc = [f"{value(rows, c, 'accuracy'):.3f}" for c in columns]
        nll = [f"{value(rows, c, 'nll'):.4f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(acc) + " | " + " | ".join(nll) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in results.items():
        for ax, key in zip(axes, ("nll", "accuracy")):
            ax.plot(columns, [value(rows, c, key) for c in columns], marker="o", label=name)
    axes[0].set_ylabel("NLL of the reference responses (nats/token)")
    axes[1].set_ylabel("accuracy")
    for ax in axes:
        ax.set_xlabel("G-KV budget (full = FullKV)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("Post-training with a compressed cache vs a full cache (bundled model)")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)
    print(f"wrote {out / 'results.md'}, results.json and results.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gkv-train", default=str(ROOT / "build" / "gkv-train"))
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="start model (default: bundled)")
    p.add_argument("--work", default=str(ROOT / "out" / "posttrain"), help="data and runs")
    p.add_argument("--out", default=str(ROOT / "out" / "posttrain" / "report"), help="results")
    p.add_argument("--runs", default=",".join(RUNS), help=f"subset of {','.join(RUNS)}")
    p.add_argument("--budget", type=int, default=128, help="training budget (default 128)")
    p.add_argument("--divide-length", type=int, default=16)
    p.add_argument("--steps", type=int, default=150, help="sft steps (batch 16)")
    p.add_argument("--distill-steps", type=int, default=150, help="distill steps (batch 16)")
    p.add_argument("--lr", type=float, default=1e-4, help="sft / distill learning rate")
    p.add_argument("--rl-steps", type=int, default=60, help="rl steps (4 prompts x 8 samples)")
    p.add_argument("--rl-lr", type=float, default=1e-4)
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--train-examples", type=int, default=4000)
    p.add_argument("--eval-budgets", default="64,128,192")
    p.add_argument("--eval-limit", type=int, default=64, help="eval examples (default 64)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if not Path(args.gkv_train).is_file():
        print(f"error: --gkv-train {args.gkv_train} not found (cmake --build build --target gkv-train)",
              file=sys.stderr)
        return 2
    names = [n for n in args.runs.split(",") if n]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        print(f"error: --runs: unknown {unknown}; choose from {','.join(RUNS)}", file=sys.stderr)
        return 2
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work, Path(args.model), args.train_examples)
    results = {"initial": evaluate(args, Path(args.model), work / "eval" / "initial")}
    for name in names:
        results[name] = evaluate(args, train(args, work, data, name), work / "eval" / name)
    report(results, [int(b) for b in args.eval_budgets.split(",")], out,
           "python scripts/posttrain.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
