"""Command line:

    python -m gkv_ext generate --model PATH --prompt TEXT --policy gkv --budget N
    python -m gkv_ext eval --model PATH --policies gkv,fullkv --budgets 64,128 --data tinystories
    python -m gkv_ext demo      # the bundled model: accuracy, KV memory, tokens/s; FullKV vs G-KV

The tokenizer is transformers' AutoTokenizer for a checkpoint directory that has one, or the
llama2.c tokenizer (tok512.bin beside the model, else the model file's own vocabulary) for a
llama2.ts .bin model (gkv_ext.tasks.load_tokenizer). ``eval`` is gkv_ext/evaluate.py, ``demo``
gkv_ext/demo.py.
"""
import argparse
import sys
from pathlib import Path

from . import demo, evaluate, policies, tasks
from .engine import generate, load_model


def _generate(args) -> int:
    path = Path(args.model)
    tokenizer = tasks.load_tokenizer(path)
    model = load_model(path, device=args.device)
    extra = {"window": args.window, "divide_length": args.divide_length}
    policy = policies.by_name(args.policy, args.budget,
                              **{k: v for k, v in extra.items() if v is not None})
    out = generate(model, args.prompt, policy=policy, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed, tokenizer=tokenizer)
    print(out.texts[0])
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gkv_ext")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text with a compressed KV cache")
    g.add_argument("--model", required=True, help="checkpoint directory or llama2.ts .bin file")
    g.add_argument("--prompt", required=True)
    g.add_argument("--policy", default="gkv",
                   help="fullkv, streamingllm, h2o, h2o-accumulate, snapkv, rkv, tova or gkv "
                        "(default gkv)")
    g.add_argument("--budget", type=int, default=None, help="kept tokens per KV head")
    g.add_argument("--window", type=int, default=None, help="recent tokens always kept (16)")
    g.add_argument("--divide-length", type=int, default=None,
                   help="compression every D forwards (128)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="e.g. cpu or cuda")
    g.set_defaults(func=_generate)
    e = sub.add_parser("eval", help="policies x budgets: accuracy, agreement with FullKV, NLL")
    evaluate.add_arguments(e)
    e.set_defaults(func=evaluate.run)
    d = sub.add_parser("demo", help="the bundled model: FullKV vs G-KV accuracy, KV memory, "
                                    "tokens/s")
    demo.add_arguments(d)
    d.set_defaults(func=demo.run)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as e:  # bad arguments, data or policy
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
