"""Sequential Monte Carlo over tokens: particles grow one token per step and are resampled.

Each of ``n`` particles extends by one token per step from the proposal q (the prior by
default) and multiplies into its weight the target's factor for that token over q's:

    log w += Σ_j α_j·log a_j(x_t | x_<t) − log q(x_t | x_<t)  (+ log ψ_t − log ψ_{t−1})

over the base prior and every expert (each with a :class:`~kldsl.lm.Decoding` of its
own). A hard constraint is checked on every prefix (:mod:`kldsl.prefix`, sound: a
particle dies only when no extension can satisfy it); tilts and constraints contribute
their exact values (the density interpreter's) when a particle finishes, at EOS or
``max_tokens``, replacing the last twist ψ. So the final weights are properly weighted
for p* whatever the twist, and log Ẑ (the product of the mean weights at every
resampling step and at the end) is unbiased for Z in Ẑ (Del Moral 2004). Finished
particles leave the batch (and the KV cache) but stay in the population; the population
is resampled when its ESS falls below ``ess_threshold``·n, by reordering KV-cache rows.

``token_sampler="awrs"`` draws each token only among those that keep the particle alive
(:func:`kldsl.awrs.awrs`), with the estimated valid mass as an extra weight factor; its
rejection chain runs to ``awrs_hits`` valid draws (32), since the paper's 2 leave a
noise in that factor that, compounded over the tokens, dominates the spread of log Ẑ.
``split_eos=True`` sums over ending instead of sampling it: at every step but the last,
each particle also spawns a finished copy that ends there (EOS), weighted by its exact
value w·Π a_j(EOS)^α_j·(exact factors)/ψ, and the particle itself continues with a token
drawn from q without EOS (weight factor 1 − q(EOS) for ``direct``; ``awrs`` estimates the
valid mass without EOS). The two branches' weights sum, in expectation, to the unsplit
particle's, so Ẑ stays unbiased (normalised by n, the particles at the last resampling);
resampling draws n particles from the population, branches included. It pays where p*
favours ending early, as hard constraints over long texts do: the short completions that
dominate Z there are counted in every run instead of found by chance.
Conditional SMC (one particle clamped to an exact posterior sample) gives the upper side
of :func:`log_z_bounds`, and iterated it is particle Gibbs (``gibbs=K``,
:func:`particle_gibbs_step`): a Markov chain over whole sequences that leaves p* invariant.

    kl.infer(model, engine="smc", n=64, twist="prefix")
    kl.infer(model, engine="smc", n=16, gibbs=200)  # 200 chain states, 16 particles a sweep
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kldsl import weights
from kldsl.awrs import awrs, check_hits
from kldsl.chains import chain_summary
from kldsl.density import Batch, factors_of, full_values, unknown_node
from kldsl.errors import KldslError, KldslInferenceError
from kldsl.graph import Condition, Model, Power, Prior, Tilt
from kldsl.infer import Engine
from kldsl.lm import LM, Decoding, Ids, draw, make_generator, pick
from kldsl.prefix import prefix_check, prefix_text
from kldsl.progress import bar
from kldsl.samples import Samples, proposal_means
from kldsl.target import Draw, Target, write_jsonl

#: log ψ of a batch of prefix texts (one finite value per text)
TwistFn = Callable[[list[str]], Tensor | Sequence[float]]
TOKEN_SAMPLERS = ("direct", "awrs")
TWISTS = ("prefix",)
#: valid draws that end AWRS's rejection chain per token: the paper's 2 leaves a valid-mass
#: estimate so noisy that over 32 tokens it dominates the spread of log Ẑ (README,
#: Performance: the lipogram's sd over ten seeds 1.26 nat at 2, 0.47 at 8, 0.13 at 32)
AWRS_HITS = 32


@dataclass
class Sweep:
    """One run of the particle system: the final population and its statistics."""

    ids: list[Ids]  # each particle's tokens (a particle killed early keeps its prefix)
    log_w: Tensor  # [n] final log-weights (since the last resampling)
    log_z: float  # log Ẑ (−inf when every particle died)
    log_z_se: float  # its standard error (Lee & Whiteley 2018)
    log_q: Tensor  # [n] log q(x) under the proposal
    base_log_probs: Tensor  # [n] log a(x) under the base prior (untempered)
    ancestor: Tensor  # [n] long: the time-0 particle each descends from
    ess: list[float] = field(default_factory=list)  # population ESS after each step
    resampled: int = 0  # resampling steps
    forwards: int = 0  # token positions run by every decoding (the compute spent)


class _Plan:
    """What each factor of the model contributes per token and at the end: a ``match``
    over the closed factor set, as the density interpreter's."""

    def __init__(self, target: Target, n: int):
        base, lms = target.base, target.lms
        self.decoders: list[Decoding] = [target.proposal.decoder(base.prompt, n, target.max_tokens)]
        keys: dict[tuple[int, str], int] = {(id(target.proposal), base.prompt): 0}
        self.priors: list[tuple[float, int]] = []  # (α, decoder) per prior factor
        self.finals: list[Model] = []  # tilts and conditions: exact at the end
        self.tilts: list[Tilt] = []
        self.base_decoder = 0
        for f in factors_of(target.model):
            match f.node:
                case Prior() | Power():
                    node = f.node
                    prior = node.prior if isinstance(node, Power) else node
                    alpha = node.alpha if isinstance(node, Power) else 1.0
                    lm = lms[prior.model]
                    key = (id(lm), prior.prompt)
                    if key not in keys:
                        keys[key] = len(self.decoders)
                        self.decoders.append(lm.decoder(prior.prompt, n, target.max_tokens))
                    self.priors.append((float(alpha), keys[key]))
                    if f.kind == "prior":
                        self.base_decoder = keys[key]
                case Tilt():
                    self.finals.append(f.node)
                    self.tilts.append(f.node)
                case Condition():
                    self.finals.append(f.node)
                case _:
                    raise unknown_node(f.node, "the smc engine")
        self.target = target

    def batch(self, texts: list[str]) -> Batch:
        """A density-interpreter batch of texts (what tilts and constraints read)."""
        return Batch(self.target.base, [()] * len(texts), texts, 64, {}, self.target.lms)

    def final(self, texts: list[str]) -> Tensor:
        """Σ of the tilts' and constraints' exact log values on finished texts [k]."""
        out = torch.zeros(len(texts), dtype=torch.float64)
        if texts:
            batch = self.batch(texts)
            for node in self.finals:
                out = out + full_values(node, batch)
        return out

    def prefix_tilts(self, texts: list[str]) -> Tensor:
        """``twist="prefix"``: Σ of the tilts' rewards on prefix texts [k]."""
        out = torch.zeros(len(texts), dtype=torch.float64)
        if texts and self.tilts:
            batch = self.batch(texts)
            for node in self.tilts:
                out = out + full_values(node, batch)
        return out


