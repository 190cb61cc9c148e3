"""``kl.infer``: run any registered engine on a model graph.

Engines are found through the entry-point group ``kldsl.engines``: a third-party package
adds one by declaring ``[project.entry-points."kldsl.engines"] name = "pkg.module:engine"``
where ``engine`` is an :class:`Engine`.

Example:
    >>> import kldsl as kl
    >>> m = kl.prior(kl.ToyLM(), max_tokens=3) * kl.exp(kl.length / 1.0)
    >>> kl.infer(m, engine="importance", n=64, seed=0).engine
    'importance'
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from kldsl import budget
from kldsl.density import unfitted_error
from kldsl.errors import KldslError, KldslNameError
from kldsl.graph import Model
from kldsl.lm import LM, make_generator
from kldsl.moments import fit_of
from kldsl.registry import Runtime, check_runtime, resolve
from kldsl.sink import Sink
from kldsl.target import Target
from kldsl.transforms import moments_of

if TYPE_CHECKING:
    from kldsl.fit import Fit
    from kldsl.samples import Samples

#: the keyword arguments every engine's run() takes (not options of its own)
COMMON = ("target", "n", "generator", "batch_size", "progress")
_CLI_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "Path": str, "PathLike": str}


@dataclass(frozen=True)
class Option:
    """One keyword option of an engine, read from its run() signature and docstring.

    ``type`` is what a command line can give it (bool, int, float or str; None when only
    Python can, e.g. a dict or an object); ``help`` is the docstring's line for it, if any.
    """

    name: str
    annotation: str
    default: Any
    type: type | None
    help: str = ""


def _cli_type(annotation: str) -> type | None:
    """bool, int, float or str from an annotation such as ``int | None`` (None: none fits)."""
    parts = {p.strip().split(".")[-1] for p in re.sub(r"\[.*?\]", "", annotation).split("|")}
    parts.discard("None")
    if parts == {"bool"}:
        return bool
    for name in ("int", "float", "str", "Path", "PathLike"):
        if name in parts:
            return _CLI_TYPES[name]
    return None


def _option_help(doc: str | None, names: set[str]) -> dict[str, str]:
    """Each option's line in a docstring: ``name: text``, ````name````: text or
    ``name (type): text`` (Google style), continued on more-indented lines."""
    found: dict[str, str] = {}
    current, indent = None, 0
    for line in (doc or "").splitlines():
        m = re.match(r"^(\s*)`*(\w+)`*\s*(?:\([^)]*\))?\s*:\s*(.*)$", line)
        if m and m.group(2) in names:
            current, indent = m.group(2), len(m.group(1))
            found[current] = m.group(3).strip()
        elif current and line.strip() and len(line) - len(line.lstrip()) > indent:
            found[current] += " " + line.strip()
        else:
            current = None
    return found


@dataclass(frozen=True)
class Engine:
    """An inference engine: ``run(target, *, n, generator, batch_size, progress, **options)``.

    ``resumable``: it draws its batches with :meth:`Target.draw_batch`, so ``resume=True``
    can continue an interrupted ``out=`` file. ``batched``: it keeps about ``n`` samples and
    draws batches of ``batch_size`` from the proposal, which :mod:`kldsl.budget` checks
    against the memory before it starts (False for ``exact``, which has its own limit).
    """

    name: str
    description: str  # one line, shown by `kldsl engines`
    run: Callable[..., Any]
    resumable: bool = False
    batched: bool = True
    takes_proposal: bool = True  # False: ``proposal=`` is refused before anything runs

    def options(self) -> dict[str, Option]:
        """The engine's own keyword options (name → :class:`Option`), in signature order:
        names, types and defaults from run()'s signature, help from its docstring."""
        params = {
            k: p for k, p in inspect.signature(self.run).parameters.items() if k not in COMMON
        }
        helps = _option_help(self.run.__doc__, set(params))
        out = {}
        for name, p in params.items():
            annotation = p.annotation
            if annotation is inspect.Parameter.empty:
                annotation = (
                    "" if p.default is inspect.Parameter.empty else type(p.default).__name__
                )
            elif not isinstance(annotation, str):
                annotation = inspect.formatannotation(annotation)
            default = None if p.default is inspect.Parameter.empty else p.default
            out[name] = Option(
                name, annotation, default, _cli_type(annotation), helps.get(name, "")
            )
        return out

    @property
    def fits(self) -> bool:
        """Whether it is a fitting engine: its run() returns a :class:`kldsl.Fit`."""
        returns = inspect.signature(self.run).return_annotation
        return getattr(returns, "__name__", returns) == "Fit"


