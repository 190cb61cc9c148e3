"""The ``kldsl`` command line.

kldsl explain examples/positive_not_curse.kl
kldsl models [--fetch smollm2]
kldsl run examples/positive_not_curse.kl
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from kldsl.errors import KldslError, shorten

if TYPE_CHECKING:
    from kldsl.graph import Model
    from kldsl.registry import Runtime


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


# options a command sets itself, or builds from flags of its own (not generated from engines)
_SAMPLE_OWN = {"resume", "overwrite"}
_FIT_OWN = {"output_dir", "resume", "overwrite", "lora"}
# fit's defaults where they differ from the engines' own (passed only to engines taking them)
_FIT_DEFAULTS = {"steps": 100, "checkpoint_every": 50}


def _add_engine_flags(
    parser: argparse.ArgumentParser, fits: bool, own: set[str], defaults: dict[str, Any]
) -> None:
    """One flag per option of the registered sampling (or fitting) engines, from
    ``Engine.options()``: ``--burn-in`` for ``burn_in``, typed from the run() signature.
    Only flags given on the command line (and ``defaults``) reach the engine."""
    from kldsl.infer import engines, get_engine

    flags: dict[str, list[tuple[str, Any]]] = {}  # name -> [(engine, its Option)]
    for name in engines():
        engine = get_engine(name)
        if engine.fits != fits:
            continue
        for option in engine.options().values():
            if option.type is not None and option.name not in own:
                flags.setdefault(option.name, []).append((name, option))
    taken = {a.dest for a in parser._actions}
    added = []
    group = parser.add_argument_group("engine options (only the chosen engine's apply)")
    for name, users in flags.items():
        if name in taken:  # a plug-in option named like one of the command's own flags
            continue
        option = users[0][1]
        text = next((o.help for _, o in users if o.help), option.annotation)
        values = {e: defaults.get(name, o.default) for e, o in users}
        if len(set(map(repr, values.values()))) == 1:
            default = f" (default {option.default!r})" if option.default is not None else ""
            default = f" (default {defaults[name]!r})" if name in defaults else default
        else:
            default = " (default " + ", ".join(f"{e} {v!r}" for e, v in values.items()) + ")"
        shown = f"{', '.join(e for e, _ in users)}: {text}{default}"
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": shown}
        if option.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = option.type
        group.add_argument("--" + name.replace("_", "-"), **kw)
        added.append(name)
    parser.set_defaults(engine_flags=frozenset(added))


def _engine_options(
    args: argparse.Namespace, engine: str, defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The engine flags given on the command line, and those of ``defaults`` the engine
    takes. A given flag the engine does not take is passed on, for infer's clear error."""
    from kldsl.infer import get_engine

    taken = get_engine(engine).options()
    options = {k: v for k, v in (defaults or {}).items() if k in taken}
    options.update({k: v for k, v in vars(args).items() if k in args.engine_flags})
    return options


def _clip(text: str, width: int = 90) -> str:
    text = text.replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _fit_moments(model: Model, args: argparse.Namespace) -> Model:
    """``model`` with its ``| mean(φ) == μ`` fitted (:func:`kldsl.fit_moments`, the report
    printed), or ``model`` itself when it has none."""
    from kldsl.moments import fit_moments
    from kldsl.transforms import moments_of

    if not moments_of(model):
        return model
    fit = fit_moments(model, n=args.moment_n, seed=args.seed, progress=True, runtime=args.runtime)
    print(f"distributional constraints fitted (kl.fit_moments):\n{fit.summary()}")
    return fit.model


def cmd_sample(args: argparse.Namespace) -> int:
    """Sample a .kl model's posterior with any engine and print the diagnostics."""
    from kldsl.infer import infer
    from kldsl.parser import load

    console = _console()
    model = _fit_moments(load(args.file), args)
    start = time.perf_counter()
    samples = infer(
        model,
        engine=args.engine,
        n=args.n,
        seed=args.seed,
        proposal=args.proposal,
        batch_size=args.batch_size,
        out=args.out,
        progress=True,
        resume=args.resume,
        overwrite=args.force,
        runtime=_runtime(args),
        **_engine_options(args, args.engine),
    )
    elapsed = time.perf_counter() - start
    console.print(samples.summary())
    table = Table(title="highest-weight samples", title_justify="left")
    table.add_column("weight", justify="right")
    table.add_column("text")
    for i in samples.best(args.show):
        table.add_row(f"{float(samples.weights[i]):.3f}", _clip(samples.texts[i]))
    console.print(table)
    if args.out:
        print(f"every draw was streamed to {args.out}")
    if args.plot:
        print(f"plot: {samples.plot(args.plot)}")
    print(f"{args.engine}: {len(samples)} samples in {elapsed:.1f} s")
    return 0


