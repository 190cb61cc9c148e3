"""The LM protocol every prior, proposal and fine-tuned model implements.

A subclass provides ``vocab_size``, ``eos_id``, ``encode``, ``decode`` and a batched
``next_logprobs``; ancestral ``sample``, ``score`` and ``enumerate`` derive from them.

A *sequence* is the list of token ids an LM generated after its prompt context. It ends
with ``eos_id`` when EOS was drawn and is cut at ``max_tokens`` otherwise; its prior
log-probability is the sum of the log-probabilities of exactly the tokens it holds (no
EOS term when cut), so sampling and re-scoring agree.

Example:
    >>> lm = ToyLM(vocab="ab", seed=0)
    >>> batch = lm.sample(4, max_tokens=3, seed=0)
    >>> torch.allclose(batch.log_probs, lm.score(batch.ids))
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kldsl.errors import KldslInferenceError, KldslValueError

Ids = list[int]


@dataclass
class SampleBatch:
    """Sequences drawn from (or enumerated under) an LM, with their exact log-probabilities."""

    ids: list[Ids]  # generated tokens per sequence, EOS included when drawn
    log_probs: Tensor  # [N] float64, log a(x) of each sequence given the prompt

    def __len__(self) -> int:
        return len(self.ids)


def make_generator(seed: int | torch.Generator | None) -> torch.Generator:
    """A CPU generator from a seed (None draws one from torch's global stream)."""
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator()
    gen.manual_seed(int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed))
    return gen


def pick(log_probs: Tensor, tokens: Tensor) -> Tensor:
    """``log_probs[row, tokens[row]]`` for each row of a [B, V] tensor: [B]."""
    return log_probs.gather(1, tokens.to(log_probs.device).unsqueeze(1)).squeeze(1)


def draw(log_probs: Tensor, generator: torch.Generator) -> Tensor:
    """One token per row (on the CPU) from a [B, V] matrix of log-probabilities (pure
    ancestral sampling), drawn with the CPU ``generator``.

    On the CPU it is ``torch.multinomial``. On another device (a GPU) only B uniforms go
    there and B token ids come back: the CDF is inverted where the rows live, so no
    full-vocabulary row crosses to the host. Both are exact; they draw different tokens for
    the same seed.
    """
    if log_probs.device.type == "cpu":
        probs = log_probs.detach().float().exp()
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    u = torch.rand(len(log_probs), generator=generator, dtype=torch.float64)
    return invert_cdf(log_probs, u.to(log_probs.device)).cpu()


def invert_cdf(log_probs: Tensor, u: Tensor) -> Tensor:
    """The token of each row of [B, V] log-probabilities whose CDF interval holds the
    uniform ``u[row]`` in [0, 1), computed where the rows are.

    Example:
        >>> lp = torch.tensor([[0.25, 0.5, 0.25]]).log()
        >>> [int(invert_cdf(lp, torch.tensor([u]))) for u in (0.1, 0.3, 0.8)]
        [0, 1, 2]
    """
    cdf = log_probs.detach().double().exp().cumsum(1)
    # u · total, not u: a row sums to 1 only up to rounding; the clamp guards u · total = total
    tokens = torch.searchsorted(cdf, u.double().unsqueeze(1) * cdf[:, -1:], right=True)
    return tokens.clamp(max=cdf.shape[1] - 1).squeeze(1)


def count_sequences(vocab_size: int, max_tokens: int, cap: int) -> int | None:
    """How many sequences of at most ``max_tokens`` tokens a vocabulary has (each ends at
    EOS or is cut at ``max_tokens``), or None when there are more than ``cap``.

    It stops counting once past ``cap``, so no giant integer is ever built.

    Example:
        >>> count_sequences(3, 2, 100), count_sequences(3, 10**7, 100)
        (7, None)
    """
    branching = vocab_size - 1  # tokens that do not end the sequence
    if branching <= 1:  # one sequence per length (or only "EOS" itself)
        count = max_tokens + 1 if branching == 1 else 1
        return count if count <= cap else None
    count, power = 0, 1
    for _ in range(max_tokens):  # ends at EOS after k tokens: branching**k sequences
        count += power
        if count > cap:
            return None
        power *= branching
    count += power  # cut at max_tokens
    return count if count <= cap else None