def _twist_fn(twist: str | TwistFn | None, plan: _Plan) -> Callable[[list[str]], Tensor] | None:
    if twist is None:
        return None
    if twist == "prefix":
        return plan.prefix_tilts
    if isinstance(twist, str) or not callable(twist):
        raise KldslError(
            f"twist must be None, 'prefix' or a function of prefix texts returning log ψ; "
            f"got {twist!r}"
        )
    fn = twist

    def checked(texts: list[str]) -> Tensor:
        values = torch.as_tensor(fn(texts), dtype=torch.float64).reshape(-1)
        if len(values) != len(texts) or not bool(torch.isfinite(values).all()):
            raise KldslInferenceError(
                f"the twist returned {values.tolist()[:4]}... for {len(texts)} prefix texts; "
                "it must return one finite log ψ per text"
            )
        return values

    return checked


def check_options(
    ess_threshold: float, resampling: str, token_sampler: str, awrs_hits: int = AWRS_HITS
) -> None:
    """Raise a :class:`KldslError` naming what to pass for an invalid option."""
    if not isinstance(ess_threshold, int | float) or not 0.0 <= float(ess_threshold) <= 1.0:
        raise KldslError(
            f"ess_threshold must be a number in [0, 1] (0: never resample, 1: every step), "
            f"got {ess_threshold!r}"
        )
    if resampling not in weights.RESAMPLING:
        raise KldslError(
            f"resampling must be one of {', '.join(weights.RESAMPLING)}, got {resampling!r}"
        )
    if token_sampler not in TOKEN_SAMPLERS:
        raise KldslError(
            f"token_sampler must be one of {', '.join(TOKEN_SAMPLERS)}, got {token_sampler!r}"
        )
    check_hits(awrs_hits, "awrs_hits")


