"""Metropolis–Hastings over whole sequences, with independent and local (suffix) moves.

Several chains run batched together (one LM forward pass serves every chain). Each step
picks a move per chain at random with the probabilities in ``moves``:

- ``independent``: propose a whole sequence y ~ q (the proposal LM: the prior unless
  ``proposal=`` names another) and accept with min(1, w(y)/w(x)), w = p̃/q.
- ``local``: pick a position i uniformly in 0..|x|−1, keep the prefix x_<i and redraw the
  suffix from q given the context and that prefix, so y = x_<i · s with |y| ≤ max_tokens.

Acceptance of the local move. It is a move (x, i) → (y, i) whose reverse (y, i) → (x, i)
keeps the same prefix (possible because s holds at least one token, so i < |y|). Its
proposal densities are Q_i(x→y) = q(y_≥i | y_<i)/|x| and Q_i(y→x) = q(x_≥i | x_<i)/|y|,
so the Metropolis–Hastings ratio is

    α_i(x, y) = min(1, p̃(y) · q(x_≥i | x_<i) · |x|  /  (p̃(x) · q(y_≥i | y_<i) · |y|)).

Then p̃(x)·Q_i(x→y)·α_i = min(p̃(x)·Q_i(x→y), p̃(y)·Q_i(y→x)) is symmetric in x and y
for every i, and summing over the positions i that turn x into y gives detailed balance
for the whole kernel K(x, y) = Σ_i Q_i(x→y)·α_i(x, y). With the prior as q and
p̃ = a·f the shared prefix cancels: α_i = min(1, f(y)·|x| / (f(x)·|y|)). A mixture of moves
chosen independently of the state keeps detailed balance, since each move has it.

Chains start from proposals with p̃ > 0 (hard constraints: propose until one holds, with
the rejection engine's error when none does). The result has equal weights, the chain and
step of each sample in ``columns["chain"]`` / ``columns["step"]``, acceptance rates per
move in ``info["acceptance"]``, and split R-hat and ESS (``pyro.ops.stats``) of log p̃,
each reward and the token count in ``diagnostics["r_hat"]`` / ``diagnostics["ess"]``
(worst values in ``diagnostics["split R-hat (max)"]`` / ``["MCMC ESS (min)"]``, the
traces in ``diagnostics["traces"]``); it warns when any R-hat exceeds 1.05;
``Samples.plot`` adds a trace plot per statistic. MCMC does not
estimate Z itself: ``log_z`` is the importance estimate mean(w) over every sequence drawn
whole from q (all initial proposals and the independent moves' proposals). It is
consistent; it is not exactly unbiased, since initialisation stops once every chain has a
start. With local moves only it rests on the initial proposals alone (see ``log_z_se``).

    kl.infer(model, engine="mcmc", n=256, chains=4, moves={"independent": 0.5, "local": 0.5})
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from kldsl import weights
from kldsl.chains import R_HAT_WARN as R_HAT_WARN  # re-exported: the threshold mcmc warns at
from kldsl.chains import chain_summary
from kldsl.errors import KldslError
from kldsl.infer import Engine
from kldsl.progress import bar
from kldsl.samples import Samples, proposal_means
from kldsl.target import Draw, Target

MOVES = ("independent", "local")
DEFAULT_MOVES = {"independent": 0.5, "local": 0.5}
INIT_TRIES_PER_CHAIN = 1000  # proposals per chain before giving up on finding p̃ > 0


# ---------------------------------------------------------------------------------------
# The moves as pure functions (the sampler and the exact tests both use these)
# ---------------------------------------------------------------------------------------


def independent_log_proposal(
    token_lp_x: Sequence[float], token_lp_y: Sequence[float]
) -> tuple[float, float]:
    """log Q(x→y) and log Q(y→x) of the independent move: log q(y) and log q(x).

    Example:
        >>> independent_log_proposal([-1.0, -0.5], [-2.0])
        (-2.0, -1.5)
    """
    return sum(token_lp_y), sum(token_lp_x)


def local_positions(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """The positions i at which a local move from ``x`` can propose ``y`` (x_<i = y_<i).

    Example:
        >>> local_positions([1, 2, 0], [1, 1, 0])
        [0, 1]
    """
    out = []
    for i in range(min(len(x), len(y))):
        out.append(i)
        if x[i] != y[i]:
            break
    return out


def local_log_proposal(
    token_lp_x: Sequence[float], token_lp_y: Sequence[float], position: int
) -> tuple[float, float]:
    """log Q_i(x→y) and log Q_i(y→x) of the local move at ``position`` i.

    Q_i(x→y) = q(y_≥i | y_<i)/|x| and Q_i(y→x) = q(x_≥i | x_<i)/|y|; x and y share the
    prefix before i.

    Example:
        >>> fwd, rev = local_log_proposal([-1.0, -0.5], [-1.0, -2.0, -0.1], 1)
        >>> round(fwd, 4), round(rev, 4)
        (-2.7931, -1.5986)
    """
    fwd = sum(token_lp_y[position:]) - math.log(len(token_lp_x))
    rev = sum(token_lp_x[position:]) - math.log(len(token_lp_y))
    return fwd, rev


def log_acceptance(
    log_p_x: Tensor | float,
    log_p_y: Tensor | float,
    log_fwd: Tensor | float,
    log_rev: Tensor | float,
) -> Tensor:
    """Metropolis–Hastings log α = min(0, log p̃(y) + log Q(y→x) − log p̃(x) − log Q(x→y)).

    A proposal with p̃(y) = 0 is always rejected; a state with p̃(x) = 0 is always left.

    Example:
        >>> float(log_acceptance(-1.0, -3.0, -2.0, -1.0))
        -1.0
    """
    log_p_x, log_p_y, log_fwd, log_rev = (
        torch.as_tensor(v, dtype=torch.float64) for v in (log_p_x, log_p_y, log_fwd, log_rev)
    )
    ratio = torch.clamp((log_p_y + log_rev) - (log_p_x + log_fwd), max=0.0)
    ratio = torch.where(torch.isneginf(log_p_x), torch.zeros_like(ratio), ratio)
    return torch.where(torch.isneginf(log_p_y), torch.full_like(ratio, -math.inf), ratio)


def parse_moves(moves: Mapping[str, float] | str | None) -> dict[str, float]:
    """Move probabilities from a dict, a name, or text like ``"independent:0.3,local:0.7"``.

    Example:
        >>> parse_moves("independent:1,local:3")
        {'independent': 0.25, 'local': 0.75}
    """
    if moves is None:
        moves = DEFAULT_MOVES
    if isinstance(moves, str):
        parsed: dict[str, float] = {}
        for item in moves.split(","):
            name, _, p = item.strip().partition(":")
            try:
                parsed[name.strip()] = float(p) if p else 1.0
            except ValueError:
                raise KldslError(f"moves: {item!r} is not NAME or NAME:PROBABILITY") from None
        moves = parsed
    unknown = set(moves) - set(MOVES)
    if unknown:
        raise KldslError(
            f"unknown MCMC move {', '.join(sorted(unknown))}; the moves are {', '.join(MOVES)}, "
            'e.g. moves={"independent": 0.5, "local": 0.5}'
        )
    if any(p < 0 or not math.isfinite(p) for p in moves.values()) or sum(moves.values()) <= 0:
        raise KldslError(f"move probabilities must be ≥ 0 and not all 0; got {dict(moves)}")
    total = sum(moves.values())
    return {m: float(moves[m]) / total for m in MOVES if moves.get(m, 0) > 0}


# ---------------------------------------------------------------------------------------
# The sampler: init(...) -> ChainState, step(...) -> (ChainState, StepInfo)
# ---------------------------------------------------------------------------------------


class ChainState(NamedTuple):
    """The current sequence of every chain."""

    draw: Draw  # one row per chain: ids, log q(x) and the breakdown of log p̃(x)
    token_lp: list[list[float]]  # per-token proposal log-probs of each chain's sequence


class StepInfo(NamedTuple):
    """What one step of every chain proposed and decided."""

    moves: list[str]  # the move each chain made
    positions: list[int]  # where each chain's suffix started (0 for independent)
    accepted: Tensor  # [chains] bool
    log_alpha: Tensor  # [chains] log acceptance probability
    proposed: Draw  # the proposals, one row per chain
    tokens: int  # tokens sampled in this step


def init(
    target: Target, chains: int, generator: torch.Generator, batch_size: int
) -> tuple[ChainState, Draw]:
    """Start each chain at a proposal with p̃ > 0; also returns every proposal made."""
    max_tries = INIT_TRIES_PER_CHAIN * chains
    start: list[Draw] = []
    start_lp: list[list[float]] = []
    made: list[Draw] = []
    tried = found = 0
    while found < chains and tried < max_tries:
        size = min(max(batch_size, chains), max_tries - tried)
        ids, lps = target.proposal.sample_continuations(
            [[]] * size, target.max_tokens, prompt=target.base.prompt, seed=generator
        )
        batch = target.evaluate(ids, torch.tensor([sum(lp) for lp in lps], dtype=torch.float64))
        made.append(batch)
        tried += size
        ok = torch.isfinite(batch.density.log_p).nonzero().flatten().tolist()[: chains - found]
        if ok:
            start.append(batch.select(ok))
            start_lp.extend(lps[k] for k in ok)
            found += len(ok)
    if found == 0:
        raise target.no_support_error(tried)
    first = Draw.concat(start)
    if found < chains:
        warnings.warn(
            f"only {found} of {tried} proposals had p̃ > 0; {chains - found} of the {chains} "
            "chains start from copies of them",
            stacklevel=4,
        )
        cycle = [k % found for k in range(chains)]
        first, start_lp = first.select(cycle), [start_lp[k] for k in cycle]
    return ChainState(first, start_lp), Draw.concat(made)


def step(
    target: Target, state: ChainState, move_probs: Mapping[str, float], generator: torch.Generator
) -> tuple[ChainState, StepInfo]:
    """One Metropolis–Hastings step of every chain, the proposals sampled in one batch."""
    chains = len(state.draw)
    names = list(move_probs)
    probs = torch.tensor([move_probs[m] for m in names], dtype=torch.float64)
    picks = torch.multinomial(probs, chains, replacement=True, generator=generator).tolist()
    moves = [names[k] for k in picks]
    positions = [
        int(torch.randint(len(x), (), generator=generator)) if move == "local" else 0
        for move, x in zip(moves, state.draw.ids)
    ]
    prefixes = [x[:i] for x, i in zip(state.draw.ids, positions)]
    tails, tail_lp = target.proposal.sample_continuations(
        prefixes, target.max_tokens, prompt=target.base.prompt, seed=generator
    )
    ys = [p + t for p, t in zip(prefixes, tails)]
    lp_y = [lp[:i] + t for lp, i, t in zip(state.token_lp, positions, tail_lp)]
    proposed = target.evaluate(ys, torch.tensor([sum(lp) for lp in lp_y], dtype=torch.float64))
    fwd, rev = zip(
        *(
            independent_log_proposal(lx, ly)
            if move == "independent"
            else local_log_proposal(lx, ly, i)
            for move, lx, ly, i in zip(moves, state.token_lp, lp_y, positions)
        )
    )
    log_alpha = log_acceptance(
        state.draw.density.log_p,
        proposed.density.log_p,
        torch.tensor(fwd, dtype=torch.float64),
        torch.tensor(rev, dtype=torch.float64),
    )
    u = torch.rand(chains, generator=generator, dtype=torch.float64)
    accepted = torch.log(u) < log_alpha
    keep = [chains + c if accepted[c] else c for c in range(chains)]
    new = ChainState(
        Draw.concat([state.draw, proposed]).select(keep),
        [lp_y[c] if accepted[c] else state.token_lp[c] for c in range(chains)],
    )
    tokens = sum(len(t) for t in tails)
    return new, StepInfo(moves, positions, accepted, log_alpha, proposed, tokens)


def run(
    target: Target,
    *,
    n: int,
    generator: torch.Generator,
    batch_size: int,
    progress: bool | None,
    chains: int = 4,
    burn_in: int | None = None,
    thin: int = 1,
    moves: Mapping[str, float] | str | None = None,
) -> Samples:
    """``n`` samples (rounded up to a multiple of ``chains``) from ``chains`` chains that
    each discard ``burn_in`` steps (default: half their kept steps) and keep every
    ``thin``-th step after.

    chains: number of chains
    burn_in: steps discarded per chain (default: half the kept steps)
    thin: keep every k-th step
    moves: move mixture, e.g. "independent:0.3,local:0.7"
    """
    for name, value, least in (("chains", chains, 1), ("thin", thin, 1), ("burn_in", burn_in, 0)):
        if value is not None and (not isinstance(value, int) or value < least):
            raise KldslError(f"{name} must be an integer ≥ {least}, got {value!r}")
    move_probs = parse_moves(moves)
    per_chain = math.ceil(n / chains)
    burn_in = per_chain // 2 if burn_in is None else burn_in
    steps = burn_in + thin * per_chain

    state, first = init(target, chains, generator, batch_size)
    from_q = [first]  # sequences drawn whole from q: the importance estimate of Z
    proposed = dict.fromkeys(move_probs, 0)
    accepted = dict.fromkeys(move_probs, 0)
    kept: list[Draw] = []
    tokens = sum(len(x) for x in first.ids)
    with bar(steps, "mcmc", progress, unit="step") as pbar:
        for s in range(steps):
            state, info = step(target, state, move_probs, generator)
            for move, ok in zip(info.moves, info.accepted.tolist()):
                proposed[move] += 1
                accepted[move] += ok
            whole = [c for c, move in enumerate(info.moves) if move == "independent"]
            if whole:
                from_q.append(info.proposed.select(whole))
            tokens += info.tokens
            if s >= burn_in and (s - burn_in + 1) % thin == 0:
                kept.append(state.draw)
            pbar.update(1)
            pbar.set_postfix({m: f"{accepted[m] / max(proposed[m], 1):.2f}" for m in move_probs})

    # kept[t] holds every chain at kept step t; order the samples chain by chain
    order = [t * chains + c for c in range(chains) for t in range(per_chain)]
    samples = Draw.concat(kept).select(order)
    diagnostics = chain_summary(
        samples,
        chains,
        "run longer (larger n or burn_in), add chains, or use a proposal closer to the target",
    )

    q_draw = Draw.concat(from_q)
    log_w = q_draw.log_w
    acceptance = {m: accepted[m] / max(proposed[m], 1) for m in move_probs}
    n_kept = chains * per_chain
    return Samples.from_draw(
        "mcmc",
        target.model,
        samples,
        torch.zeros(n_kept, dtype=torch.float64),
        log_z=float(weights.log_z(log_w)),
        log_z_se=weights.log_z_se(log_w),
        n_proposed=len(first) + steps * chains,
        proposal_means=proposal_means(q_draw),
        acceptance_rate=sum(accepted.values()) / max(sum(proposed.values()), 1),
        columns={
            "chain": [c for c in range(chains) for _ in range(per_chain)],
            "step": [burn_in + thin * (t + 1) - 1 for _ in range(chains) for t in range(per_chain)],
        },
        diagnostics=diagnostics,
        info={
            "acceptance": acceptance,
            "moves": move_probs,
            "chains": chains,
            "burn_in": burn_in,
            "thin": thin,
            "tokens_sampled": tokens,
            "log_z_from": f"importance weights of {len(q_draw)} sequences drawn whole from q",
            "proposal": target.proposal.name,
        },
    )


engine = Engine(
    "mcmc",
    "Metropolis-Hastings chains with independent and local (suffix) moves; R-hat, ESS",
    run,
)