def _sequences_shown(vocab_size: int, max_tokens: int) -> str:
    """The number of sequences for a message: exact while small, else ≈ 10^k (log space)."""
    count = count_sequences(vocab_size, max_tokens, 10**15)
    if count is not None:
        return f"{count:,}"
    b = vocab_size - 1  # ≥ 2 here: the count is b^T · b/(b − 1) up to rounding
    exponent = max_tokens * math.log10(b) + math.log10(b / (b - 1))
    return f"about 10^{exponent:,.0f}"


class LM:
    """Base class of every language model kldsl can use as a prior or proposal.

    Subclasses set ``name``, ``vocab_size``, ``eos_id`` (and ``bos_id`` if the model
    starts documents with a BOS token) and implement ``encode``, ``decode`` and
    ``next_logprobs``. Override ``sample`` or ``score`` only to make them faster.
    """

    name: str = "lm"
    vocab_size: int
    eos_id: int
    bos_id: int | None = None
    #: most positions (context and generated tokens together) the model can attend over;
    #: None when it has no limit
    context_limit: int | None = None

    # --- what a subclass provides -------------------------------------------------
    def encode(self, text: str) -> Ids:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def next_logprobs(self, prefixes: list[Ids]) -> Tensor:
        """Log-probabilities [B, V] of the next token after each full context in ``prefixes``."""
        raise NotImplementedError

    # --- derived ------------------------------------------------------------------
    def context_ids(self, prompt: str = "") -> Ids:
        """Token ids the model conditions on: BOS (if the model has one) then the prompt."""
        ids = self.encode(prompt) if prompt else []
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def text(self, ids: Sequence[int]) -> str:
        """The text of a generated sequence (a final EOS is not part of it)."""
        ids = list(ids)
        if ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return self.decode(ids)

    def texts(self, sequences: Sequence[Sequence[int]]) -> list[str]:
        return [self.text(s) for s in sequences]

    def tokenizer_signature(self) -> tuple:
        """What two LMs must share for one to score the other's token ids."""
        probe = "The quick brown fox, 123 ünïcode!"
        return (self.vocab_size, self.eos_id, tuple(self.encode(probe)))

    def check_context(self, prompt: str, max_tokens: int) -> None:
        """Raise :class:`KldslInferenceError` when the prompt's context and ``max_tokens``
        generated tokens do not fit in :attr:`context_limit` positions."""
        limit = self.context_limit
        if limit is None:
            return
        used = len(self.context_ids(prompt))
        if used + max_tokens > limit:
            fixes = []
            if max_tokens < limit:
                fixes.append(f"shorten the prompt to at most {limit - max_tokens:,} tokens")
            if used < limit:
                fixes.append(f"lower max_tokens to at most {limit - used:,}")
            fix = " or ".join(fixes) or "shorten the prompt and lower max_tokens"
            raise KldslInferenceError(
                f"{self.name} attends over at most {limit:,} positions, and the prompt "
                f"({len(prompt):,} characters) takes {used:,} tokens of context plus "
                f"max_tokens={max_tokens:,}: {used + max_tokens:,} positions; {fix}"
            )

    def row_bytes(self, context: int, max_tokens: int) -> int:
        """Estimated memory (bytes) one sequence of a sampling batch holds while it is drawn:
        next-token log-probabilities over the vocabulary and its token lists.

        :mod:`kldsl.budget` multiplies it by the batch size; override it where a model holds
        more per row (a KV cache).
        """
        tokens = context + max_tokens
        # log-probs (float64), their exp (float32) and multinomial's copy, per step; the
        # sequence list and the copy of context + sequence handed to next_logprobs
        return 24 * self.vocab_size + 2 * (56 + 8 * tokens) + 64

    @torch.no_grad()
    def sample(
        self,
        n: int,
        max_tokens: int,
        *,
        prompt: str = "",
        seed: int | torch.Generator | None = 0,
        batch_size: int | None = None,
    ) -> SampleBatch:
        """Draw ``n`` sequences by ancestral sampling, with the log-probs of the same passes."""
        generator = make_generator(seed)
        batch_size = batch_size or n
        ids: list[Ids] = []
        log_probs: list[Tensor] = []
        for start in range(0, n, batch_size):
            part = self._sample_batch(min(batch_size, n - start), max_tokens, prompt, generator)
            ids.extend(part.ids)
            log_probs.append(part.log_probs)
        return SampleBatch(ids, torch.cat(log_probs) if log_probs else torch.zeros(0))

    def _sample_batch(
        self, n: int, max_tokens: int, prompt: str, generator: torch.Generator
    ) -> SampleBatch:
        context = self.context_ids(prompt)
        seqs: list[Ids] = [[] for _ in range(n)]
        total = torch.zeros(n, dtype=torch.float64)
        active = list(range(n))
        for _ in range(max_tokens):
            if not active:
                break
            lp = self.next_logprobs([context + seqs[i] for i in active])
            tokens = draw(lp, generator)
            picked = pick(lp, tokens).double().cpu()
            still = []
            for row, i in enumerate(active):
                tok = int(tokens[row])
                seqs[i].append(tok)
                total[i] += picked[row]
                if tok != self.eos_id:
                    still.append(i)
            active = still
        return SampleBatch(seqs, total)

    @torch.no_grad()
    def sample_continuations(
        self,
        prefixes: Sequence[Sequence[int]],
        max_tokens: int,
        *,
        prompt: str = "",
        seed: int | torch.Generator | None = 0,
    ) -> tuple[list[Ids], list[list[float]]]:
        """A continuation of each generated prefix, with the log-prob of every token drawn.

        Each continuation ends at EOS or when prefix + continuation hold ``max_tokens``
        tokens. MCMC's suffix proposals use it; with empty prefixes it is ancestral sampling.

        Example:
            >>> tails, lps = ToyLM(vocab="ab").sample_continuations([[], [1]], 3)
            >>> [len(t) == len(lp) for t, lp in zip(tails, lps)]
            [True, True]
        """
        if any(len(p) >= max_tokens for p in prefixes):
            raise ValueError(f"a prefix already holds max_tokens={max_tokens} tokens")
        generator = make_generator(seed)
        context = self.context_ids(prompt)
        tails: list[Ids] = [[] for _ in prefixes]
        token_lp: list[list[float]] = [[] for _ in prefixes]
        active = list(range(len(prefixes)))
        while active:
            lp = self.next_logprobs([context + list(prefixes[k]) + tails[k] for k in active])
            tokens = draw(lp, generator)
            picked = pick(lp, tokens).double().cpu()
            still = []
            for row, k in enumerate(active):
                tok = int(tokens[row])
                tails[k].append(tok)
                token_lp[k].append(float(picked[row]))
                if tok != self.eos_id and len(prefixes[k]) + len(tails[k]) < max_tokens:
                    still.append(k)
            active = still
        return tails, token_lp

    @torch.no_grad()
    def token_log_probs(
        self, sequences: Sequence[Sequence[int]], *, prompt: str = ""
    ) -> list[list[float]]:
        """The log-probability of each token of each sequence (they sum to :meth:`score`)."""
        out: list[list[float]] = [[] for _ in sequences]
        for rows, picked in self._positions(sequences, prompt):
            for k, value in zip(rows, picked.double().cpu().tolist()):
                out[k].append(value)
        return out

    @torch.no_grad()
    def score(
        self, sequences: Sequence[Sequence[int]], *, prompt: str = "", batch_size: int = 64
    ) -> Tensor:
        """Exact log-probability [N] (float64) of each sequence given the prompt."""
        out = torch.zeros(len(sequences), dtype=torch.float64)
        for rows, picked in self._positions(sequences, prompt, batch_size):
            out[rows] += picked.double().cpu()
        return out

    def log_prob(self, sequences: Sequence[Sequence[int]], *, prompt: str = "") -> Tensor:
        """Log-probability [N] of each sequence given the prompt, differentiable in the LM's
        parameters: what fine-tuning back-propagates through (:meth:`score` is its no-grad,
        exact twin). This default works when ``next_logprobs`` is differentiable."""
        parts: list[list[Tensor]] = [[] for _ in sequences]
        for rows, picked in self._positions(sequences, prompt):
            for row, i in enumerate(rows):
                parts[i].append(picked[row])
        zero = torch.zeros((), dtype=torch.float64)
        return torch.stack([torch.stack(p).sum().double() if p else zero for p in parts])

    def _positions(
        self, sequences: Sequence[Sequence[int]], prompt: str, batch_size: int | None = None
    ) -> Iterator[tuple[list[int], Tensor]]:
        """Teacher forcing, one position t at a time: the rows (indices of the sequences
        longer than t, in chunks of ``batch_size``) and the log-prob of each one's token t
        given the prompt and its tokens before t (as differentiable as ``next_logprobs``)."""
        context = self.context_ids(prompt)
        longest = max((len(s) for s in sequences), default=0)
        for t in range(longest):
            rows = [i for i, s in enumerate(sequences) if len(s) > t]
            step = batch_size or max(len(rows), 1)
            for start in range(0, len(rows), step):
                chunk = rows[start : start + step]
                lp = self.next_logprobs([context + list(sequences[i][:t]) for i in chunk])
                yield chunk, pick(lp, torch.tensor([sequences[i][t] for i in chunk]))

    def decoder(self, prompt: str = "", n: int = 1, max_tokens: int | None = None) -> Decoding:
        """``n`` rows decoding after the prompt's context, one token per row per step (see
        :class:`Decoding`); ``max_tokens`` bounds how many tokens a row will hold (a model
        with a KV cache preallocates that room). This default re-runs each row's whole
        prefix through :meth:`next_logprobs` at every step; :class:`kldsl.hf.HFLM` keeps a
        KV cache instead.

        Example:
            >>> lm = ToyLM(vocab="ab")
            >>> dec = lm.decoder(n=2)
            >>> dec.extend(torch.tensor([1, 2]))
            >>> torch.allclose(dec.logprobs, lm.next_logprobs([[1], [2]]))
            True
        """
        return PrefixDecoding(self, self.context_ids(prompt), n)

    @torch.no_grad()
    def enumerate(self, max_tokens: int, *, prompt: str = "", limit: int = 200_000) -> SampleBatch:
        """Every sequence of at most ``max_tokens`` tokens with its exact log-probability.

        Their probabilities sum to 1. Raises :class:`KldslInferenceError` when there are
        more than ``limit`` sequences.
        """
        count = count_sequences(self.vocab_size, max_tokens, limit)
        if count is None:
            raise KldslInferenceError(
                f"{self.name} has {_sequences_shown(self.vocab_size, max_tokens)} sequences of at "
                f"most {max_tokens:,} tokens, more than the enumeration limit of {limit:,}; use "
                "a smaller vocabulary or max_tokens, raise `limit`, or pick a sampling engine"
            )
        context = self.context_ids(prompt)
        done_ids: list[Ids] = []
        done_lp: list[float] = []
        frontier: list[tuple[Ids, float]] = [([], 0.0)]
        for depth in range(max_tokens):
            grown: list[tuple[Ids, float]] = []
            for start in range(0, len(frontier), 4096):
                chunk = frontier[start : start + 4096]
                lp = self.next_logprobs([context + p for p, _ in chunk]).double().cpu()
                for row, (prefix, base) in enumerate(chunk):
                    for tok in range(self.vocab_size):
                        seq, value = [*prefix, tok], base + float(lp[row, tok])
                        if tok == self.eos_id or depth == max_tokens - 1:
                            done_ids.append(seq)
                            done_lp.append(value)
                        else:
                            grown.append((seq, value))
            frontier = grown
        return SampleBatch(done_ids, torch.tensor(done_lp, dtype=torch.float64))