def genealogy_rel_var(
    log_w: Tensor, ancestor: Tensor, resampled: int, particles: int | None = None
) -> float:
    """The relative variance V̂(Ẑ)/Ẑ² of one run, by the genealogy ("Eve") estimator of Lee
    & Whiteley (2018, "Variance estimation in the particle filter", Biometrika 105(3)):

        V̂(Ẑ)/Ẑ² = 1 − (n/(n−1))^(R+1) · (1 − Σ_k S_k²),  S_k = Σ_{i: E_i = k} W_i,

    with W the normalised final weights, E_i the time-0 ancestor of particle i (in
    [0, ``particles``), by default the number of weights) and R the resampling steps.
    Ẑ²·V̂/Ẑ² is unbiased for Var(Ẑ) under multinomial resampling (an approximation under
    the others); with R = 0 it is importance sampling's
    (n·Σ W² − 1)/(n − 1). It can be negative (then read it as 0).

    Example:
        >>> flat = torch.zeros(4, dtype=torch.float64)
        >>> genealogy_rel_var(flat, torch.arange(4), 0)
        0.0
        >>> genealogy_rel_var(flat, torch.zeros(4, dtype=torch.long), 2)
        1.0
    """
    n = len(log_w) if particles is None else particles
    if n < 2 or not torch.isfinite(torch.logsumexp(log_w, 0)):
        return math.inf
    w = weights.normalize(log_w).exp()
    s = torch.zeros(n, dtype=torch.float64).index_add(0, ancestor, w)
    return 1.0 - (n / (n - 1)) ** (resampled + 1) * (1.0 - float((s * s).sum()))


def genealogy_log_z_se(log_w: Tensor, ancestor: Tensor, resampled: int, n: int) -> float:
    """Standard error of log Ẑ from one run of ``n`` particles: √ of
    :func:`genealogy_rel_var` (the delta method), inf when it cannot be estimated. The
    final population may hold more than n (``split_eos`` branches, grouped with their
    particle's ancestor): the estimator is then an approximation."""
    rel_var = genealogy_rel_var(log_w, ancestor, resampled, n)
    return math.sqrt(max(rel_var, 0.0)) if math.isfinite(rel_var) else math.inf


