"""kldsl: a probabilistic-programming language for language-model posteriors.

Example:
    >>> import kldsl as kl
    >>> posterior = kl.prior("smollm2", max_tokens=40) * kl.exp(kl.sentiment / 0.2) | ~kl.curse
    >>> print(str(posterior))
    prior(smollm2, max_tokens=40) * exp(sentiment / 0.2) | not curse
"""

from kldsl.backends.qrs import qrs_sweep
from kldsl.builtins import contains, curse, length, offensive, regex, reward_model, sentiment
from kldsl.errors import (
    KldslError,
    KldslInferenceError,
    KldslModelLoadError,
    KldslNameError,
    KldslRewardError,
    KldslSyntaxError,
    KldslTypeError,
)
from kldsl.fit import Fit
from kldsl.graph import (
    Condition,
    Constraint,
    ConstraintExpr,
    Density,
    Model,
    Power,
    Prior,
    Product,
    Reward,
    RewardExpr,
    Tilt,
    constraint,
    exp,
    prior,
    reward,
)
from kldsl.infer import Engine, engines, get_engine, infer
from kldsl.lm import LM, SampleBatch, ToyLM
from kldsl.parser import load, parse
from kldsl.pyro_bridge import pyro_guide, to_pyro
from kldsl.samples import Samples
from kldsl.target import Draw, Target

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
    "Model",
    "Power",
    "Prior",
    "Product",
    "Reward",
    "RewardExpr",
    "SampleBatch",
    "Tilt",
    "ToyLM",
    "constraint",
    "contains",
    "curse",
    "engines",
    "exp",
    "get_engine",
    "infer",
    "qrs_sweep",
    "length",
    "load",
    "offensive",
    "parse",
    "prior",
    "pyro_guide",
    "regex",
    "reward",
    "reward_model",
    "sentiment",
    "to_pyro",
]
