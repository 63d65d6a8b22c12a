"""Command line:

    python -m gkv_ext generate --model PATH --prompt TEXT --policy gkv --budget N
    python -m gkv_ext eval --model PATH --policies gkv,fullkv --budgets 64,128 --data tinystories
    python -m gkv_ext demo      # the bundled model: accuracy, KV memory, tokens/s; FullKV vs G-KV

The tokenizer (``--tokenizer``, default the model's) is transformers' AutoTokenizer for a
checkpoint directory that has one (or has one in ``tokenizer/``, as the bundled model does), or
the llama2.c tokenizer (tok512.bin beside the model, else the model file's own vocabulary) for a
llama2.ts .bin model (gkv_ext.tasks.load_tokenizer). ``generate`` prints the text as it is
generated, then a summary line (tokens/s, KV slots) on stderr. ``eval`` is gkv_ext/evaluate.py,
``demo`` gkv_ext/demo.py.
"""
import argparse
import sys
import time
from pathlib import Path

from . import demo, evaluate, policies, tasks
from .engine import generate, load_model


class _TextStream:
    """Prints one row's text while its tokens arrive, decoding only the newest ids with the
    last printed span before them as context (a tokenizer may render a token differently at the
    start of a text), so a step costs the same at token 10 and at token 10,000. An incomplete
    character is held back until its last byte comes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], []
        self.context = self.unprinted = 0  # ids[context:unprinted] printed, ids[unprinted:] not

    def __call__(self, step, tokens):
        self.ids.append(tokens[0])
        before = self.tokenizer.decode(self.ids[self.context:self.unprinted])
        text = self.tokenizer.decode(self.ids[self.context:])
        if len(text) > len(before) and text.startswith(before) and not text.endswith("\ufffd"):
            self.printed.append(text[len(before):])
            print(self.printed[-1], end="", flush=True)
            self.context, self.unprinted = self.unprinted, len(self.ids)

    def finish(self, text):
        # Decoding may re-split what was printed (rare): then the whole text again.
        shown = "".join(self.printed)
        print(text[len(shown):] if text.startswith(shown) else "\n" + text, flush=True)


def _generate(args) -> int:
    path = Path(args.model)
    tokenizer = tasks.load_tokenizer(args.tokenizer or path)
    model = load_model(path, device=args.device)
    extra = {"window": args.window, "divide_length": args.divide_length}
    policy = policies.by_name(args.policy, args.budget,
                              **{k: v for k, v in extra.items() if v is not None})
    stream = _TextStream(tokenizer)
    start = time.perf_counter()
    out = generate(model, args.prompt, policy=policy, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   seed=args.seed, tokenizer=tokenizer, on_token=stream)
    seconds = time.perf_counter() - start
    stream.finish(out.texts[0])
    n, prompt = int(out.lengths[0]), int(out.prompt_lengths[0])
    print(f"{n} tokens in {seconds:.2f} s ({n / seconds:.1f} tokens/s); KV cache of "
          f"{out.kv_slots} slots per layer and KV head, for {prompt + n} tokens",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gkv_ext")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text with a compressed KV cache")
    g.add_argument("--model", required=True, help="checkpoint directory or llama2.ts .bin file")
    g.add_argument("--prompt", required=True)
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or .bin (default: the model's)")
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