def sweep(
    target: Target,
    n: int,
    generator: torch.Generator,
    *,
    ess_threshold: float = 0.5,
    resampling: str = "stratified",
    token_sampler: str = "direct",
    awrs_hits: int = AWRS_HITS,
    twist: str | TwistFn | None = None,
    split_eos: bool = False,
    reference: Sequence[int] | None = None,
    progress: bool | None = False,
) -> Sweep:
    """Run ``n`` particles to the end (see the module docstring).

    ``reference``: conditional SMC, particle 0 clamped to this complete sequence (an exact
    posterior sample; multinomial conditional resampling, ``token_sampler="direct"``).
    """
    check_options(ess_threshold, resampling, token_sampler, awrs_hits)
    if split_eos and reference is not None:
        raise KldslError("split_eos does not apply to conditional SMC (a clamped reference)")
    lm, limit = target.lm, target.max_tokens
    eos = lm.eos_id
    if reference is not None:
        reference = list(reference)
        complete = len(reference) == limit or (reference and reference[-1] == eos)
        if token_sampler != "direct" or not complete or len(reference) > limit:
            raise KldslError(
                "conditional SMC needs token_sampler='direct' and a complete reference "
                f"sequence (ending at EOS or holding max_tokens={limit} tokens)"
            )
        resampling = "multinomial"
    plan = _Plan(target, n)
    psi_of = _twist_fn(twist, plan)
    check = prefix_check(target.model, target.lms)
    d = len(plan.decoders)
    ids: list[Ids] = [[] for _ in range(n)]
    log_w = torch.zeros(n, dtype=torch.float64)
    log_psi = torch.zeros(n, dtype=torch.float64)
    held = torch.zeros(n, d, dtype=torch.float64)  # Σ untempered log-probs per decoding
    done = torch.zeros(n, dtype=torch.bool)
    ancestor = torch.arange(n)
    active = list(range(n))  # the particle of each decoding row
    log_z_past, resampled, ess_trace = 0.0, 0, []
    with bar(limit, "smc", progress, unit="tok") as pbar:
        for step in range(limit):
            lq = plan.decoders[0].logprobs
            extra = torch.zeros(len(active), dtype=torch.float64)
            if split_eos and step + 1 < limit:
                ended = _eos_branches(plan, lm, ids, active, log_w, log_psi, held)
                lq, stay = _without_eos(lq, eos)
                if token_sampler == "direct":  # drawn from q(·)/(1 − q(EOS))
                    extra += stay
                else:  # awrs estimates the valid mass of q without EOS itself
                    extra[~torch.isfinite(stay)] = -math.inf
            else:
                ended = None
            if token_sampler == "direct":
                tokens = draw(lq, generator)
            else:
                tokens = torch.zeros(len(active), dtype=torch.long)
                for row, i in enumerate(active):

                    def valid(candidates: Tensor, seq: Ids = ids[i]) -> Tensor:
                        return check.allowed(lm, seq, candidates, limit)

                    tok, log_mass, _ = awrs(lq[row], valid, generator, awrs_hits)
                    tokens[row], extra[row] = max(tok, 0), log_mass
            if reference is not None and active and active[0] == 0:
                tokens[0] = reference[step]
            picked = torch.stack(
                [pick(dec.logprobs, tokens).double().cpu() for dec in plan.decoders], 1
            )
            incr = extra - picked[:, 0]
            for alpha, j in plan.priors:
                incr = incr + alpha * picked[:, j]
            rows = torch.tensor(active, dtype=torch.long)
            held[rows] += picked
            for row, i in enumerate(active):
                ids[i].append(int(tokens[row]))
            finished = (tokens == eos) | (step + 1 == limit)
            alive = torch.isfinite(incr)
            going = [r for r in range(len(active)) if alive[r] and not finished[r]]
            ending = [r for r in range(len(active)) if alive[r] and finished[r]]
            if going and (psi_of is not None or (not check.trivial and token_sampler == "direct")):
                texts = [prefix_text(lm, ids[active[r]]) for r in going]
                index = torch.tensor(going)
                if not check.trivial and token_sampler == "direct":
                    dead = check.dead(texts, [False] * len(texts))
                    incr[index[dead]] = -math.inf
                if psi_of is not None:
                    psi = psi_of(texts)
                    incr[index] += psi - log_psi[rows[index]]
                    log_psi[rows[index]] = psi
            if ending:
                index = torch.tensor(ending)
                exact = plan.final([lm.text(ids[active[r]]) for r in ending])
                incr[index] += exact - log_psi[rows[index]]
                log_psi[rows[index]] = 0.0
            log_w[rows] += incr
            if ended is not None:  # the finished copies join the population
                ids = ids + ended.ids
                log_w = torch.cat([log_w, ended.log_w])
                done = torch.cat([done, torch.ones(len(ended.ids), dtype=torch.bool)])
                ancestor = torch.cat([ancestor, ancestor[ended.rows]])
                log_psi = torch.cat([log_psi, torch.zeros(len(ended.ids), dtype=torch.float64)])
                held = torch.cat([held, ended.held])
            stop = finished | ~torch.isfinite(incr)
            done[rows[stop]] = True
            if bool(stop.any()):
                keep = (~stop).nonzero().squeeze(1)
                active = [active[r] for r in keep.tolist()]
                if active:
                    for dec in plan.decoders:
                        dec.select(keep)
            ess = weights.ess(log_w)
            ess_trace.append(ess)
            pbar.update(1)
            pbar.set_postfix(live=len(active), ess=f"{ess:.1f}")
            if not active or not torch.isfinite(torch.logsumexp(log_w, 0)):
                break
            if ess < ess_threshold * n:
                log_z_past += float(weights.log_z(log_w, n))
                resampled += 1
                if reference is None:
                    parent = weights.resample(log_w, n, generator, resampling)
                else:  # conditional: particle 0 keeps the reference's line
                    rest = weights.resample(log_w, n - 1, generator, "multinomial")
                    parent = torch.cat([torch.zeros(1, dtype=torch.long), rest])
                row_of = {i: r for r, i in enumerate(active)}
                ids = [list(ids[p]) for p in parent.tolist()]
                done, ancestor = done[parent], ancestor[parent]
                log_psi, held = log_psi[parent], held[parent]
                log_w = torch.zeros(n, dtype=torch.float64)
                active = [j for j in range(n) if not done[j]]
                index = torch.tensor([row_of[int(parent[j])] for j in active], dtype=torch.long)
                for dec in plan.decoders:
                    dec.select(index)
            last = torch.tensor([ids[i][-1] for i in active], dtype=torch.long)
            for dec in plan.decoders:
                dec.extend(last)
    total = torch.logsumexp(log_w, 0)
    log_z = log_z_past + float(weights.log_z(log_w, n)) if torch.isfinite(total) else -math.inf
    return Sweep(
        ids=ids,
        log_w=log_w,
        log_z=log_z,
        log_z_se=genealogy_log_z_se(log_w, ancestor, resampled, n),
        log_q=held[:, 0].clone(),
        base_log_probs=held[:, plan.base_decoder].clone(),
        ancestor=ancestor,
        ess=ess_trace,
        resampled=resampled,
        forwards=sum(dec.forwards for dec in plan.decoders),
    )


