"""Will a run fit in memory? One rough estimate, checked by ``kl.infer`` before a run starts.

Two things grow with the arguments of a run: the ``n`` samples its result keeps (their ids,
text and log-densities: :func:`sample_bytes` each), and the batch it draws at a time (each
row holds next-token log-probabilities over the vocabulary, its token lists and, for a
transformer, a KV cache over the sequence length: :meth:`kldsl.lm.LM.row_bytes`). When
either would not fit in :data:`FRACTION` of the memory available now, the run fails at
once with a :class:`~kldsl.errors.KldslError` that says what would fit, instead of growing
for minutes and dying in the allocator. The estimates are deliberately on the high side of
what CPython and torch use; they bound orders of magnitude, not bytes.

Example:
    >>> import kldsl as kl
    >>> check_samples(kl.prior(kl.ToyLM(), max_tokens=4), 10**12)
    Traceback (most recent call last):
    ...
    kldsl.errors.KldslError: n=1,000,000,000,000 samples of up to 4 tokens need about ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kldsl.errors import KldslError
from kldsl.graph import Model

if TYPE_CHECKING:
    from kldsl.target import Target

#: the share of the available memory a run may plan to use
FRACTION = 0.8


def available_bytes() -> int:
    """Memory the system can give this process now without swapping (psutil)."""
    import psutil

    return int(psutil.virtual_memory().available)


def sample_bytes(model: Model) -> int:
    """Estimated memory one sample of ``model`` takes in a result: its token ids (Python
    ints in a list), its text, and float64 entries for log q, log p̃, log w and each
    factor's term, reward or constraint; twice, since the batches and their concatenation
    coexist while the result is assembled."""
    tokens = model.base().max_tokens
    fields = 3 + 2 * len(model.factors())
    one = (56 + 36 * tokens) + (49 + 4 * tokens) + 8 * fields + 160  # ids, text, floats, dicts
    return 2 * one


def check_samples(model: Model, n: int) -> None:
    """Raise :class:`KldslError` when ``n`` samples of ``model`` would not fit in memory."""
    per = sample_bytes(model)
    usable = int(FRACTION * available_bytes())
    if n * per > usable:
        raise KldslError(
            f"n={n:,} samples of up to {model.base().max_tokens:,} tokens need about "
            f"{_size(n * per)} of memory to hold (≈ {_size(per)} each), more than the "
            f"{_size(usable)} usable here ({FRACTION:.0%} of what is available); at most "
            f"n ≈ {usable // per:,} fit. Lower n, or split the run into several with their "
            "own seeds and out= files"
        )


def check_batch(target: Target, batch_size: int, kept: int = 0) -> None:
    """Raise :class:`KldslError` when a batch of ``batch_size`` proposals, on top of ``kept``
    samples held, would not fit in memory."""
    lm = target.proposal
    context = len(lm.context_ids(target.base.prompt))
    per_row = lm.row_bytes(context, target.max_tokens) + sample_bytes(target.model)
    held = kept * sample_bytes(target.model)
    usable = int(FRACTION * available_bytes())
    if batch_size * per_row + held <= usable:
        return
    fits = max(usable - held, 0) // per_row
    besides = f" besides the {_size(held)} that {kept:,} kept samples take" if kept else ""
    advice = f"batch_size ≤ {fits:,} fits" if fits else "not even one row fits: lower n"
    raise KldslError(
        f"a batch of {batch_size:,} sequences of up to {target.max_tokens:,} tokens from "
        f"{lm.name} (vocabulary {lm.vocab_size:,}, context {context:,} tokens) needs about "
        f"{_size(batch_size * per_row)} of memory (≈ {_size(per_row)} a sequence){besides}, "
        f"more than the {_size(usable)} usable here ({FRACTION:.0%} of what is available); "
        f"{advice}"
    )


def _size(n: float) -> str:
    """Bytes for a message: 512 B, 3.2 MiB, 7.5 GiB, 1.2e+03 TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} TiB" if n < 1e6 else f"{n:.1e} TiB"