@functools.cache
def _registry() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="kldsl.engines")}


def engines() -> dict[str, str]:
    """Every registered engine's name and one-line description."""
    return {name: get_engine(name).description for name in sorted(_registry())}


def get_engine(name: str) -> Engine:
    """The engine registered under ``name``; an unknown name lists the known ones."""
    registry = _registry()
    if name not in registry:
        raise KldslNameError(name, registry, what="engine")
    (ep,) = [ep for ep in entry_points(group="kldsl.engines") if ep.name == name]
    engine = ep.load()
    if not isinstance(engine, Engine):
        raise KldslError(f"entry point {ep.value} for engine {name!r} is not a kldsl Engine")
    return engine


SamplingEngine = Literal["exact", "rejection", "importance", "qrs", "mcmc", "pyro-importance"]
FittingEngine = Literal["variational", "pyro-svi"]


@overload
def infer(
    model: Model,
    engine: SamplingEngine = ...,
    n: int = ...,
    seed: int = ...,
    proposal: LM | str | Path | None = ...,
    batch_size: int = ...,
    out: str | Path | None = ...,
    progress: bool | None = ...,
    resume: bool = ...,
    overwrite: bool = ...,
    runtime: str | Runtime = ...,
    **options: Any,
) -> Samples: ...


@overload
def infer(
    model: Model,
    engine: FittingEngine,
    n: int = ...,
    seed: int = ...,
    proposal: LM | str | Path | None = ...,
    batch_size: int = ...,
    out: str | Path | None = ...,
    progress: bool | None = ...,
    resume: bool = ...,
    overwrite: bool = ...,
    runtime: str | Runtime = ...,
    **options: Any,
) -> Fit: ...


@overload
def infer(
    model: Model,
    engine: str,
    n: int = ...,
    seed: int = ...,
    proposal: LM | str | Path | None = ...,
    batch_size: int = ...,
    out: str | Path | None = ...,
    progress: bool | None = ...,
    resume: bool = ...,
    overwrite: bool = ...,
    runtime: str | Runtime = ...,
    **options: Any,
) -> Samples | Fit: ...


