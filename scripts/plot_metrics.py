"""Curves of a gkv-train run from its metrics.jsonl: one panel per key, against the step.

    python scripts/plot_metrics.py out/run/metrics.jsonl --keys loss,eval_accuracy --out curve.png

Keys missing from a record are skipped (eval_* are written every eval_every steps only); several
files draw one line each, labelled by their directory name or --labels.
"""
import argparse
import json
import sys
from pathlib import Path


def read_series(path: Path, key: str):
    steps, values = [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if key in record:
            steps.append(record["step"])
            values.append(record[key])
    return steps, values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files")
    p.add_argument("--keys", default="loss", help="comma-separated metric keys (default loss)")
    p.add_argument("--labels", default=None, help="comma-separated line labels, one per file")
    p.add_argument("--title", default=None)
    p.add_argument("--out", required=True, help="PNG path")
    args = p.parse_args(argv)
    paths = [Path(m) for m in args.metrics]
    missing = [str(m) for m in paths if not m.is_file()]
    if missing:
        print(f"error: metrics file not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    labels = args.labels.split(",") if args.labels else [m.parent.name for m in paths]
    if len(labels) != len(paths):
        print(f"error: --labels has {len(labels)} labels for {len(paths)} files", file=sys.stderr)
        return 2
    keys = args.keys.split(",")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        drawn = 0
        for path, label in zip(paths, labels):
            steps, values = read_series(path, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=label)
                drawn += 1
        if not drawn:
            print(f"error: no record has the key {key!r}", file=sys.stderr)
            return 2
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if len(paths) > 1:
            ax.legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