class Decoding:
    """Rows of an LM decoding token by token, as a token-level sampler drives them.

    :attr:`logprobs` are the next-token log-probabilities [rows, V] of each live row;
    :meth:`extend` appends one token to every row; :meth:`select` keeps, reorders or
    duplicates rows (dropping finished rows, resampling). :attr:`forwards` counts the
    token positions run so far (rows × steps, the context once).
    """

    logprobs: Tensor
    forwards: int

    @property
    def rows(self) -> int:
        return int(self.logprobs.shape[0])

    def extend(self, tokens: Tensor) -> None:
        """Append ``tokens`` [rows] (one per row) and compute the next log-probabilities."""
        raise NotImplementedError

    def select(self, index: Tensor) -> None:
        """Keep the rows ``index`` [k] (long), in that order; an index may repeat."""
        raise NotImplementedError


class PrefixDecoding(Decoding):
    """The generic :class:`Decoding`: each step runs every row's full prefix."""

    def __init__(self, lm: LM, context: Ids, n: int):
        self.lm, self.context = lm, context
        self.seqs: list[Ids] = [[] for _ in range(n)]
        with torch.no_grad():
            self.logprobs = lm.next_logprobs([list(context)] * n) if n else torch.zeros(0)
        self.forwards = len(context) * min(n, 1)

    def extend(self, tokens: Tensor) -> None:
        if len(tokens) != len(self.seqs):
            raise ValueError(f"{len(tokens)} tokens for {len(self.seqs)} rows")
        for seq, tok in zip(self.seqs, tokens.tolist()):
            seq.append(int(tok))
        self.forwards += sum(len(self.context) + len(s) for s in self.seqs)
        with torch.no_grad():
            self.logprobs = self.lm.next_logprobs([self.context + s for s in self.seqs])

    def select(self, index: Tensor) -> None:
        rows = index.tolist()
        self.seqs = [list(self.seqs[i]) for i in rows]
        self.logprobs = self.logprobs[index.to(self.logprobs.device)]


