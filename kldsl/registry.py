"""Name resolution: the LM that runs a prior's model (a name or an LM object), per runtime.

A :class:`~kldsl.graph.Prior` only names its model; nothing is loaded while a graph is
built, printed or explained. :func:`resolve` turns a prior (or a model name, or an LM) into
an :class:`~kldsl.lm.LM` for a runtime; :class:`kldsl.Target` (and so ``kl.infer``)
resolves every prior of a model once and hands the LMs to the density interpreter, so
evaluating a graph from an engine loads nothing itself. A name is loaded once per process
and runtime (each runtime's loader caches what it loads).

Example:
    >>> import kldsl as kl
    >>> lm = kl.ToyLM()
    >>> resolve(kl.prior(lm)) is lm
    True
    >>> try:
    ...     resolve("smollm2", runtime="vllm")
    ... except kl.KldslNameError as err:
    ...     print(err)
    unknown runtime 'vllm'
      known: hf
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from kldsl import models
from kldsl.errors import KldslNameError, KldslTypeError
from kldsl.graph import Prior, shown
from kldsl.lm import LM

#: An LM for each model a prior names (a name or an LM object: ``Prior.model``), as
#: :attr:`kldsl.Target.lms` holds them; keyed by the model, not the prior, so a rewritten
#: graph (another prompt, a softened constraint) finds the same LMs.
LMs = Mapping[LM | str, LM]


def _load_hf(name: str) -> LM:
    return models.load_lm(name)  # looked up on each call: tests may replace it


#: Each runtime's loader of a model name (each caches what it loads, once per process).
RUNTIMES: dict[str, Callable[[str], LM]] = {"hf": _load_hf}


def check_runtime(runtime: str) -> str:
    """``runtime`` when it is a known runtime, else a :class:`KldslNameError` listing them."""
    if not isinstance(runtime, str) or runtime not in RUNTIMES:
        raise KldslNameError(str(runtime), RUNTIMES, what="runtime")
    return runtime


def resolve(prior_or_name: Prior | LM | str, runtime: str = "hf") -> LM:
    """The LM of a prior (or of a model name: embedded name, folder or hub name) on
    ``runtime``; an LM object is itself. A name is loaded on first use and cached per
    process; a model that cannot be loaded raises :class:`KldslModelLoadError`."""
    check_runtime(runtime)
    model = prior_or_name.model if isinstance(prior_or_name, Prior) else prior_or_name
    if isinstance(model, LM):
        return model
    if not isinstance(model, str):
        raise KldslTypeError(f"resolve() takes a prior, an LM or a model name; got {shown(model)}")
    return RUNTIMES[runtime](model)


def resolve_all(priors: list[Prior], runtime: str = "hf") -> dict[LM | str, LM]:
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
