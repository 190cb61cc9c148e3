"""The ``kldsl`` command line.

kldsl explain examples/positive_not_curse.kl
kldsl models [--fetch smollm2]
kldsl run examples/positive_not_curse.kl
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from kldsl.errors import KldslError


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def cmd_explain(args: argparse.Namespace) -> int:
    from kldsl.parser import load

    print(load(args.file).explain())
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from kldsl.models import fetch_embedded, list_models

    if args.fetch:
        path = fetch_embedded(args.fetch)
        print(f"{args.fetch}: {path}")
        return 0
    table = Table(title="models")
    for column in ("name", "cached", "description", "path"):
        table.add_column(column)
    for info in list_models():
        table.add_row(
            info["name"], "yes" if info["cached"] else "no", info["description"], str(info["path"])
        )
    _console().print(table)
    print('Any local Hugging Face folder or hub name also works: prior("path/or/name").')
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Explain a model and show samples of its prior with their rewards and constraints."""
    from kldsl.parser import load

    console = _console()
    model = load(args.file)
    console.rule(f"[bold]{args.file}")
    print(model.explain())
    base = model.base()
    console.rule(
        f"[bold]{args.n} prior samples from {base.model if isinstance(base.model, str) else base.model.name}"
    )
    start = time.perf_counter()
    lm = base.lm
    batch = lm.sample(args.n, base.max_tokens, prompt=base.prompt, seed=args.seed)
    density = model.log_density(batch.ids, base_log_probs=batch.log_probs)
    elapsed = time.perf_counter() - start
    table = Table(show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("text")
    for name in density.rewards:
        table.add_column(name, justify="right")
    for name in density.constraints:
        table.add_column(name, justify="center")
    table.add_column("log p̃", justify="right")
    for i, text in enumerate(density.texts):
        row = [str(i), repr(base.prompt + text)[1:-1] if args.full else repr(text)[1:-1]]
        row += [f"{float(v[i]):+.3f}" for v in density.rewards.values()]
        row += ["✓" if bool(v[i]) else "✗" for v in density.constraints.values()]
        row.append(f"{float(density.log_p[i]):.2f}")
        table.add_row(*row)
    console.print(table)
    means = ", ".join(f"mean {k} {float(v.mean()):+.3f}" for k, v in density.rewards.items())
    rates = ", ".join(
        f"{k}: {float(v.double().mean()):.0%}" for k, v in density.constraints.items()
    )
    print(f"prior: {means}; {rates}  ({args.n} samples in {elapsed:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kldsl", description="A probabilistic-programming language for LM posteriors."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("explain", help="print a model's maths and factor table")
    p.add_argument("file", help="a .kl file")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("models", help="list models; --fetch NAME converts and caches one")
    p.add_argument("--fetch", metavar="NAME", help="fetch and convert an embedded model")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("run", help="explain a model and show samples of it")
    p.add_argument("file", help="a .kl file")
    p.add_argument("--n", type=int, default=8, help="number of samples (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--full", action="store_true", help="show the prompt with each text")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KldslError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
