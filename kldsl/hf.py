"""Any Hugging Face causal LM (``AutoModelForCausalLM`` + tokenizer) as a kldsl :class:`LM`.

Sampling runs the shared context once, broadcasts its KV cache to every row and then
steps token by token (into a preallocated cache where the model supports one); scoring
runs the context once per batch and all held tokens in one forward. Both are pure
ancestral (temperature 1) and agree to float tolerance.

Example::

    lm = HFLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")  # a hub name or a local folder
    batch = lm.sample(4, max_tokens=16, prompt="Once upon a time", seed=0)
"""

from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from kldsl.errors import KldslModelLoadError
from kldsl.lm import LM, Decoding, Ids, SampleBatch, draw, make_generator, pick

# keyword arguments of ``from_pretrained`` that the tokenizer needs as well as the model
_SHARED_KWARGS = (
    "revision",
    "token",
    "cache_dir",
    "local_files_only",
    "trust_remote_code",
    "gguf_file",
    "subfolder",
)


class HFLM(LM):
    """A transformers causal LM and its tokenizer behind the kldsl LM protocol.

    ``model`` and ``tokenizer`` stay public so an engine can fine-tune the model in place.

    Example::

        lm = HFLM(model, tokenizer, "mine")  # any AutoModelForCausalLM and its tokenizer
        log_probs = lm.score(lm.sample(2, max_tokens=8).ids)
    """

    #: most tokens (rows x length) one scoring forward may hold; bounds the [B, T, V] logits
    max_tokens_per_forward: int = 2048
    #: most prefixes one ``next_logprobs`` forward may hold
    max_batch: int = 64
    #: score one token per forward through the KV cache, as the sampler computes: sampling and
    #: scoring then agree to about 1e-7 (bitwise when the batches match), at about 4x the CPU
    #: time of one forward per batch, whose float32 noise is about 1e-5 x sqrt(tokens)
    stepwise_score: bool = False
    #: decode at most this many new tokens into a preallocated (static) KV cache, where the
    #: model supports one: each step then writes its keys and values in place, where a
    #: dynamic cache copies the whole cache, broadcast context included, on every step (after
    #: a 256-token prompt that copy costs about a quarter of the time). Longer runs keep the
    #: dynamic cache, which does not hold (and attend over) room that early EOS leaves
    #: empty; 0 never uses a static cache
    static_cache_max_tokens: int = 512

    def __init__(self, model: Any, tokenizer: Any, name: str, *, eos_id: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        model.eval()
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        width = getattr(out, "out_features", None) or getattr(out, "num_embeddings", None)
        self.vocab_size = int(width or _text_config(model).vocab_size)
        found = eos_id if eos_id is not None else _eos_id(model, tokenizer)
        if found is None:
            raise KldslModelLoadError(
                f"{name}: neither the tokenizer nor the model config names an EOS token, so "
                "kldsl cannot tell where a sequence ends; pass eos_id= to HFLM"
            )
        self.eos_id = int(found)
        self.bos_id = tokenizer.bos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None and pad < self.vocab_size else self.eos_id
        positions = getattr(_text_config(model), "max_position_embeddings", None)
        # the stated context length: a longer prompt is refused before it runs (it would be
        # slow, and past what the model was trained on); set None to lift the check
        self.context_limit = int(positions) if positions else None
        params = _forward_params(model)
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keep_kwarg = next(
            (k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        name: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> HFLM:
        """Load a hub name or a local folder with the ordinary Hugging Face loading code, in
        ``dtype`` onto ``device`` (default the CPU; see :func:`placement`).

        Extra keyword arguments go to ``AutoModelForCausalLM.from_pretrained`` (and the
        ones a tokenizer also takes, like ``revision``, to ``AutoTokenizer``). Weights load
        from safetensors files only (``use_safetensors=True``): a ``.bin`` checkpoint is a
        pickle, and a downloaded folder must not be able to run code; pass
        ``use_safetensors=False`` (from Python, never from a .kl file) for a folder you
        trust. ``trust_remote_code`` stays off unless passed. Raises
        :class:`KldslModelLoadError` saying what was tried and what to do.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = os.fspath(name_or_path)
        path = Path(source).expanduser()
        name = name or source
        kwargs.setdefault("use_safetensors", True)
        if path.is_dir():
            source = str(path)
        elif _looks_like_path(source):
            what = "is a file, not a model folder" if path.exists() else "does not exist"
            raise KldslModelLoadError(
                f"cannot load model {source!r}: {path} {what}. Pass a folder holding "
                "config.json, the weights and the tokenizer files (what "
                "model.save_pretrained(folder) and tokenizer.save_pretrained(folder) write), "
                "or a Hugging Face hub name such as 'gpt2'."
            )
        offline = False
        if not path.is_dir() and not kwargs.get("local_files_only") and not _hub_reachable():
            kwargs = {**kwargs, "local_files_only": True}
            offline = True
        tok_kwargs = {k: kwargs[k] for k in _SHARED_KWARGS if k in kwargs}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        except Exception as err:
            reason = " ".join(str(err).split())[:400]
            tried = (
                f"tried AutoTokenizer.from_pretrained({source!r}) and "
                f"AutoModelForCausalLM.from_pretrained({source!r}, dtype={dtype})"
            )
            if path.is_dir():
                todo = (
                    f"check that {path} holds config.json, the weights as .safetensors and the "
                    "tokenizer files of a causal LM (what save_pretrained writes); kldsl does "
                    "not read .bin weights, which are pickles"
                )
            elif offline:
                todo = (
                    "the Hugging Face hub is not reachable from here and the model is not in the "
                    "local Hugging Face cache; download it on a machine online "
                    "(`hf download NAME`) or pass a local model folder"
                )
            else:
                todo = (
                    "check the name on https://huggingface.co (and HF_TOKEN for gated models), "
                    "or pass a local model folder"
                )
            raise KldslModelLoadError(
                f"could not load model {source!r} ({type(err).__name__}: {reason}); {tried}. "
                f"To fix: {todo}."
            ) from err
        if device is not None:
            model.to(device)
        return cls(model, tokenizer, name)

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __repr__(self) -> str:
        return f"HFLM(name={self.name!r}, vocab_size={self.vocab_size})"

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (inputs are moved there)."""
        return next(self.model.parameters()).device

    def row_bytes(self, context: int, max_tokens: int) -> int:
        """Estimated memory of one sampling row: the base estimate plus the float32 logits and
        float64 log-softmax of a step, and the row's KV cache over ``context + max_tokens``
        positions (twice: dropping finished rows copies the cache)."""
        config = _text_config(self.model)
        layers = int(getattr(config, "num_hidden_layers", 0) or 0)
        heads = int(getattr(config, "num_attention_heads", 0) or 0)
        kv_heads = int(getattr(config, "num_key_value_heads", 0) or heads)
        hidden = int(getattr(config, "hidden_size", 0) or 0)
        head_dim = int(getattr(config, "head_dim", 0) or (hidden // heads if heads else 0))
        width = next(self.model.parameters()).element_size()
        kv = 2 * layers * 2 * kv_heads * head_dim * (context + max_tokens) * width
        return super().row_bytes(context, max_tokens) + 12 * self.vocab_size + kv

    # --- tokens -------------------------------------------------------------------
    def encode(self, text: str) -> Ids:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(
            list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def context_ids(self, prompt: str = "") -> Ids:
        """BOS (if any) then the prompt; a model with neither BOS nor prompt starts at EOS."""
        ids = super().context_ids(prompt)
        return ids or [self.eos_id]

    # --- forward passes -------------------------------------------------------------
    def _forward(self, input_ids: Tensor, *, last_only: bool = False, **kwargs: Any) -> Any:
        if last_only and self._keep_kwarg is not None:
            kwargs[self._keep_kwarg] = 1
        if "cache" in kwargs and self._cache_kwarg != "cache":
            kwargs[self._cache_kwarg] = kwargs.pop("cache")
        return self.model(input_ids=input_ids, **kwargs)

    def _prefill(self, context: Ids, cache: Any = None) -> tuple[Any, Tensor]:
        """Run the context once (batch 1), into ``cache`` if given (else a new dynamic one):
        its KV cache and the next-token log-probs [1, V]."""
        ids = torch.tensor([context], dtype=torch.long, device=self.device)
        extra = {} if cache is None else {"cache": cache}
        out = self._forward(ids, last_only=True, use_cache=True, **extra)
        return _cache_of(out, self.name), _log_softmax(out.logits[:, -1])

    def _broadcast(self, context: Ids, rows: int, room: int) -> tuple[Any, Tensor]:
        """Run the context once; a KV cache holding it for each of ``rows`` rows with room
        for ``room`` more tokens, and the next-token log-probs [rows, V]."""
        cache, lp = self._prefill(context, self._static_cache(len(context), room))
        _keep_rows(cache, torch.zeros(rows, dtype=torch.long, device=self.device))
        return cache, lp.expand(rows, -1)

    def _static_cache(self, context: int, room: int) -> Any | None:
        """An empty static cache for ``context`` + ``room`` positions, or None (decode with the
        dynamic cache) for long runs or where the model or the installed transformers has none."""
        if not 0 < room <= self.static_cache_max_tokens:
            return None
        if not getattr(self.model, "_can_compile_fullgraph", False):
            return None  # transformers' flag for models whose attention takes a static cache
        try:
            from transformers.cache_utils import StaticCache, StaticLayer

            cache = StaticCache(config=self.model.config, max_cache_len=context + room)
        except (ImportError, TypeError, ValueError, AttributeError):
            return None
        if not all(isinstance(layer, StaticLayer) for layer in getattr(cache, "layers", [None])):
            return None
        return cache

    @torch.no_grad()
    def next_logprobs(self, prefixes: list[Ids]) -> Tensor:
        """Log-probabilities [B, V] (float32, CPU) of the token after each prefix."""
        if any(len(p) == 0 for p in prefixes):
            raise ValueError("next_logprobs needs a non-empty prefix; use context_ids(prompt)")
        parts = [
            self._next_logprobs(prefixes[i : i + self.max_batch])
            for i in range(0, len(prefixes), self.max_batch)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, self.vocab_size)

    def _next_logprobs(self, prefixes: list[Ids]) -> Tensor:
        ids, mask = pad(prefixes, self.pad_id, left=True)  # the last position is real
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        device = self.device
        out = self._forward(
            ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=False,
            last_only=True,
        )
        return _log_softmax(out.logits[:, -1]).float().cpu()

    def decoder(self, prompt: str = "", n: int = 1, max_tokens: int | None = None) -> Decoding:
        """``n`` rows decoding after the prompt through one KV cache: the context runs once
        and is broadcast to every row (into a static cache with room for ``max_tokens``
        where the model takes one), each step runs one token per row, and
        :meth:`Decoding.select` reorders or duplicates the cache rows (no recomputation)."""
        return CachedDecoding(self, self.context_ids(prompt), n, max_tokens or 0)

    # --- fast sampling and scoring --------------------------------------------------
    @torch.no_grad()
    def _sample_batch(
        self, n: int, max_tokens: int, prompt: str, generator: torch.Generator
    ) -> SampleBatch:
        """Ancestral sampling with one shared context pass and a broadcast KV cache.

        Rows that drew EOS leave the batch (and the cache), so they stop costing compute and
        the generator is consumed exactly as :meth:`LM._sample_batch` consumes it.
        """
        seqs: list[Ids] = [[] for _ in range(n)]
        total = torch.zeros(n, dtype=torch.float64)
        if n == 0 or max_tokens <= 0:
            return SampleBatch(seqs, total)
        cache, lp = self._broadcast(self.context_ids(prompt), n, max_tokens)
        active = torch.arange(n)  # sequence index of each batch row
        for step in range(max_tokens):
            tokens = draw(lp, generator)
            picked = pick(lp, tokens).double().cpu()
            total[active] += picked
            for row, i in enumerate(active.tolist()):
                seqs[i].append(int(tokens[row]))
            going = tokens != self.eos_id
            if step == max_tokens - 1 or not bool(going.any()):
                break
            if not bool(going.all()):
                keep = going.nonzero().squeeze(1)
                _keep_rows(cache, keep.to(self.device))
                active, tokens = active[keep], tokens[keep]
            out = self._forward(
                tokens.unsqueeze(1).to(self.device), cache=cache, use_cache=True, last_only=True
            )
            lp = _log_softmax(out.logits[:, -1])
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
        """Continuations of ragged prefixes with one left-padded prefill and a KV cache.

        Draws exactly what :meth:`LM.sample_continuations` draws for the same generator
        (rows leave the batch as they finish), at one token forward per step instead of a
        forward over every whole prefix.
        """
        if any(len(p) >= max_tokens for p in prefixes):
            raise ValueError(f"a prefix already holds max_tokens={max_tokens} tokens")
        generator = make_generator(seed)
        context = self.context_ids(prompt)
        tails: list[Ids] = [[] for _ in prefixes]
        token_lp: list[list[float]] = [[] for _ in prefixes]
        for start in range(0, len(prefixes), self.max_batch):
            rows = list(range(start, min(start + self.max_batch, len(prefixes))))
            full = [context + list(prefixes[k]) for k in rows]
            budget = torch.tensor([max_tokens - len(prefixes[k]) for k in rows])
            ids, mask = pad(full, self.pad_id, left=True)  # the last position is real
            device = self.device
            out = self._forward(
                ids.to(device),
                attention_mask=mask.to(device),
                position_ids=(mask.cumsum(1) - 1).clamp(min=0).to(device),
                use_cache=True,
                last_only=True,
            )
            cache = _cache_of(out, self.name)
            lp = _log_softmax(out.logits[:, -1])
            active = torch.tensor(rows)  # sequence index of each batch row
            position = mask.sum(1)  # position id of the next token of each row
            while True:
                tokens = draw(lp, generator)
                picked = pick(lp, tokens).double()
                for row, k in enumerate(active.tolist()):
                    tails[k].append(int(tokens[row]))
                    token_lp[k].append(float(picked[row]))
                lengths = torch.tensor([len(tails[k]) for k in active.tolist()])
                going = (tokens != self.eos_id) & (lengths < budget)
                if not bool(going.any()):
                    break
                if not bool(going.all()):
                    keep = going.nonzero().squeeze(1)
                    cache.batch_select_indices(keep.to(device))
                    active, tokens, mask = active[keep], tokens[keep], mask[keep]
                    position, budget = position[keep], budget[keep]
                mask = torch.cat([mask, torch.ones(len(active), 1, dtype=torch.long)], 1)
                out = self._forward(
                    tokens.unsqueeze(1).to(device),
                    attention_mask=mask.to(device),
                    position_ids=position.unsqueeze(1).to(device),
                    cache=cache,
                    use_cache=True,
                    last_only=True,
                )
                position = position + 1
                lp = _log_softmax(out.logits[:, -1])
        return tails, token_lp

    @torch.no_grad()
    def score(
        self, sequences: Sequence[Sequence[int]], *, prompt: str = "", batch_size: int = 64
    ) -> Tensor:
        """Exact log-probability [N] (float64) of each sequence given the prompt.

        The context runs once per batch; the right-padded sequences then run in one forward
        (or step by step like the sampler when ``stepwise_score`` is set).
        """
        out = torch.zeros(len(sequences), dtype=torch.float64)
        order = sorted(
            (i for i, s in enumerate(sequences) if len(s)), key=lambda i: -len(sequences[i])
        )
        context = self.context_ids(prompt)
        start = 0
        while start < len(order):  # longest first, so each batch pads little
            longest = len(sequences[order[start]])
            rows = batch_size
            if not self.stepwise_score:
                rows = max(1, min(batch_size, self.max_tokens_per_forward // longest))
            chunk = order[start : start + rows]
            start += len(chunk)
            ids, _ = pad([sequences[i] for i in chunk], self.pad_id, width=longest)
            lengths = torch.tensor([len(sequences[i]) for i in chunk])
            if self.stepwise_score:  # every chunk's cache has the room of the longest sequence
                held = self._score_stepwise(context, ids, lengths, room=len(sequences[order[0]]))
            else:
                held = self._score_forward(context, ids, lengths)
            out[torch.tensor(chunk)] = held
        return out

    def _score_forward(self, context: Ids, ids: Tensor, lengths: Tensor) -> Tensor:
        """Sum of held-token log-probs of right-padded ``ids`` [B, T]: one forward."""
        device = self.device
        rows, longest = ids.shape
        mask = torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)
        cache, first = self._prefill(context)
        picked = [first.expand(rows, -1).gather(1, ids[:, :1].to(device)).cpu()]
        if longest > 1:
            cache.batch_repeat_interleave(rows)
            full_mask = torch.cat([torch.ones(rows, len(context), dtype=torch.long), mask], 1)
            logits = self._forward(
                ids[:, :-1].to(device),
                attention_mask=full_mask[:, :-1].long().to(device),
                cache=cache,
                use_cache=True,
            ).logits
            held = logits.gather(2, ids[:, 1:].to(device).unsqueeze(2)).squeeze(2).double()
            # row by row: a float64 copy of one row's logits stays small
            norm = torch.stack([row.double().logsumexp(-1) for row in logits])
            picked.append((held - norm).cpu())
        held_lp = torch.cat(picked, 1)
        return torch.where(mask, held_lp, torch.zeros_like(held_lp)).sum(1)

    def _score_stepwise(self, context: Ids, ids: Tensor, lengths: Tensor, room: int) -> Tensor:
        """Sum of held-token log-probs of ``ids`` [B, T] (rows longest first), one token per
        forward through a KV cache with ``room`` positions after the context: the sampler's
        own computation when ``room`` is its ``max_tokens``."""
        rows, longest = ids.shape
        total = torch.zeros(rows, dtype=torch.float64)
        cache, lp = self._broadcast(context, rows, room)
        for step in range(longest):
            total[:rows] += lp.gather(1, ids[:rows, step : step + 1].to(lp.device)).squeeze(1).cpu()
            alive = int((lengths > step + 1).sum())
            if alive == 0:
                break
            if alive < rows:  # finished rows are the last ones: drop them like the sampler
                rows = alive
                _keep_rows(cache, torch.arange(rows, device=self.device))
            step_ids = ids[:rows, step : step + 1].to(self.device)
            out = self._forward(step_ids, cache=cache, use_cache=True, last_only=True)
            lp = _log_softmax(out.logits[:, -1])
        return total

    # --- fine-tuning ------------------------------------------------------------------
    def log_prob(self, sequences: Sequence[Sequence[int]], *, prompt: str = "") -> Tensor:
        """Log-probability [N] (float64) of each sequence given the prompt, differentiable in
        the model's parameters: what fine-tuning back-propagates through.

        Context and right-padded sequences run in one forward per chunk of rows (at most
        ``max_tokens_per_forward`` tokens); the log-softmax is float32, so values agree with
        the exact :meth:`score` to about 1e-5 per token.
        """
        context = self.context_ids(prompt)
        device = self.device
        width = len(context)
        out: list[Tensor] = []
        start = 0
        while start < len(sequences):
            longest = max(1, max(len(s) for s in sequences[start:]))
            rows = max(1, self.max_tokens_per_forward // (width + longest))
            chunk = [list(s) for s in sequences[start : start + rows]]
            start += len(chunk)
            longest = max(1, max(len(s) for s in chunk))
            ids, mask = pad([context + seq for seq in chunk], self.pad_id, width=width + longest)
            kwargs: dict[str, Any] = {"attention_mask": mask.to(device), "use_cache": False}
            if self._keep_kwarg is not None:  # only the positions that predict held tokens
                kwargs[self._keep_kwarg] = longest + 1
            logits = self._forward(ids.to(device), **kwargs).logits[:, -(longest + 1) : -1]
            held = logits.float().log_softmax(-1).gather(2, ids[:, width:].to(device).unsqueeze(2))
            keep = mask[:, width:].to(device).bool()
            held = torch.where(keep, held.squeeze(2), torch.zeros_like(held.squeeze(2)))
            out.append(held.sum(1).double())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


class CachedDecoding(Decoding):
    """:class:`Decoding` of an :class:`HFLM` over a KV cache (see :meth:`HFLM.decoder`).

    Its log-probabilities are float64 on the model's device, as :meth:`HFLM.sample`
    computes them, so decoding and sampling draw the same tokens from the same generator.
    """

    @torch.no_grad()
    def __init__(self, lm: HFLM, context: Ids, n: int, room: int):
        self.lm = lm
        self.cache, self.logprobs = lm._broadcast(context, n, room)
        self.forwards = len(context)

    @torch.no_grad()
    def extend(self, tokens: Tensor) -> None:
        if len(tokens) != self.rows:
            raise ValueError(f"{len(tokens)} tokens for {self.rows} rows")
        out = self.lm._forward(
            tokens.unsqueeze(1).to(self.lm.device), cache=self.cache, use_cache=True, last_only=True
        )
        self.forwards += len(tokens)
        self.logprobs = _log_softmax(out.logits[:, -1])

    def select(self, index: Tensor) -> None:
        index = index.to(self.lm.device)
        _keep_rows(self.cache, index)
        self.logprobs = self.logprobs.index_select(0, index)


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def placement(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> dict[str, Any]:
    """The ``device`` and ``dtype`` keywords of :meth:`HFLM.from_pretrained` from what a user
    wrote (``"cuda"``, ``"cuda:1"``, ``"bf16"``, ``"bfloat16"``, ``"fp16"``, ...), checked;
    only the ones given.

    Example:
        >>> placement("cpu", "bf16")
        {'device': device(type='cpu'), 'dtype': torch.bfloat16}
    """
    out: dict[str, Any] = {}
    if device is not None:
        try:
            out["device"] = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise KldslModelLoadError(
                f"unknown device {device!r} ({err}); use cpu, cuda or cuda:N"
            ) from err
        if out["device"].type == "cuda" and not torch.cuda.is_available():
            raise KldslModelLoadError(
                f"device {device!r} asked for, but torch sees no CUDA GPU here (torch "
                f"{torch.__version__}); install a CUDA build of torch or use device='cpu'"
            )
    if dtype is not None:
        chosen = dtype if isinstance(dtype, torch.dtype) else _DTYPES.get(str(dtype).lower())
        if chosen is None:
            raise KldslModelLoadError(
                f"unknown dtype {dtype!r}; use one of {', '.join(sorted(set(_DTYPES)))}"
            )
        out["dtype"] = chosen
    return out


def pad(
    rows: Sequence[Sequence[int]], pad_id: int, *, left: bool = False, width: int | None = None
) -> tuple[Tensor, Tensor]:
    """Token ids [B, width] (long) of ragged ``rows`` padded with ``pad_id``, and the
    attention mask (1 on real tokens); ``left`` pads before the tokens (so every row's last
    position is real), otherwise after. ``width`` defaults to the longest row.

    Example:
        >>> ids, mask = pad([[5], [6, 7]], 0, left=True)
        >>> ids.tolist(), mask.tolist()
        ([[0, 5], [6, 7]], [[0, 1], [1, 1]])
    """
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, tokens in enumerate(rows):
        span = slice(width - len(tokens), width) if left else slice(0, len(tokens))
        ids[row, span] = torch.tensor(list(tokens), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def _cache_of(out: Any, name: str) -> Any:
    """The KV cache a forward with ``use_cache=True`` returned (its name varies by version)."""
    cache = out.get("cache", None)
    if cache is None:
        cache = out.get("past_key_values", None)
    if cache is None:
        raise RuntimeError(f"{name}: the model returned no KV cache with use_cache=True")
    return cache


def _keep_rows(cache: Any, index: Tensor) -> None:
    """Keep (or repeat) the batch rows ``index`` of a KV cache, static or dynamic."""
    from transformers.cache_utils import StaticCache

    if isinstance(cache, StaticCache):  # its layers have no batch methods of their own
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
    else:
        cache.batch_select_indices(index)


def _log_softmax(logits: Tensor) -> Tensor:
    """Log-softmax in float64: float32's sum over a large vocabulary is biased low by about
    1e-5, which would add up over a sequence and split sampling from scoring."""
    return logits.double().log_softmax(-1)


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _first(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _eos_id(model: Any, tokenizer: Any) -> int | None:
    """The tokenizer's EOS, else the generation config's, else the model config's."""
    candidates = [tokenizer.eos_token_id]
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        candidates.append(generation.eos_token_id)
    candidates.append(getattr(_text_config(model), "eos_token_id", None))
    return next((e for e in map(_first, candidates) if e is not None), None)


def _forward_params(model: Any) -> set[str]:
    """Parameter names of the forward of the model (looking through wrappers like peft)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(inner.forward).parameters)


def _looks_like_path(source: str) -> bool:
    """Whether a string names a local path rather than a hub id like ``org/name``."""
    if source.startswith(("/", ".", "~")) or Path(source).exists():
        return True
    if os.sep != "/" and os.sep in source:
        return True
    return source.count("/") > 1


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection (skipped behind a proxy).

    Offline, the hub client retries for about a minute before failing; this check lets
    kldsl go straight to the local Hugging Face cache and a clear error instead.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(v) for v in proxies):
        return True
    url = urlparse(constants.ENDPOINT)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True