def cmd_engines(args: argparse.Namespace) -> int:
    from kldsl.infer import engines, get_engine

    table = Table(title="engines (kl.infer(model, engine=NAME, ...))", title_justify="left")
    for column in ("name", "description", "options"):
        table.add_column(column)
    for name, description in engines().items():
        table.add_row(name, description, ", ".join(get_engine(name).options()))
    _console().print(table)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: explain a model, then compare its prior and its posterior."""
    from kldsl.infer import infer
    from kldsl.parser import load

    console = _console()
    model = _fit_moments(load(args.file), args)
    console.rule(f"[bold]{args.file}")
    print(model.explain())
    base = model.base()
    name = base.model if isinstance(base.model, str) else base.model.name
    console.rule(f"[bold]posterior by importance sampling: {args.n} draws from {name}")
    start = time.perf_counter()
    samples = infer(
        model,
        engine="importance",
        n=args.n,
        seed=args.seed,
        batch_size=args.n,
        progress=True,
        runtime=_runtime(args),
    )
    elapsed = time.perf_counter() - start
    table = Table(title_justify="left")
    table.add_column("")
    table.add_column("prior a(x)", justify="right")
    table.add_column("posterior p*(x)", justify="right")
    for k in samples.rewards:
        table.add_row(
            f"mean {k}",
            f"{samples.reward_mean(k, weighted=False):+.3f}",
            f"{samples.reward_mean(k):+.3f}",
        )
    for k in samples.constraints:
        table.add_row(
            f"rate {k}",
            f"{samples.constraint_rate(k, weighted=False):.1%}",
            f"{samples.constraint_rate(k):.1%}",
        )
    table.add_row("log Z", "0", f"{samples.log_z:.3f} ± {samples.log_z_se:.3f}")
    table.add_row("ESS", f"{len(samples)}", f"{samples.ess:.1f}")
    console.print(table)
    posterior = samples.resample(args.show, seed=args.seed)
    texts = Table(title="prompt: " + repr(base.prompt), title_justify="left", show_lines=True)
    texts.add_column("prior samples")
    texts.add_column("posterior samples (resampled)")
    for i in range(args.show):
        texts.add_row(_clip(samples.texts[i], 200), _clip(posterior.texts[i], 200))
    console.print(texts)
    print(f"{args.n} samples, weights and diagnostics in {elapsed:.1f} s")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    """Fine-tune an LM toward a .kl model's posterior; ``prior("OUT")`` names the result."""
    from kldsl.infer import infer
    from kldsl.parser import load

    console = _console()
    model = _fit_moments(load(args.file), args)
    from kldsl.infer import get_engine

    taken = get_engine(args.engine).options()
    options = _engine_options(args, args.engine, _FIT_DEFAULTS)
    saves = "output_dir" in taken  # the engine writes the folder (checkpoints, metrics) itself
    if saves:
        options["output_dir"] = args.out
    elif (Path(args.out) / "fit.json").exists() and not args.overwrite:
        raise KldslError(
            f"{args.out} already holds a fit; pass --overwrite to replace it, or choose "
            "another --out"
        )
    if args.lora:
        lora: dict[str, Any] = {"r": args.lora_r}
        if args.lora_targets:
            lora["target_modules"] = args.lora_targets.split(",")
        options["lora"] = lora
    start = time.perf_counter()
    fit = infer(
        model,
        engine=args.engine,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=True,
        resume=args.resume,
        overwrite=args.overwrite,
        runtime=_runtime(args),
        **options,
    )
    elapsed = time.perf_counter() - start
    if not saves:
        fit.save(args.out)
    table = Table(
        title=f"{fit.objective}: {len(fit.history)} steps of {model}", title_justify="left"
    )
    table.add_column("metric")
    table.add_column("first step", justify="right")
    table.add_column("last step", justify="right")
    first, last = (fit.history[0], fit.history[-1]) if fit.history else ({}, {})
    for key, value in last.items():
        if key in ("step", "time_s") or not isinstance(value, int | float):
            continue
        table.add_row(key, f"{first.get(key, float('nan')):.4g}", f"{value:.4g}")
    console.print(table)
    plot = fit.plot(f"{args.out}/curves.png")
    if (Path(args.out) / "metrics.jsonl").exists():
        print(f"curves: {plot}; metrics: {args.out}/metrics.jsonl; tensorboard --logdir {args.out}")
    else:
        print(f"curves: {plot}; metrics: {args.out}/history.jsonl")
    print(f'fine-tuned LM saved in {args.out}: use it as prior("{args.out}") or as --proposal')
    print(f"{len(fit.history)} steps in {elapsed:.1f} s")
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

    p = sub.add_parser("run", help="explain a model and compare its prior and posterior")
    p.add_argument("file", help="a .kl file")
    p.add_argument("--n", type=int, default=64, help="number of draws (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=4, help="texts to show (default 4)")
    _add_runtime_flag(p)
    _add_moment_flag(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sample", help="sample a model's posterior with an engine")
    p.add_argument("file", help="a .kl file")
    p.add_argument("--engine", default="importance", help="see `kldsl engines`")
    p.add_argument("--n", type=int, default=256, help="number of samples (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--proposal", help="an LM name or folder to draw from instead of the prior")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", help="stream every draw to this JSON-lines file")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted --out file (same model, engine, seed, batch size, proposal)",
    )
    p.add_argument(
        "--force",
        "--overwrite",
        dest="force",
        action="store_true",
        help="replace an --out file that already holds draws (once the first new batch is written)",
    )
    p.add_argument("--plot", help="write a PNG of weights and rewards here")
    p.add_argument("--show", type=int, default=5, help="best samples to show (default 5)")
    _add_runtime_flag(p)
    _add_moment_flag(p)
    _add_engine_flags(p, fits=False, own=_SAMPLE_OWN, defaults={})
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("fit", help="fine-tune an LM toward a model's posterior (variational)")
    p.add_argument("file", help="a .kl file")
    p.add_argument("--engine", default="variational", help="a fitting engine (default variational)")
    p.add_argument("--out", required=True, help="folder for metrics, checkpoints and the fit")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint (with the same settings; --steps may change)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an --out folder that already holds checkpoints or a fit",
    )
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (default 32)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) only")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--lora-targets", help="comma-separated module names, e.g. q_proj,v_proj")
    p.add_argument("--seed", type=int, default=0)
    _add_runtime_flag(p)
    _add_moment_flag(p)
    _add_engine_flags(p, fits=True, own=_FIT_OWN, defaults=_FIT_DEFAULTS)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("engines", help="list the inference engines")
    p.set_defaults(func=cmd_engines)
    return parser


