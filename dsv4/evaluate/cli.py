"""Command-line entry points of this package (registered by dsv4.cli.build_parser)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from dsv4.commands import CommandError, add_chat_encoding_argument, positive_int
from dsv4.evaluate.backends import THINK_MODES

SUITES = ("ppl", "niah", "tasks", "mc", "math")

DESCRIPTION = """\
How good is a model, and does its compressed attention remember what was far back?
One suite per run, on a dsv4 checkpoint (PATH: a run directory or checkpoint folder) or on any
OpenAI-compatible server (--endpoint URL --model NAME). Prints a table and writes
OUT/results.json, OUT/items.jsonl (one line per finished item) and PNG plots. A run that stops
(crash, Ctrl-C) continues where it left off when started again with the same options.

suites:
  ppl    perplexity, nats/token and bits-per-byte of --data text files (.txt, .jsonl/.json
         "text", .parquet "text"), default: the validation split of the default corpus;
         documents up to --context tokens are scored in one pass through the compressed
         cache, longer ones with a sliding window (--stride)
  niah   needle in a haystack at --lengths x --depths, heatmap PNG; with a local model also
         how often the CSA indexer's top-k holds the needle's compressed entries
  tasks  the post-training domains (dsv4.tasks), as chat prompts
  mc     multiple choice from --data FILE (MMLU, A/B/C/D columns or ARC layouts; .jsonl,
         .json, .csv, .parquet), few-shot, scored by log-likelihood and by generation
  math   final-answer math from --data FILE (GSM8K "#### 42" answers), few-shot, exact match

examples:
  dsv4 eval runs/nano --suite ppl --limit 8
  dsv4 eval runs/nano --suite niah --lengths 1K,2K,4K --depths 0,50,100
  dsv4 eval runs/nano --suite mc --data mmlu_test.jsonl --dev mmlu_dev.jsonl --shots 5
  dsv4 eval --endpoint http://127.0.0.1:8000/v1 --model nano --suite math --data gsm8k.jsonl
