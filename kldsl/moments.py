"""Fitting distributional constraints: ``| mean(φ) == μ`` compiled into ``* exp(φ * λ)``.

A model with distributional constraints denotes the I-projection of its pointwise part
p₀(x) ∝ a(x)·[tilts]·[hard constraints] onto the set of distributions with E[φ_k] = μ_k:

    p*(x) ∝ p₀(x)·exp(Σ_k λ_k·φ_k(x)),   λ such that E_p*[φ_k] = μ_k,

the distribution closest to p₀ in KL(·‖p₀) with those means (GDC's exponential family).
:func:`fit_moments` draws a sample of p₀ with any sampling engine and solves the convex
dual on it,

    λ̂ = argmin_λ log Σ_i w̄_i·exp(λ·(φ(x_i) − μ))     (w̄: the sample's normalised weights),

by Newton's method with a backtracking line search (the gradient is E_λ[φ] − μ, the
Hessian Cov_λ[φ]). The result's ``model`` is the graph rewritten with the fitted λ
(:func:`kldsl.transforms.compile_moments`): an ordinary tilt that every engine runs
unchanged, and that a bounded feature keeps bounded (rejection sampling's bound).

``kl.infer`` refuses a model whose moments are not fitted, so what λ is and how it was
estimated is always explicit; fits are cached by model and settings, so fitting again
(e.g. before a second engine) reuses the first fit.

Example:
    >>> import kldsl as kl
    >>> m = kl.prior(kl.ToyLM(), max_tokens=3) | (kl.mean(kl.indicator(kl.contains("a"))) == 0.5)
    >>> fit = kl.fit_moments(m, n=2000, seed=0, engine="exact")
    >>> round(fit.achieved[0], 6)
    0.5
    >>> str(fit.model).startswith('prior(toy, max_tokens=3) * exp(indicator(contains("a")) * ')
    True
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kldsl import weights
from kldsl.density import Batch
from kldsl.errors import KldslError, KldslInferenceError, KldslTypeError, shorten
from kldsl.graph import Model, Moment, shown
from kldsl.transforms import compile_moments, moments_of, strip_moments

#: The fits kept in memory (by declared model and settings; by compiled model).
CACHE_SIZE = 64
#: Newton stops when every |E_λ[φ_k] − μ_k| is below this times φ_k's spread on the sample.
TOLERANCE = 1e-9
#: |λ·spread| above this means λ runs off to infinity: μ is on or outside the hull.
LAMBDA_LIMIT = 200.0
#: A tilted feature variance below this (in units of spread²) at the solution means the
#: mass sits on a face of the hull (a mean at the edge of what the sample reaches).
FLAT = 1e-7


@dataclass(frozen=True)
class MomentFit:
    """Fitted distributional constraints: the compiled ``model`` and how λ was estimated.

    Per constraint (in ``moments`` order): ``lambdas`` and their standard errors
    ``lambda_se``, the means ``achieved`` under the fitted λ on the fitting sample (μ up to
    the solver's tolerance) with their Monte Carlo standard errors ``achieved_se``, and the
    means under the pointwise model p₀ (``base_means``, λ = 0); the errors are 0 when the
    exact engine enumerated every sequence. ``ess`` is the fitting
    sample's effective size under the fitted λ, ``n`` its size, ``rounds`` how many samples
    were drawn (more than one when the ESS was too low), ``notes`` what happened.
    """

    declared: Model  # the model with its `| mean(φ) == μ` constraints
    model: Model  # the compiled graph: each constraint an exp(φ * λ) tilt
    moments: tuple[Moment, ...]
    lambdas: tuple[float, ...]
    lambda_se: tuple[float, ...]
    achieved: tuple[float, ...]
    achieved_se: tuple[float, ...]
    base_means: tuple[float, ...]
    iterations: int  # Newton iterations of the last round
    n: int  # size of the fitting sample of the last round
    ess: float  # its ESS under the fitted λ
    rounds: int
    engine: str  # the engine that drew the fitting sample
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line per constraint (λ, achieved mean ± se, p₀'s mean) and the fit's numbers."""
        lines = []
        for m, lam, lam_se, got, se, base in zip(
            self.moments,
            self.lambdas,
            self.lambda_se,
            self.achieved,
            self.achieved_se,
            self.base_means,
        ):
            lines.append(
                f"{m}: λ = {lam:.4g} ± {lam_se:.2g}, mean {got:.4g} ± {se:.2g} "
                f"(without it {base:.4g})"
            )
        sample = (
            f"all {self.n} sequences (exact)"
            if self.engine == "exact"
            else f"{self.n} samples ({self.engine}, ESS {self.ess:.1f} under λ)"
        )
        lines.append(
            f"fitted on {sample}, {self.iterations} Newton iterations, {self.rounds} round(s)"
        )
        return "\n".join([*lines, *self.notes])

    def info(self) -> dict[str, Any]:
        """The fit as plain numbers (for a JSON record or ``Samples.info``)."""
        return {
            "moments": [str(m) for m in self.moments],
            "lambdas": list(self.lambdas),
            "lambda_se": list(self.lambda_se),
            "achieved": list(self.achieved),
            "achieved_se": list(self.achieved_se),
            "base_means": list(self.base_means),
            "iterations": self.iterations,
            "n": self.n,
            "ess": self.ess,
            "rounds": self.rounds,
            "engine": self.engine,
        }

    def __repr__(self) -> str:
        return f"MomentFit({', '.join(f'{m}: λ={lam:.4g}' for m, lam in zip(self.moments, self.lambdas))})"


@dataclass(frozen=True)
class Dual:
    """The solution of the dual on one weighted sample."""

    lambdas: Tensor  # [K] float64
    iterations: int
    converged: bool
    gradient: Tensor  # [K]: E_λ[φ] − μ at the solution


def solve_dual(
    features: Tensor,
    log_w: Tensor,
    targets: Tensor,
    *,
    tol: float = TOLERANCE,
    max_iter: int = 100,
) -> Dual:
    """λ minimising log Σ_i w̄_i·exp(λ·(φ_i − μ)) (convex), by damped Newton.

    ``features`` [N, K], ``log_w`` [N] (−inf: no weight), ``targets`` [K]. Stops when
    every |E_λ[φ_k] − μ_k| ≤ ``tol``·spread_k; ``converged`` is False after ``max_iter``
    iterations or when λ runs off (μ on or outside the convex hull of the sample: λ grows
    without bound, or the tilted features stop varying).

    Example:
        >>> phi = torch.tensor([[0.0], [1.0], [1.0], [0.0]], dtype=torch.float64)
        >>> dual = solve_dual(phi, torch.zeros(4, dtype=torch.float64), torch.tensor([0.75]))
        >>> round(float(dual.lambdas[0]), 6)  # log 3: odds 1:1 → 3:1
        1.098612
    """
    keep = torch.isfinite(log_w)
    phi = features[keep].double() - targets.double()
    log_w = weights.normalize(log_w[keep].double())
    spread = (phi.max(0).values - phi.min(0).values).clamp_min(1e-300)
    k = phi.shape[1]
    lam = torch.zeros(k, dtype=torch.float64)

    def objective(lam: Tensor) -> Tensor:
        return torch.logsumexp(log_w + phi @ lam, 0)

    value = objective(lam)
    grad = torch.zeros(k, dtype=torch.float64)
    for it in range(max_iter + 1):
        p = torch.softmax(log_w + phi @ lam, 0)
        grad = p @ phi
        centred = phi - grad
        hess = (centred * p[:, None]).T @ centred
        if bool((grad.abs() <= tol * spread).all()):
            # at an interior solution the tilted features still vary; a vanishing variance
            # means the mass piled onto a face of the hull: μ is on its edge, λ infinite
            scaled = hess / torch.outer(spread, spread)
            flat = float(torch.linalg.eigvalsh(scaled).min()) < FLAT
            return Dual(lam, it, not flat, grad)
        if it == max_iter or bool(((lam * spread).abs() > LAMBDA_LIMIT).any()):
            break
        hess = hess + 1e-12 * torch.diag(spread**2)  # a flat direction stays finite
        step = -torch.linalg.solve(hess, grad)
        t, slope = 1.0, float(grad @ step)
        while True:  # backtracking (Armijo): Newton's full step is taken near the optimum
            new = objective(lam + t * step)
            if float(new) <= float(value) + 1e-4 * t * slope or t < 1e-10:
                break
            t *= 0.5
        lam, value = lam + t * step, new
    return Dual(lam, it, False, grad)


_FITS: OrderedDict[tuple, MomentFit] = OrderedDict()
_COMPILED: OrderedDict[Model, MomentFit] = OrderedDict()


def fit_of(model: Model) -> MomentFit | None:
    """The fit that compiled ``model`` (:attr:`MomentFit.model`), if this process made it."""
    return _COMPILED.get(model)


def _remember(key: tuple, fit: MomentFit) -> None:
    for memo, k in ((_FITS, key), (_COMPILED, fit.model)):
        memo[k] = fit
        memo.move_to_end(k)
        while len(memo) > CACHE_SIZE:
            memo.popitem(last=False)


def fit_moments(
    model: Model,
    *,
    n: int = 1024,
    seed: int = 0,
    engine: str = "importance",
    min_ess: float = 100.0,
    max_rounds: int = 3,
    tol: float = TOLERANCE,
    max_iter: int = 100,
    progress: bool | None = None,
    **options: Any,
) -> MomentFit:
    """Fit λ of every ``| mean(φ) == μ`` of ``model``; the result's ``model`` is compiled.

    Draws ``n`` samples of the pointwise model with ``engine`` (``kl.infer`` with ``seed``,
    ``progress`` and ``options``, e.g. ``proposal=``), evaluates the features and solves
    the dual (see the module). When the fitting sample's ESS under the fitted λ is below
    ``min_ess``, it draws again from the model tilted by the λ found so far, with twice
    as many samples, up to ``max_rounds`` samples in all, and says so (a warning and the
    fit's ``notes``). Fits are cached: the same model and settings return the same fit.

    Raises :class:`kldsl.KldslInferenceError` when a μ is outside what the sample reaches
    (naming the feature, μ and the range), when the solver does not converge, or when
    the ESS stays too low.
    """
    model.check()
    moments = moments_of(model)
    if not moments:
        raise KldslTypeError(
            f"`{shown(model)}` has no distributional constraint to fit; add one with "
            "`| mean(φ) == μ` (Python: `model | (kl.mean(φ) == μ)`)"
        )
    features = [m.feature for m in moments]
    for i, f in enumerate(features):
        if f in features[:i]:
            raise KldslTypeError(
                f"`mean({shown(f)})` is constrained twice; keep one `| mean({shown(f)}) == μ`"
            )
    if isinstance(min_ess, bool) or not isinstance(min_ess, int | float) or min_ess < 1:
        raise KldslTypeError(f"min_ess must be a number ≥ 1, got {min_ess!r}")
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise KldslTypeError(f"max_rounds must be a positive integer, got {max_rounds!r}")
    key = (model, n, seed, engine, float(min_ess), max_rounds, tol, max_iter, _frozen(options))
    if key in _FITS:
        return _FITS[key]

    from kldsl.infer import infer  # fit_moments is called from user code and the CLI

    targets = torch.tensor([m.value for m in moments], dtype=torch.float64)
    lambdas = torch.zeros(len(moments), dtype=torch.float64)
    notes: list[str] = []
    size = n
    for round_ in range(1, max_rounds + 1):
        current = _compiled(model, moments, lambdas) if round_ > 1 else strip_moments(model)
        samples = infer(
            current, engine=engine, n=size, seed=seed + round_ - 1, progress=progress, **options
        )
        phi = _features(samples, moments)
        # weights relative to p₀: the sample's weights are relative to the current tilt
        log_w = samples.log_weights.double() - phi @ lambdas
        _check_reachable(moments, phi, log_w, len(samples), engine)
        base_means = weights.normalize(log_w).exp() @ torch.where(
            torch.isfinite(log_w)[:, None], phi, 0.0
        )
        dual = solve_dual(phi, log_w, targets, tol=tol, max_iter=max_iter)
        if not dual.converged:
            raise _not_converged(moments, dual, len(samples), max_iter)
        log_fitted = log_w + phi @ dual.lambdas
        ess = weights.ess(log_fitted)
        lambdas = dual.lambdas
        exact = samples.engine == "exact"  # every sequence, exact weights: no sampling error
        if exact or ess >= min_ess:
            break
        if round_ == max_rounds:
            raise KldslInferenceError(
                f"the fitting sample has an effective size of {ess:.1f} under the fitted λ "
                f"(below min_ess = {min_ess:g}) after {max_rounds} rounds of up to {size} "
                "samples: the constraint moves the posterior far from what the sampler "
                "draws. Try a larger n, a proposal= closer to the target (a model "
                "fine-tuned toward it), an engine that samples the tilted target (e.g. "
                'engine="rejection" for bounded features), or a lower min_ess'
            )
        note = (
            f"round {round_}: ESS {ess:.1f} of {len(samples)} samples under λ is below "
            f"min_ess = {min_ess:g}; drawing {2 * size} samples from the target tilted by λ"
        )
        warnings.warn(note, stacklevel=2)
        notes.append(note)
        size *= 2
    p = weights.normalize(log_fitted).exp()
    kept = torch.isfinite(log_fitted)
    centred = torch.where(kept[:, None], phi - dual.gradient - targets, 0.0)
    hess = (centred * p[:, None]).T @ centred
    # Monte Carlo covariance of the self-normalised means, and of λ̂ by the delta method
    cov_mean = (centred * (p**2)[:, None]).T @ centred * (0.0 if exact else 1.0)
    h_inv = torch.linalg.pinv(hess)
    cov_lambda = h_inv @ cov_mean @ h_inv
    fit = MomentFit(
        declared=model,
        model=_compiled(model, moments, lambdas),
        moments=tuple(moments),
        lambdas=tuple(float(v) for v in lambdas),
        lambda_se=tuple(math.sqrt(max(float(v), 0.0)) for v in cov_lambda.diagonal()),
        achieved=tuple(float(v) for v in dual.gradient + targets),
        achieved_se=tuple(math.sqrt(max(float(v), 0.0)) for v in cov_mean.diagonal()),
        base_means=tuple(float(v) for v in base_means),
        iterations=dual.iterations,
        n=len(samples),
        ess=ess,
        rounds=round_,
        engine=engine,
        notes=tuple(notes),
    )
    _remember(key, fit)
    return fit


def _compiled(model: Model, moments: list[Moment], lambdas: Tensor) -> Model:
    return compile_moments(model, {m: float(v) for m, v in zip(moments, lambdas)})


def _features(samples: Any, moments: list[Moment]) -> Tensor:
    """φ_k of every sample [N, K] (leaf values computed once for all features)."""
    batch = Batch(samples.model.base(), samples.ids, samples.texts, 64, {})
    return torch.stack([batch.value(m.feature).double() for m in moments], 1)


def _check_reachable(
    moments: list[Moment], phi: Tensor, log_w: Tensor, n: int, engine: str
) -> None:
    """μ_k must lie strictly between the least and greatest φ_k on the weighted sample."""
    keep = torch.isfinite(log_w)
    if not bool(keep.any()):
        raise KldslInferenceError(
            f"none of the {n} fitting samples ({engine}) has weight under the pointwise "
            "model; try a larger n or a proposal that meets its hard constraints"
        )
    for k, m in enumerate(moments):
        lo, hi = float(phi[keep, k].min()), float(phi[keep, k].max())
        if not lo < m.value < hi:
            raise KldslInferenceError(
                f"`{shorten(str(m))}` is out of reach: on the {int(keep.sum())} fitting samples "
                f"({engine}) `{shorten(str(m.feature))}` takes values in [{lo:.4g}, {hi:.4g}], "
                f"and a mean of {m.value:g} needs samples on both sides of it. Try a larger "
                "n, a proposal= that produces such samples, or a μ inside that range"
            )


def _not_converged(moments: list[Moment], dual: Dual, n: int, max_iter: int) -> KldslError:
    names = ", ".join(f"`{shorten(str(m))}`" for m in moments)
    gaps = ", ".join(f"{float(g):.2g}" for g in dual.gradient)
    if dual.iterations < max_iter:  # λ ran off: the means are not reachable together
        return KldslInferenceError(
            f"{names} cannot hold together on the {n} fitting samples: λ runs off to "
            f"infinity (λ = {[round(float(v), 3) for v in dual.lambdas]}), so the targets lie "
            "outside the convex hull of the features over the sample. Check that the means "
            "are compatible, or try a larger n"
        )
    return KldslInferenceError(
        f"the fit of {names} did not converge in {max_iter} Newton iterations (E[φ] − μ = "
        f"{gaps}); try a larger max_iter or n, or a μ further from the edge of what the "
        "sample reaches"
    )


def _frozen(options: dict[str, Any]) -> tuple:
    """``options`` as a hashable key (objects by identity)."""
    out = []
    for k, v in sorted(options.items()):
        try:
            hash(v)
        except TypeError:
            v = ("id", id(v))
        out.append((k, v))
    return tuple(out)