def _without_eos(lq: Tensor, eos: int) -> tuple[Tensor, Tensor]:
    """q's rows with EOS masked out, and log(1 − q(EOS)) [rows] (float64). A row that is
    all EOS keeps it (its continuing branch then gets log 1 − q(EOS) = −inf)."""
    log_eos = lq[:, eos].double().cpu()
    stay = torch.where(  # log(1 − e^x), accurate on both sides of −log 2
        log_eos > -math.log(2), torch.log(-torch.expm1(log_eos)), torch.log1p(-log_eos.exp())
    )
    masked = lq.clone()
    masked[:, eos] = -math.inf
    rest = ~torch.isfinite(stay).to(lq.device)
    masked[rest] = lq[rest]
    return masked, stay


@dataclass
class _Ended:
    """The finished copies that active particles spawn by ending at this step."""

    rows: Tensor  # [k] the active particles' indices in the population
    ids: list[Ids]
    log_w: Tensor  # [k]
    held: Tensor  # [k, decodings]


def _eos_branches(
    plan: _Plan,
    lm: LM,
    ids: list[Ids],
    active: list[int],
    log_w: Tensor,
    log_psi: Tensor,
    held: Tensor,
) -> _Ended:
    """``split_eos``: each active particle's copy ending now, with its exact weight
    w·Π a_j(EOS)^α_j·exp(exact factors − log ψ); copies of weight 0 are left out."""
    eos = lm.eos_id
    rows = torch.tensor(active, dtype=torch.long)
    at_eos = torch.stack([dec.logprobs[:, eos].double().cpu() for dec in plan.decoders], 1)
    gain = torch.zeros(len(active), dtype=torch.float64)
    for alpha, j in plan.priors:
        gain = gain + alpha * at_eos[:, j]
    alive = torch.isfinite(gain).nonzero().squeeze(1)
    seqs = [ids[active[r]] + [eos] for r in alive.tolist()]
    gain[alive] += plan.final([lm.text(seq) for seq in seqs])
    gain = gain + log_w[rows] - log_psi[rows]
    keep = [k for k, r in enumerate(alive.tolist()) if math.isfinite(float(gain[r]))]
    picked = alive[keep] if keep else torch.zeros(0, dtype=torch.long)
    return _Ended(
        rows=rows[picked],
        ids=[seqs[k] for k in keep],
        log_w=gain[picked],
        held=held[rows[picked]] + at_eos[picked],
    )


def _draw(target: Target, ids: list[Ids], log_q: Tensor, base_log_probs: Tensor) -> Draw:
    """The sequences with their log q and the breakdown of log p̃, the base prior's
    log-probs reused from the sweep (no second scoring pass)."""
    density = target.model.log_density(ids, base_log_probs=base_log_probs, lms=target.lms)
    return Draw(ids, log_q, density)