"""


def add_commands(subparsers: Any) -> None:
    """Add this package's subcommands to `dsv4`."""
    parser = subparsers.add_parser(
        "eval", help="evaluate a model: perplexity, needle in a haystack, tasks, mc, math",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", metavar="PATH",
                        help="a run directory written by `dsv4 train` or a checkpoint folder")
    parser.add_argument("--suite", required=True, choices=SUITES, help="what to evaluate")
    parser.add_argument("--data", nargs="+", metavar="FILE", default=[],
                        help="ppl: text files or folders; mc/math: the benchmark file")
    parser.add_argument("--out", metavar="DIR",
                        help="results folder (default eval/<model>/<suite>)")
    parser.add_argument("--fresh", action="store_true",
                        help="discard finished items in --out instead of resuming")
    parser.add_argument("--limit", type=positive_int, metavar="N",
                        help="evaluate only the first N items (documents, prompts, rows)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    model = parser.add_argument_group("model")
    model.add_argument("--endpoint", metavar="URL",
                       help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    model.add_argument("--model", metavar="NAME", help="with --endpoint: the model name")
    model.add_argument("--preset", metavar="NAME",
                       help="with --random: a random-weight model of this preset (tries the "
                            "harness without a checkpoint)")
    model.add_argument("--random", action="store_true", help="see --preset")
    model.add_argument("--seed", type=int, default=0, help="--random weights seed (default 0)")
    model.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                       help="local weights and cache dtype (default bf16)")
    model.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    model.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads for torch")
    model.add_argument("--context", type=positive_int, default=8192, metavar="N",
                       help="tokens per sequence (default 8192): the ppl window, the longest "
                            "default niah length, a local model's cache size for mc/math/tasks")
    model.add_argument("--batch", type=positive_int, default=8, metavar="N",
                       help="local: sequences generated together (default 8)")

    ep = parser.add_argument_group("endpoint")
    ep.add_argument("--concurrency", type=positive_int, default=8, metavar="N",
                    help="requests in flight (default 8)")
    ep.add_argument("--retries", type=int, default=5, metavar="N",
                    help="retries of a request on 429/5xx/timeouts/connection errors, with "
                         "exponential backoff (default 5)")
    ep.add_argument("--timeout", type=float, default=600.0, metavar="S",
                    help="seconds per request (default 600)")
    ep.add_argument("--api-key", metavar="KEY", help="default: $OPENAI_API_KEY, else none")
    ep.add_argument("--tokenizer", metavar="PATH",
                    help="a tokenizer.json: with --endpoint, to size niah prompts and ppl "
                         "pieces (default: estimate tokens as UTF-8 bytes / 4); with a local "
                         "model, used instead of the one beside the checkpoint")

    s = parser.add_argument_group("suite options")
    s.add_argument("--stride", type=positive_int, metavar="N",
                   help="ppl: tokens a sliding window advances (default --context / 2)")
    s.add_argument("--lengths", metavar="LIST",
                   help="niah: prompt lengths in tokens, e.g. 1K,2K,4K (default: 1K, 2K, ... up "
                        "to --context)")
    s.add_argument("--depths", default="0,25,50,75,100", metavar="LIST",
                   help="niah: needle depths in percent (default 0,25,50,75,100)")
    s.add_argument("--trials", type=positive_int, default=1, metavar="N",
                   help="niah: prompts per (length, depth), other haystack and key (default 1)")
    s.add_argument("--variant", choices=("single", "multikey"), default="single",
                   help="niah: one needle, or --keys needles of which one is asked")
    s.add_argument("--keys", type=positive_int, default=4, metavar="N",
                   help="niah multikey: needles per prompt (default 4)")
    s.add_argument("--haystack", choices=("corpus", "filler"), default="corpus",
                   help="niah: corpus text (--data or the default corpus's validation split) or "
                        "a repeated filler sentence")
    s.add_argument("--domains", metavar="LIST", help="tasks: comma-separated (default all)")
    s.add_argument("--domain-module", metavar="FILE",
                   help="tasks: a Python file whose top-level Domain objects are added")
    s.add_argument("--problems", type=positive_int, metavar="N",
                   help="tasks: problems per domain (default: the domain's eval set)")
    s.add_argument("--dev", metavar="FILE",
                   help="mc/math: few-shot examples (default: the first --shots rows of --data, "
                        "then not scored)")
    s.add_argument("--shots", type=int, default=5, metavar="K",
                   help="mc/math: solved examples in the prompt (default 5)")
    s.add_argument("--scoring", metavar="LIST",
                   help="mc: any of letter,text,generate (default letter,generate; an "
                        "endpoint without log-probabilities skips letter, saying so)")
    s.add_argument("--chat", action="store_true",
                   help="niah/mc/math: prompt in the V4 chat encoding instead of plain text")
    s.add_argument("--think", choices=THINK_MODES, default="none",
                   help="tasks/mc/math reasoning mode (implies --chat): none (non-think) or "
                        "think mode at this reasoning effort; tasks asks a think-mode domain "
                        "(expr) in think mode (effort low) even with none")
    add_chat_encoding_argument(s)
    s.add_argument("--max-tokens", type=positive_int, metavar="N",
                   help="tokens to generate per item (defaults: niah 8, mc 4, math 256, tasks 24; "
                        "thinking modes more)")
    parser.set_defaults(run=cmd_eval)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _options(args: argparse.Namespace):
    from dsv4.evaluate.niah import parse_depths, parse_lengths
    from dsv4.evaluate.run import EvalOptions

    if args.shots < 0:
        raise CommandError(f"--shots {args.shots}: must be >= 0")
    return EvalOptions(
        data=list(args.data), dev=args.dev, limit=args.limit, context=args.context,
        stride=args.stride, lengths=parse_lengths(args.lengths) if args.lengths else None,
        depths=parse_depths(args.depths), trials=args.trials, variant=args.variant,
        keys=args.keys, haystack=args.haystack, shots=args.shots,
        scoring=[s.strip() for s in args.scoring.split(",")] if args.scoring else None,
        domains=args.domains, domain_module=args.domain_module, n_problems=args.problems,
        chat=args.chat, think=args.think, chat_encoding=args.chat_encoding,
        max_tokens=args.max_tokens, fresh=args.fresh)


def _backend(args: argparse.Namespace):
    given = [args.path is not None, args.endpoint is not None, args.random]
    if sum(given) != 1:
        raise CommandError("give exactly one model: PATH, --endpoint URL --model NAME, or "
                           "--preset NAME --random")
    if args.endpoint:
        from dsv4.evaluate.endpoint import EndpointBackend

        if not args.model:
            raise CommandError("--endpoint needs --model NAME (the server's model id)")
        tokenizer = None
        if args.tokenizer:
            from dsv4.text.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_file(args.tokenizer)
        return EndpointBackend(args.endpoint, args.model, concurrency=args.concurrency,
                               retries=args.retries, timeout=args.timeout,
                               api_key=args.api_key, tokenizer=tokenizer), _slug(args.model)
    if args.model:
        raise CommandError("--model names an endpoint's model: use it with --endpoint")
    from dsv4.commands import load_inference_model
    from dsv4.evaluate.backends import LocalBackend
    from dsv4.evaluate.store import weights_fingerprint

    ns = argparse.Namespace(checkpoint=args.path, preset=args.preset, config=None,
                            random=args.random, seed=args.seed, threads=args.threads,
                            device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
    if args.path is not None and not Path(args.path).exists():
        raise CommandError(f"{args.path}: no such run directory or checkpoint")
    model, tokenizer, label = load_inference_model(ns)
    name = Path(args.path).name if args.path else f"{args.preset}-random"
    backend = LocalBackend(model, tokenizer, label, capacity=args.context, batch=args.batch)
    backend.chat_encoding = args.chat_encoding
    backend.fingerprint = (weights_fingerprint(args.path) if args.path else
                           f"random weights, seed {args.seed}")
    return backend, _slug(name)


def cmd_eval(args: argparse.Namespace) -> int:
    from dsv4.evaluate.report import format_table
    from dsv4.evaluate.run import evaluate

    out = None
    try:
        options = _options(args)
        backend, name = _backend(args)
        out = Path(args.out or Path("eval") / name / args.suite)
        results = evaluate(backend, args.suite, out, options,
                           progress=not args.no_progress and sys.stderr.isatty())
    except KeyboardInterrupt:
        where = f" in {out / 'items.jsonl'}" if out else ""
        print(f"\ndsv4 eval: interrupted; finished items are kept{where} (run the same command "
              "again to continue)", file=sys.stderr)
        return 130
    print(format_table(results))
    resumed = (f"; {results['resumed_items']} item(s) resumed from {out / 'items.jsonl'}"
               if results["resumed_items"] else "")
    print(f"\n{results['items']} items in {results['seconds']:.1f} s{resumed}\n"
          f"wrote {out / 'results.json'}" + "".join(f", {p}" for p in results["plots"]))
    return 0
