"""Name resolution: the LM that runs a prior's model (a name or an LM object), per runtime.

A :class:`~kldsl.graph.Prior` only names its model; nothing is loaded while a graph is
built, printed or explained. :func:`resolve` turns a prior (or a model name, or an LM) into
an :class:`~kldsl.lm.LM` for a runtime; :class:`kldsl.Target` (and so ``kl.infer``)
resolves every prior of a model once and hands the LMs to the density interpreter, so
evaluating a graph from an engine loads nothing itself. A name is loaded once per process,
runtime and options (each runtime's loader caches what it loads).

Runtimes: ``"hf"`` (Hugging Face transformers, the default; options ``device`` and
``dtype``) and ``"vllm"`` (vLLM's offline engine, :class:`kldsl.vllm.VLLM`; options go to
``vllm.LLM``). A :class:`Runtime` carries a runtime's name and options wherever a runtime
name goes.

Example:
    >>> import kldsl as kl
    >>> lm = kl.ToyLM()
    >>> resolve(kl.prior(lm)) is lm
    True
    >>> Runtime.of("hf", dtype="bfloat16")
    Runtime(name='hf', options=(('dtype', 'bfloat16'),))
    >>> try:
    ...     resolve("smollm2", runtime="onnx")
    ... except kl.KldslNameError as err:
    ...     print(err)
    unknown runtime 'onnx'
      known: hf, vllm
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kldsl import models
from kldsl.errors import KldslNameError, KldslTypeError
from kldsl.graph import Prior, shown
from kldsl.lm import LM

#: An LM for each model a prior names (a name or an LM object: ``Prior.model``), as
#: :attr:`kldsl.Target.lms` holds them; keyed by the model, not the prior, so a rewritten
#: graph (another prompt, a softened constraint) finds the same LMs.
LMs = Mapping[LM | str, LM]


def _load_hf(name: str, **options: Any) -> LM:
    # looked up on each call: tests may replace it
    return models.load_lm(name, **options) if options else models.load_lm(name)


def _load_vllm(name: str, **options: Any) -> LM:
    from kldsl import vllm

    return vllm.load(name, **options)


#: Each runtime's loader of a model name, taking the runtime's options as keywords (each
#: caches what it loads, once per process and options).
RUNTIMES: dict[str, Callable[..., LM]] = {"hf": _load_hf, "vllm": _load_vllm}


@dataclass(frozen=True)
class Runtime:
    """A runtime's name and its options (sorted ``(key, value)`` pairs, so it hashes).

    Example:
        >>> Runtime.of("vllm", tensor_parallel_size=2).kwargs
        {'tensor_parallel_size': 2}
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, runtime: str | Runtime, **options: Any) -> Runtime:
        """A checked runtime from a name (or a Runtime) and more options."""
        if isinstance(runtime, Runtime):
            options = {**runtime.kwargs, **options}
            runtime = runtime.name
        if not isinstance(runtime, str) or runtime not in RUNTIMES:
            raise KldslNameError(str(runtime), RUNTIMES, what="runtime")
        return cls(runtime, tuple(sorted(options.items())))

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


def check_runtime(runtime: str | Runtime) -> str | Runtime:
    """``runtime`` when it names a known runtime, else a :class:`KldslNameError` listing them."""
    Runtime.of(runtime)
    return runtime


def resolve(prior_or_name: Prior | LM | str, runtime: str | Runtime = "hf", **options: Any) -> LM:
    """The LM of a prior (or of a model name: embedded name, folder or hub name) on
    ``runtime`` with its ``options`` (hf: ``device``, ``dtype``; vllm: those of
    ``vllm.LLM``); an LM object is itself. A name is loaded on first use and cached per
    process and options; a model that cannot be loaded raises :class:`KldslModelLoadError`."""
    chosen = Runtime.of(runtime, **options)
    model = prior_or_name.model if isinstance(prior_or_name, Prior) else prior_or_name
    if isinstance(model, LM):
        return model
    if not isinstance(model, str):
        raise KldslTypeError(f"resolve() takes a prior, an LM or a model name; got {shown(model)}")
    return RUNTIMES[chosen.name](model, **chosen.kwargs)


def resolve_all(priors: list[Prior], runtime: str | Runtime = "hf") -> dict[LM | str, LM]:
    """An LM for each model the priors name, each resolved once (see :data:`LMs`)."""
    out: dict[LM | str, LM] = {}
    for prior in priors:
        if prior.model not in out:
            out[prior.model] = resolve(prior, runtime)
    return out


def lm_of(prior: Prior, lms: LMs | None = None) -> LM:
    """The LM of ``prior`` from ``lms`` (what a caller such as a Target resolved), or, when
    ``lms`` is None (a user calling the interpreter directly), from :func:`resolve`: that
    resolves names now. A prior missing from a given ``lms`` is an error, never a load."""
    if lms is None:
        return resolve(prior)
    if prior.model not in lms:
        raise KldslTypeError(
            f"no LM was resolved for `{prior}`; resolve every prior of the model "
            "(kldsl.registry.resolve_all) before evaluating it"
        )
    return lms[prior.model]