def infer(
    model: Model,
    engine: str = "importance",
    n: int = 256,
    seed: int = 0,
    proposal: LM | str | Path | None = None,
    batch_size: int = 64,
    out: str | Path | None = None,
    progress: bool | None = None,
    resume: bool = False,
    overwrite: bool = False,
    runtime: str | Runtime = "hf",
    **options: Any,
) -> Samples | Fit:
    """Approximate the posterior of ``model`` with ``engine``.

    Returns a :class:`kldsl.Samples` from a sampling engine and a :class:`kldsl.Fit` (a
    fine-tuned LM) from a fitting engine (``variational``, ``pyro-svi``; see
    :attr:`Engine.fits`).

    Every prior's model name resolves to an LM here, on ``runtime``
    (:func:`kldsl.registry.resolve`): ``"hf"``, Hugging Face transformers (the default), or
    ``"vllm"``, vLLM's engine (:class:`kldsl.VLLM`; a script using it needs the
    ``if __name__ == "__main__":`` guard); ``kl.Runtime.of("hf", device="cuda",
    dtype="bfloat16")`` or ``kl.Runtime.of("vllm", tensor_parallel_size=2)`` adds the
    runtime's options. Building or printing a model loads nothing, and a name that cannot
    be loaded fails here with a :class:`kldsl.KldslModelLoadError`. Fitting engines train
    on the hf runtime.

    ``proposal`` is any LM (or a model name / folder) to draw from instead of the prior;
    ``out`` streams every draw to a JSON-lines file as it is made, so a failure later
    loses no finished batch; ``progress`` shows a progress bar (default: on a terminal).
    The same seed gives the same samples. Engine options go in ``options``
    (``kl.get_engine(name).options()`` lists them).

    An ``out`` file that already holds draws is refused unless ``overwrite=True`` (the old
    file is replaced once the new run has written its first batch) or ``resume=True``,
    which continues an interrupted file of the same model, engine, seed, batch size and
    proposal to ``n``: the file and the result equal an uninterrupted run's (engines
    importance, rejection and qrs; see :mod:`kldsl.sink`). An engine that continues runs
    of its own (``variational``'s ``output_dir``) gets ``resume`` and ``overwrite`` itself.
    Runs whose samples or batches would not fit in memory fail before they start
    (:mod:`kldsl.budget`).

    A model with distributional constraints (``| mean(φ) == μ``) is refused until its λ
    is fitted: run the engine on ``kl.fit_moments(model, ...).model``; the fit's numbers
    then appear in the result's ``info["moment_fit"]``.
    """
    if not isinstance(model, Model):
        raise KldslError(f"infer() takes a model graph; got {type(model).__name__}")
    if not isinstance(n, int) or n <= 0:
        raise KldslError(f"n must be a positive number of samples, got {n!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise KldslError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_runtime(runtime)
    chosen = get_engine(engine)
    if chosen.fits and Runtime.of(runtime).name != "hf":
        raise KldslError(
            f"engine {engine!r} fine-tunes, and training (rollouts included) runs on the hf "
            f"runtime; drop runtime={Runtime.of(runtime).name!r} (hf takes device= and dtype=)"
        )
    unknown = set(options) - set(chosen.options())
    if unknown:
        raise KldslError(
            f"engine {engine!r} has no option {', '.join(sorted(unknown))}; "
            f"its options: {', '.join(chosen.options()) or 'none'}"
        )
    if proposal is not None and not chosen.takes_proposal:
        can = ", ".join(k for k in sorted(_registry()) if get_engine(k).takes_proposal)
        raise KldslError(
            f"engine {engine!r} takes no proposal= (it does not draw from a proposal); drop "
            f"proposal=, or use an engine that does: {can}"
        )
    own = [k for k in ("resume", "overwrite") if k in chosen.options()]
    for key, value in (("resume", resume), ("overwrite", overwrite)):
        if key in own and value:
            options[key] = value
    if resume and out is not None and not chosen.resumable:
        can = ", ".join(name for name in sorted(_registry()) if get_engine(name).resumable)
        raise KldslError(
            f"engine {engine!r} cannot resume an out= file (it does not draw in seeded "
            f"batches that can be read back); the engines that can: {can}"
        )
    if resume and out is None and "resume" not in own:
        raise KldslError(
            f"resume=True continues an interrupted out= file: pass out= the file to continue "
            f"(engine {engine!r} has no run of its own to resume)"
        )
    if resume and out is not None and not isinstance(seed, int):
        raise KldslError(f"resume=True needs the integer seed of the run to continue, got {seed!r}")
    model.check()
    unfitted = moments_of(model)
    if unfitted:  # explicit: λ comes from kl.fit_moments, whose report the user sees
        raise unfitted_error(unfitted[0])
    if chosen.batched:
        budget.check_samples(model, n)  # before anything is loaded or written
    sink = None
    if out is not None:
        manifest = {
            "model": str(model),
            "engine": engine,
            "seed": seed,
            "batch_size": batch_size,
            "proposal": _proposal_name(proposal),
            "options": options,
        }
        sink = Sink(out, manifest, resume=resume and chosen.resumable, overwrite=overwrite)
    ok = False
    try:
        if isinstance(proposal, str | Path):
            proposal = resolve(str(proposal), runtime)
        target = Target(model, proposal, sink=sink, runtime=runtime)
        if chosen.batched:
            budget.check_batch(target, batch_size, n)
        result = chosen.run(
            target,
            n=n,
            generator=make_generator(seed),
            batch_size=batch_size,
            progress=progress,
            **options,
        )
        ok = True
        fitted = fit_of(model)
        if fitted is not None:  # a graph kl.fit_moments compiled: say how λ was fitted
            result.info["moment_fit"] = fitted.info()
        return result
    finally:
        if sink is not None:
            sink.close(ok=ok)


def _proposal_name(proposal: LM | str | Path | None) -> str:
    """What the manifest records as the proposal: a model name or folder, or an LM's name."""
    if proposal is None:
        return "the prior"
    if isinstance(proposal, str | Path):
        return str(proposal)
    return proposal.name