def run(
    target: Target,
    *,
    n: int,
    generator: torch.Generator,
    batch_size: int,
    progress: bool | None,
    ess_threshold: float = 0.5,
    resampling: str = "stratified",
    token_sampler: str = "direct",
    awrs_hits: int = AWRS_HITS,
    twist: str | TwistFn | None = None,
    split_eos: bool = False,
    gibbs: int | None = None,
) -> Samples:
    """Token-level SMC with ``n`` particles (``batch_size`` is unused: all ``n`` particles
    decode as one batch), or with ``gibbs=K`` particle Gibbs: K equally weighted chain
    states, each from a conditional SMC sweep of ``n`` particles (:func:`particle_gibbs`).

    ess_threshold: resample when the ESS falls below this fraction of n (0: never, 1:
        every step)
    resampling: multinomial, stratified, systematic or residual
    token_sampler: direct (sample from the proposal, prefix checks kill violators) or
        awrs (sample only tokens that keep the particle valid, properly weighted)
    awrs_hits: with awrs, the valid draws that end each token's rejection chain (at least
        2): more give a valid-mass estimate of lower variance for more draws and checks
    twist: None, "prefix" (each tilt's reward on the prefix text) or a function of prefix
        texts returning log ψ (from Python)
    split_eos: sum over ending at every step instead of sampling EOS: each particle spawns
        a finished, exactly weighted copy that ends there (the result then holds those
        since the last resampling as well, so it may hold more than n samples)
    gibbs: particle Gibbs: run this many conditional SMC sweeps of n particles after one
        plain sweep, each giving the next state of a Markov chain that leaves the
        posterior invariant; the samples are those states, equally weighted
    """
    if gibbs is not None:
        if split_eos:
            raise KldslError("split_eos does not apply to gibbs (conditional SMC sweeps)")
        return particle_gibbs(
            target,
            n=n,
            generator=generator,
            sweeps=gibbs,
            progress=progress,
            ess_threshold=ess_threshold,
            resampling=resampling,
            token_sampler=token_sampler,
            twist=twist,
        )
    result = sweep(
        target,
        n,
        generator,
        ess_threshold=ess_threshold,
        resampling=resampling,
        token_sampler=token_sampler,
        awrs_hits=awrs_hits,
        twist=twist,
        split_eos=split_eos,
        progress=progress,
    )
    if not math.isfinite(result.log_z):
        raise target.no_support_error(n)
    draw_ = _draw(target, result.ids, result.log_q, result.base_log_probs)
    if target.sink is not None:
        write_jsonl(draw_, target.sink)
    return Samples.from_draw(
        "smc",
        target.model,
        draw_,
        result.log_w,
        log_z=result.log_z,
        log_z_se=result.log_z_se,
        n_proposed=n,
        proposal_means=proposal_means(draw_),
        columns={"ancestor": result.ancestor.tolist()},
        diagnostics={
            "resampling_steps": result.resampled,
            "token_forwards": result.forwards,
            "ess_per_step": result.ess,
        },
        info=_info(target, ess_threshold, resampling, token_sampler, twist, split_eos, awrs_hits),
    )


def _info(
    target: Target,
    ess_threshold: float,
    resampling: str,
    token_sampler: str,
    twist: str | TwistFn | None,
    split_eos: bool = False,
    awrs_hits: int | None = None,
) -> dict[str, Any]:
    """The settings a result records in ``info``."""
    return {
        "proposal": target.proposal.name,
        "ess_threshold": ess_threshold,
        "resampling": resampling,
        "token_sampler": token_sampler,
        "twist": twist if twist is None or isinstance(twist, str) else "function",
        "split_eos": split_eos,
        **({"awrs_hits": awrs_hits} if token_sampler == "awrs" else {}),
    }


# ---------------------------------------------------------------------------------------
# Particle Gibbs: iterated conditional SMC
# ---------------------------------------------------------------------------------------