def torch_module(lm: LM) -> torch.nn.Module | None:
    """The torch module holding an LM's weights: the LM itself (like :class:`ToyLM`), its
    ``.model`` (like ``HFLM``), or None for an LM with no torch weights.

    Example:
        >>> torch_module(ToyLM()) is not None
        True
    """
    if isinstance(lm, torch.nn.Module):
        return lm
    inner = getattr(lm, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else None


class ToyLM(torch.nn.Module, LM):
    """A small-vocabulary bigram LM whose every sequence can be enumerated.

    Token 0 is EOS (printed as nothing); tokens 1.. are the characters of ``vocab``.
    The next-token logits depend on the previous token (or a start state), drawn from
    a seeded normal; ``eos_bias`` shifts EOS up or down. It is a torch module, so it can
    be fine-tuned. It computes in float64, so enumerated probabilities sum to 1 exactly
    up to rounding.

    Example:
        >>> lm = ToyLM(vocab="abc", seed=1)
        >>> float(lm.enumerate(max_tokens=3).log_probs.exp().sum())  # doctest: +ELLIPSIS
        1.0...
    """

    def __init__(
        self,
        vocab: str = "abc",
        seed: int = 0,
        scale: float = 1.0,
        eos_bias: float = 0.0,
        name: str = "toy",
    ):
        torch.nn.Module.__init__(self)
        if len(set(vocab)) != len(vocab) or not vocab:
            raise ValueError("ToyLM vocab must be distinct characters, e.g. 'abc'")
        self.name = name
        self.chars = vocab
        self.vocab_size = len(vocab) + 1
        self.eos_id = 0
        self.bos_id = None
        gen = torch.Generator().manual_seed(seed)
        shape = (self.vocab_size + 1, self.vocab_size)
        logits = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        logits[:, 0] += eos_bias
        logits[self.vocab_size, 0] = -1e4  # the empty sequence is never drawn from the start
        # row v is the context "previous token was v"; the last row is the start state
        self.logits = torch.nn.Parameter(logits)

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __repr__(self) -> str:
        return f"ToyLM(vocab={self.chars!r}, name={self.name!r})"

    def encode(self, text: str) -> Ids:
        try:
            return [self.chars.index(c) + 1 for c in text]
        except ValueError:
            bad = next(c for c in text if c not in self.chars)
            raise KldslValueError(
                f"{bad!r} is not in this ToyLM's vocabulary {self.chars!r}"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - 1] for i in ids if i != self.eos_id)

    def next_logprobs(self, prefixes: list[Ids]) -> Tensor:
        rows = torch.tensor([p[-1] if p else self.vocab_size for p in prefixes], dtype=torch.long)
        return torch.log_softmax(self.logits[rows], dim=-1)

    def log_prob(self, sequences: Sequence[Sequence[int]], *, prompt: str = "") -> Tensor:
        """Differentiable log-probability [N] (float64), vectorised over every token held."""
        start = self.context_ids(prompt)
        start_row = start[-1] if start else self.vocab_size
        prev, tok, owner = [], [], []
        for i, s in enumerate(sequences):
            prev.extend([start_row, *s[:-1]] if s else [])
            tok.extend(s)
            owner.extend([i] * len(s))
        table = torch.log_softmax(self.logits, dim=-1)
        picked = table[torch.tensor(prev, dtype=torch.long), torch.tensor(tok, dtype=torch.long)]
        out = torch.zeros(len(sequences), dtype=table.dtype, device=table.device)
        return out.index_add(0, torch.tensor(owner, dtype=torch.long), picked)

    def tokenizer_signature(self) -> tuple:
        return ("ToyLM", self.chars)
