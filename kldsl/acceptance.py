"""The accept/reject loop rejection sampling and quasi-rejection sampling share.

Draw batches from the proposal, accept each draw x with probability exp(log_accept(x)),
stop after ``n`` acceptances or ``max_proposals`` draws. Batch k is drawn, and its
acceptance uniforms are drawn, from generators derived from (seed, k)
(:class:`~kldsl.target.BatchSeeds`), so a resumed ``out=`` file replays its batches through
the same decisions. Of the proposals only their log-weights and running means are kept
(the accepted draws are the result).

Example:
    >>> import kldsl as kl, torch
    >>> target = kl.Target(kl.prior(kl.ToyLM(), max_tokens=3) | kl.contains("a"))
    >>> run = accept_until(target, 5, torch.Generator().manual_seed(0), 16, False,
    ...                    lambda draw: draw.log_w, name="filter")
    >>> len(run.accepted), run.tried >= 5, len(run.proposed_log_w) == run.tried
    (5, True, True)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kldsl.progress import bar
from kldsl.samples import RunningMeans
from kldsl.target import BatchSeeds, Draw, Target


@dataclass
class Acceptance:
    """What an accept/reject run produced."""

    accepted: Draw  # the first n accepted draws
    proposed_log_w: Tensor  # [tried] log-weights of every draw made (estimates under q)
    proposal_means: dict[str, float]  # reward means and constraint rates of every draw made
    hits: int  # every acceptance, also those past n: the unbiased acceptance count
    tried: int  # draws made

    @property
    def rate(self) -> float:
        return self.hits / self.tried


def accept_until(
    target: Target,
    n: int,
    generator: torch.Generator,
    batch_size: int,
    progress: bool | None,
    log_accept: Callable[[Draw], Tensor],
    *,
    name: str,
    max_proposals: int | None = None,
    advice: str = "raise max_proposals or use a better proposal",
) -> Acceptance:
    """Accept draws with probability exp(log_accept(draw)) until ``n`` are accepted.

    Raises the no-support error when nothing is accepted, and warns when ``max_proposals``
    (default 1000·n) runs out first.
    """
    max_proposals = max_proposals or 1000 * n
    seeds = BatchSeeds(generator)
    accepted: list[Draw] = []
    log_ws: list[Tensor] = []
    means = RunningMeans()
    n_accepted = tried = hits = index = 0
    with bar(n, name, progress) as pbar:
        while n_accepted < n and tried < max_proposals:
            size = min(batch_size, max_proposals - tried)
            draw = target.draw_batch(index, size, seeds)
            u = torch.rand(size, generator=seeds(index, "accept"), dtype=torch.float64)
            index += 1
            tried += size
            log_ws.append(draw.log_w)
            means.add(draw)
            keep = (torch.log(u) < log_accept(draw)).nonzero().flatten().tolist()
            hits += len(keep)
            keep = keep[: n - n_accepted]
            if keep:
                accepted.append(draw.select(keep))
                n_accepted += len(keep)
            pbar.update(len(keep))
            pbar.set_postfix(tried=tried, rate=f"{n_accepted / tried:.3g}")
    if n_accepted == 0:
        raise target.no_support_error(tried)
    if n_accepted < n:
        warnings.warn(
            f"{name} stopped at max_proposals={max_proposals}: {n_accepted} of {n} samples "
            f"accepted; {advice}",
            stacklevel=3,
        )
    return Acceptance(Draw.concat(accepted), torch.cat(log_ws), means.means(), hits, tried)