def _add_moment_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--moment-n",
        type=int,
        default=1024,
        help="samples that fit the λ of each `| mean(φ) == μ` first (default 1024)",
    )


def _add_runtime_flag(p: argparse.ArgumentParser) -> None:
    from kldsl.registry import RUNTIMES

    group = p.add_argument_group("runtime (what runs the models named in the file)")
    group.add_argument(
        "--runtime", default="hf", help=f"{', '.join(RUNTIMES)} (default hf; vllm needs vLLM)"
    )
    group.add_argument("--device", help="hf runtime: where the model runs, e.g. cuda (default cpu)")
    group.add_argument("--dtype", help="the weights' dtype, e.g. bfloat16 (default float32 on CPU)")
    group.add_argument(
        "--runtime-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another runtime option, e.g. tensor_parallel_size=2 for vllm (repeatable)",
    )


def _runtime(args: argparse.Namespace) -> Runtime:
    """The runtime and its options from --runtime, --device, --dtype and --runtime-option."""
    from kldsl.registry import Runtime

    options: dict[str, object] = {}
    for item in args.runtime_option:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise KldslError(f"--runtime-option takes KEY=VALUE, got {item!r}")
        options[key.strip().replace("-", "_")] = _option_value(text.strip())
    for key in ("device", "dtype"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.runtime == "vllm" and "device" in options:
        raise KldslError("--device is an hf runtime option; vLLM picks its device itself")
    return Runtime.of(args.runtime, **options)


def _option_value(text: str) -> object:
    """A command-line option value: an int, a float, true/false, or the text itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("run", "sample", "fit"):
        # kldsl shows its own progress; transformers' per-load weight bars are noise here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except KldslError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a file or folder named on the command line
        print(f"error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: what was finished is kept (see --resume)", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: say so without a wall of traceback
        if os.environ.get("KLDSL_DEBUG"):
            raise
        print(
            f"internal error ({type(err).__name__}: {shorten(str(err))}); this is a bug in kldsl, "
            "please report it with the command you ran (KLDSL_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 70


if __name__ == "__main__":
    sys.exit(main())