def particle_gibbs_step(
    target: Target,
    state: Sequence[int],
    n: int,
    generator: torch.Generator,
    *,
    ess_threshold: float = 0.5,
    twist: str | TwistFn | None = None,
) -> tuple[int, Sweep]:
    """One particle Gibbs step (Andrieu, Doucet & Holenstein 2010, "Particle Markov chain
    Monte Carlo methods", JRSS B 72(3)): a conditional SMC sweep of ``n`` particles with
    the complete sequence ``state`` as its reference (particle 0), then the next state
    drawn from the final particles in proportion to their final weights, the reference's
    included. The kernel leaves p* invariant: if ``state`` ~ p*, so is the next state.

    Returns the next state's index in the sweep's particles (``sweep.ids[index]``; 0 is the
    reference, so the chain stays put with probability about its share of the weight) and
    the sweep.

    Example:
        >>> import kldsl as kl
        >>> m = kl.prior(kl.ToyLM(vocab="ab"), max_tokens=3) | kl.contains("a")
        >>> t = Target(m)
        >>> index, s = particle_gibbs_step(t, [1, 0], 4, make_generator(0))  # "a", EOS
        >>> "a" in t.lm.text(s.ids[index])
        True
    """
    result = sweep(target, n, generator, ess_threshold=ess_threshold, twist=twist, reference=state)
    index = int(weights.resample(result.log_w, 1, generator, "multinomial")[0])
    return index, result


def check_gibbs(sweeps: object, n: int, token_sampler: str) -> None:
    """Raise a :class:`KldslError` naming what to pass for invalid particle Gibbs options."""
    if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 1:
        raise KldslError(
            f"gibbs must be a positive integer, the number of particle Gibbs sweeps (each "
            f"gives one sample), got {sweeps!r}"
        )
    if token_sampler != "direct":
        raise KldslError(
            "gibbs runs conditional SMC sweeps, which need token_sampler='direct': the "
            f"reference particle's tokens are clamped, not drawn (got {token_sampler!r})"
        )
    if n < 2:
        raise KldslError(
            f"gibbs needs n ≥ 2 particles per sweep: with n={n} the reference is the only "
            "particle and the chain never moves"
        )


def particle_gibbs(
    target: Target,
    *,
    n: int,
    generator: torch.Generator,
    sweeps: int,
    progress: bool | None = False,
    ess_threshold: float = 0.5,
    resampling: str = "stratified",
    token_sampler: str = "direct",
    twist: str | TwistFn | None = None,
) -> Samples:
    """Particle Gibbs: one plain SMC sweep of ``n`` particles gives the first state (drawn
    in proportion to its final weights), then ``sweeps`` :func:`particle_gibbs_step` s each
    give the next. The samples are those ``sweeps`` states, equally weighted (correlated:
    read ``diagnostics["MCMC ESS (min)"]``), in ``columns["sweep"]`` order.

    ``diagnostics`` hold ``moved`` (the share of steps whose new state differs from the
    old, also ``acceptance_rate``), ``token_forwards`` (every sweep's), ``sweeps`` (the
    plain one included) and the chain's split R-hat, ESS and traces
    (:func:`kldsl.chains.chain_summary`). ``log_z`` is the plain sweep's log Ẑ (the
    conditional sweeps' Ẑ are biased upward). ``resampling`` applies to the plain sweep;
    conditional sweeps resample multinomially.

    Example:
        >>> import kldsl as kl
        >>> m = kl.prior(kl.ToyLM(vocab="ab"), max_tokens=3) | kl.contains("a")
        >>> s = kl.infer(m, engine="smc", n=4, gibbs=32, seed=0)
        >>> len(s), s.diagnostics["sweeps"], all("a" in t for t in s.texts)
        (32, 33, True)
    """
    check_options(ess_threshold, resampling, token_sampler)
    check_gibbs(sweeps, n, token_sampler)
    first = sweep(
        target, n, generator, ess_threshold=ess_threshold, resampling=resampling, twist=twist
    )
    if not math.isfinite(first.log_z):
        raise target.no_support_error(n)
    index = int(weights.resample(first.log_w, 1, generator, "multinomial")[0])
    state = first.ids[index]
    states: list[Ids] = []
    log_q, base_log_probs = [], []
    moved, forwards = 0, first.forwards
    with bar(sweeps, "particle gibbs", progress, unit="sweep") as pbar:
        for k in range(sweeps):
            index, result = particle_gibbs_step(
                target, state, n, generator, ess_threshold=ess_threshold, twist=twist
            )
            moved += result.ids[index] != state
            state = result.ids[index]
            states.append(state)
            log_q.append(result.log_q[index])
            base_log_probs.append(result.base_log_probs[index])
            forwards += result.forwards
            pbar.update(1)
            pbar.set_postfix(moved=f"{moved / (k + 1):.2f}")
    chain = _draw(target, states, torch.stack(log_q), torch.stack(base_log_probs))
    if target.sink is not None:
        write_jsonl(chain, target.sink)
    advice = "run more sweeps (gibbs) or more particles per sweep (n)"
    return Samples.from_draw(
        "smc",
        target.model,
        chain,
        torch.zeros(sweeps, dtype=torch.float64),
        log_z=first.log_z,
        log_z_se=first.log_z_se,
        n_proposed=n * (sweeps + 1),
        proposal_means=proposal_means(_draw(target, first.ids, first.log_q, first.base_log_probs)),
        acceptance_rate=moved / sweeps,
        columns={"sweep": list(range(1, sweeps + 1))},
        diagnostics={
            **chain_summary(chain, 1, advice, stacklevel=5),  # the caller of kl.infer
            "moved": moved / sweeps,
            "token_forwards": forwards,
            "sweeps": sweeps + 1,
        },
        info={
            **_info(target, ess_threshold, resampling, token_sampler, twist),
            "gibbs": sweeps,
            "log_z_from": "the first, plain SMC sweep",
        },
    )


