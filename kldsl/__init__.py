"""kldsl: a probabilistic-programming language for language-model posteriors.

Example:
    >>> import kldsl as kl
    >>> posterior = kl.prior("smollm2", max_tokens=40) * kl.exp(kl.sentiment / 0.2) | ~kl.curse
    >>> print(str(posterior))
    prior(smollm2, max_tokens=40) * exp(sentiment / 0.2) | not curse
"""

from kldsl.builtins import contains, curse, length, offensive, regex, reward_model, sentiment
from kldsl.errors import (
    KldslError,
    KldslInferenceError,
    KldslModelLoadError,
    KldslNameError,
    KldslRewardError,
    KldslSyntaxError,
    KldslTypeError,
    KldslValueError,
)
from kldsl.fit import Fit
from kldsl.graph import (
    Condition,
    Constraint,
    ConstraintExpr,
    Density,
    Model,
    Moment,
    MomentCondition,
    Power,
    Prior,
    Product,
    Reward,
    RewardExpr,
    Tilt,
    constraint,
    exp,
    indicator,
    mean,
    prior,
    reward,
)
from kldsl.infer import Engine, engines, get_engine, infer
from kldsl.lm import LM, SampleBatch, ToyLM
from kldsl.moments import MomentFit, fit_moments
from kldsl.parser import load, parse
from kldsl.pyro_bridge import pyro_guide, to_pyro
from kldsl.registry import Runtime, resolve
from kldsl.samples import Samples
from kldsl.target import Draw, Target
from kldsl.transforms import soften, with_prompt
from kldsl.vllm import VLLM

__all__ = [
    "LM",
    "Condition",
    "Constraint",
    "ConstraintExpr",
    "Density",
    "Draw",
    "Engine",
    "Fit",
    "Samples",
    "Target",
    "KldslError",
    "KldslInferenceError",
    "KldslModelLoadError",
    "KldslNameError",
    "KldslRewardError",
    "KldslSyntaxError",
    "KldslTypeError",
    "KldslValueError",
    "Model",
    "Moment",
    "MomentCondition",
    "MomentFit",
    "Power",
    "Prior",
    "Product",
    "Reward",
    "RewardExpr",
    "Runtime",
    "SampleBatch",
    "Tilt",
    "ToyLM",
    "VLLM",
    "constraint",
    "contains",
    "curse",
    "engines",
    "exp",
    "fit_moments",
    "get_engine",
    "indicator",
    "infer",
    "qrs_sweep",
    "length",
    "load",
    "mean",
    "offensive",
    "parse",
    "prior",
    "pyro_guide",
    "regex",
    "reward",
    "resolve",
    "reward_model",
    "sentiment",
    "soften",
    "to_pyro",
    "with_prompt",
]


def __getattr__(name: str):
    # qrs_sweep belongs to the qrs engine: loaded on first use, so importing kldsl's core
    # never imports an engine
    if name == "qrs_sweep":
        from kldsl.backends.qrs import qrs_sweep

        return qrs_sweep
    if name in ("log_z_bounds", "LogZBounds"):  # the smc engine's, loaded the same way
        from kldsl.backends import smc

        return getattr(smc, name)
    raise AttributeError(f"module 'kldsl' has no attribute {name!r}")
