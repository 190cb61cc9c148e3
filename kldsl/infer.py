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
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from kldsl.errors import KldslError, KldslNameError
from kldsl.graph import Model
from kldsl.lm import LM, make_generator
from kldsl.target import Target, open_sink


@dataclass(frozen=True)
class Engine:
    """An inference engine: ``run(target, *, n, generator, batch_size, progress, **options)``."""

    name: str
    description: str  # one line, shown by `kldsl engines`
    run: Callable[..., Any]

    def options(self) -> list[str]:
        """The engine's own keyword options."""
        params = inspect.signature(self.run).parameters
        common = {"target", "n", "generator", "batch_size", "progress"}
        return [p for p in params if p not in common]


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


def infer(
    model: Model,
    engine: str = "importance",
    n: int = 256,
    seed: int = 0,
    proposal: LM | str | Path | None = None,
    batch_size: int = 64,
    out: str | Path | None = None,
    progress: bool | None = None,
    **options: Any,
) -> Any:
    """Approximate the posterior of ``model`` with ``engine``.

    ``proposal`` is any LM (or a model name / folder) to draw from instead of the prior;
    ``out`` streams every draw to a JSON-lines file as it is made, so a failure later
    loses no finished batch; ``progress`` shows a progress bar (default: on a terminal).
    The same seed gives the same samples. Engine options go in ``options``
    (``kl.get_engine(name).options()`` lists them).
    """
    if not isinstance(model, Model):
        raise KldslError(f"infer() takes a model graph; got {type(model).__name__}")
    if not isinstance(n, int) or n <= 0:
        raise KldslError(f"n must be a positive number of samples, got {n!r}")
    if batch_size <= 0:
        raise KldslError(f"batch_size must be positive, got {batch_size!r}")
    chosen = get_engine(engine)
    unknown = set(options) - set(chosen.options())
    if unknown:
        raise KldslError(
            f"engine {engine!r} has no option {', '.join(sorted(unknown))}; "
            f"its options: {', '.join(chosen.options()) or 'none'}"
        )
    if isinstance(proposal, str | Path):
        from kldsl.models import load_lm

        proposal = load_lm(str(proposal))
    sink = open_sink(out)
    try:
        target = Target(model, proposal, sink=sink)
        return chosen.run(
            target,
            n=n,
            generator=make_generator(seed),
            batch_size=batch_size,
            progress=progress,
            **options,
        )
    finally:
        if sink is not None:
            sink.close()