engine = Engine(
    "smc",
    "sequential Monte Carlo over tokens: prefix checks, resampling, twists, AWRS; log Z",
    run,
)


@dataclass(frozen=True)
class LogZBounds:
    """A bracket on log Z from SMC (below, in expectation) and conditional SMC (above).

    ``lower``/``upper`` are means of log Ẑ over ``runs`` runs each, with their standard
    errors; E[lower] ≤ log Z ≤ E[upper], so log Z lies in the bracket widened by a few
    standard errors.

    Example:
        >>> b = LogZBounds(lower=-2.0, lower_se=0.1, upper=-1.5, upper_se=0.1, runs=8, n=16)
        >>> b.width
        0.5
    """

    lower: float  # mean log Ẑ of SMC
    lower_se: float
    upper: float  # mean log Ẑ of conditional SMC
    upper_se: float
    runs: int
    n: int  # particles per run

    @property
    def width(self) -> float:
        return self.upper - self.lower


def log_z_bounds(
    model: Model,
    exact_samples: Samples,
    *,
    n: int = 16,
    runs: int = 16,
    seed: int = 0,
    proposal: LM | None = None,
    runtime: str = "hf",
    **options: object,
) -> LogZBounds:
    """Bidirectional bounds on log Z (Zhao et al. 2024, "Probabilistic inference in language
    models via twisted sequential Monte Carlo", ICML): the mean log Ẑ of ``runs`` SMC runs
    is at most log Z in expectation (Jensen, Ẑ being unbiased), and the mean log Ẑ of
    ``runs`` conditional SMC runs, each with one particle clamped to a sample of
    ``exact_samples`` (from the ``exact`` or ``rejection`` engine), is at least log Z.

    ``options`` go to both sweeps (``ess_threshold``, ``twist``; resampling is
    multinomial on both sides).

    Example:
        >>> import kldsl as kl
        >>> m = kl.prior(kl.ToyLM(vocab="ab"), max_tokens=3) | kl.contains("a")
        >>> b = kl.log_z_bounds(m, kl.infer(m, engine="exact"), n=8, runs=4)
        >>> b.lower <= b.upper
        True
    """
    for key in options:
        if key not in ("ess_threshold", "twist"):
            raise KldslError(f"log_z_bounds takes ess_threshold= and twist=, not {key}=")
    if len(exact_samples) == 0:
        raise KldslError("log_z_bounds needs exact posterior samples (engine exact or rejection)")
    gen = make_generator(seed)
    refs = weights.resample(exact_samples.log_weights, runs, gen, "multinomial").tolist()
    target = Target(model, proposal, runtime=runtime)
    lower, upper = [], []
    for k in range(runs):
        lower.append(sweep(target, n, gen, resampling="multinomial", **options).log_z)  # type: ignore[arg-type]
        ref = exact_samples.ids[refs[k]]
        upper.append(sweep(target, n, gen, reference=ref, **options).log_z)  # type: ignore[arg-type]
    lo, up = torch.tensor(lower), torch.tensor(upper)

    def se(x: Tensor) -> float:
        return float(x.std() / math.sqrt(len(x))) if len(x) > 1 else math.inf

    return LogZBounds(float(lo.mean()), se(lo), float(up.mean()), se(up), runs, n)
