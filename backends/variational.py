"""Variational inference: fine-tune an LM π toward the posterior p* and return it as a ``Fit``.

Every objective reads the same model graph p̃(x) = a(x)·exp(r(x)/β)·1[c(x)]; the reference
a is the untouched base prior (π trains on a copy; it is never tempered).

- ``reverse_kl``: KL(π‖p*), which *is* KL-regularised RL (Korbak et al. 2022). Sampling π at
  temperature 1 (no top-k/top-p); score-function gradient −E_π[(R − b)∇log π] with the
  per-sequence reward R = log p̃(x) − log π(x) and a leave-one-out baseline b. A hard
  constraint has R = −∞ on violations, so reverse KL fits ``kl.transforms.soften(model,
  penalty)`` (a warning says so): π then targets a·exp(r/β)·exp(−penalty·[violation]).
- ``forward_kl``: KL(p*‖π), DPG/GDC (Khalifa et al. 2021): ∇KL(p*‖π) = −E_p*[∇log π],
  estimated on training samples of p* that are properly weighted, E[w·h(x)] = Z·E_p*[h],
  and self-normalised: gradient −Σ w̄_i ∇log π(x_i), w̄_i = w_i/Σ_j w_j. ``sampler`` names
  the sampling engine that makes them, any registered one (``kl.engines()``):

  * ``"importance"`` (the default): x ~ q, a frozen copy of π (the start LM at first),
    w = p̃/q, minus the zero-mean π/q baseline (E_q[(π/q)∇log π] = Σ ∇π = 0; ``baseline``);
  * ``"rejection"``: exact samples of p* from the prior, equal weights, so the gradient is
    plain maximum likelihood on them, −(1/n)Σ∇log π(x_i); each costs about 1/Z prior draws;
  * any other engine (``"smc"``, ``"qrs"``, ...): its samples and weights, run as
    ``kl.infer(model, engine=sampler, n=batch_size / shards)`` would (the prior as its
    proposal; ``sampler_options`` are its options).

  The default when the model has hard constraints.
- ``js``: Jensen–Shannon, the f-DPG member (Go et al. 2023) with f(t) = ½[t log t −
  (1+t) log((1+t)/2)]. ∇JS = E_π[(f′(π/p*) − b)∇log π] for any constant b; b = f′(∞) =
  ½ log 2 cancels every term outside p*'s support, which leaves an expectation under p*:
  ∇JS = −½E_p*[(π/p*) softplus(log p*/π) ∇log π], estimated with the same weights w̄ as
  ``forward_kl`` and the running Ẑ in p* = p̃/Ẑ (so every sampler serves ``js`` too).

Low ESS. At small Z a batch of q's draws holds a hit or none, and the weights have an ESS
of 1 or 0. Self-normalised, a batch without a hit gives no gradient at all (a running-Ẑ
estimate would still apply the π/q baseline, zero-mean noise that drifts π away from q),
and one hit gives one maximum-likelihood step on it: the weights W sum to n, so the p*
term of a step is never larger than maximum likelihood on the batch. ``min_ess`` also
skips the optimizer step of a batch whose ESS is below it; measured on the exact targets
below, that only slows training (without it Adam's momentum carries the last direction
over an empty batch), so the default 0 never skips.

Proposal updates (importance sampler). Every ``swap_every`` steps, before the update,
``swap_samples`` fresh draws, half from q and half from π, estimate the gain G =
KL(p*‖q) − KL(p*‖π) = E_p*[log π − log q] (log Z cancels) with weights p̃/(½q + ½π), and
its standard error; q ← π only when G > ``swap_z``·SE on weights with an ESS of at least
``swap_min_ess`` (a standard error from one or two hits is itself noise), never on the
training batch's own comparison. Every test's gain, SE and ESS is in the step's metrics
(``swap/gain``, ``swap/se``, ``swap/ess``), its decision in ``proposal_replaced``.

Measured on exact ToyLM targets (``python -m benchmarks.objectives``: KL(p*‖π) after 40
steps at lr 0.1, mean of 3 seeds; Z = 0.011 with batches of 32, from 4.55 nat; Z =
0.00093 with batches of 128, from 6.98 nat), forward_kl: the defaults 0.66 / 2.12;
skipping steps with ESS < 1 1.08 / 4.69; replacing q whenever one fresh batch favours π
0.73 / 1.94 — no better on these targets, and it swaps on noise: in a constructed case it
prefers a π that is 0.35 nat worse in 23 of 200 batches, the evidence rule in none
(tests/test_forward_kl.py).

Any LM that is a ``torch.nn.Module`` (like ``ToyLM``) or holds one in ``.model`` (like
``HFLM``) and has a differentiable ``log_prob`` can be fine-tuned, fully or, with
``lora=dict(r=8, target_modules=[...])`` (or ``lora=True`` for peft's defaults), through
peft LoRA. Batches (``batch_size`` sequences a step, across all processes) are drawn in
``shards`` independently seeded pieces, so a run is reproducible and a run on k processes
(``torchrun --nproc_per_node k``; the loop runs under accelerate — pass ``accelerator=``
to use your own —, gradients are summed with one all-reduce) matches one process with the
same ``shards``. ``n`` is not used: ``steps`` × ``batch_size`` sequences are drawn.

``prompts`` (a list, or a file with one prompt per line) fits a conditional target as in
CDPG (Korbak et al. 2022): each shard draws one prompt c uniformly; p̃(x|c) =
a(x|c)·exp(r(x)/β)·1[…] is the model with every prior's prompt replaced by c; each prompt
keeps its own running Ẑ_c and each shard its own baseline; metrics are means over shards.

With ``output_dir``: per-step metrics go to ``metrics.jsonl`` and TensorBoard
(``tensorboard/``), checkpoints (weights and optimizer state as safetensors, step, Ẑ,
proposal; written atomically, no pickle) to ``checkpoints/`` every ``checkpoint_every`` steps and at the end, and the
final ``Fit`` to the folder itself, so ``kl.prior(output_dir)`` loads the fine-tuned LM.
``resume=True`` continues from the latest checkpoint exactly as if never interrupted; it
refuses a run whose settings differ from the checkpoint's (objective, lr, batch_size, lora,
penalty, seed, prompts, ...), except ``steps``, which may change to continue a run further
(a run continued to more steps is the run with those steps). Without ``resume``, a folder
that already holds checkpoints or a fit is refused unless ``overwrite=True``.

    fit = kl.infer(posterior, engine="variational", steps=200, batch_size=64, lr=1e-4)
    kl.infer(posterior, engine="importance", proposal=fit.model)
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kldsl.backends.variational_state import (
    Checkpoints,
    MetricsLog,
    State,
    StepInfo,
    check_output_dir,
    latest_checkpoint,
    prepare_folder,
)
from torch import Tensor

from kldsl import weights
from kldsl.errors import KldslInferenceError, KldslNoSupportError
from kldsl.estimators import (
    OBJECTIVES,
    Batch,
    coefficients,
    mean_dicts,
    metrics,
    sample_metrics,
    swap_evidence,
)
from kldsl.fit import Fit, json_safe
from kldsl.graph import Model
from kldsl.infer import Engine, get_engine
from kldsl.lm import LM, make_generator, torch_module
from kldsl.progress import bar
from kldsl.target import Draw, Target, write_jsonl
from kldsl.transforms import warn_softened, with_prompt

__all__ = ["OBJECTIVES", "coefficients", "latest_checkpoint", "make_policy", "module_of", "engine"]


# --- the LM being trained ---------------------------------------------------------------
def module_of(lm: LM) -> torch.nn.Module:
    """The torch module holding an LM's weights (:func:`kldsl.lm.torch_module`), or a clear
    error for an LM that has none."""
    module = torch_module(lm)
    if module is not None:
        return module
    raise KldslInferenceError(
        f"{lm.name} cannot be fine-tuned: it is not a torch.nn.Module and holds none in "
        "`.model`. Make your LM a torch.nn.Module with parameters (as kl.ToyLM is) or wrap a "
        "module in `.model` (as HFLM does), and give it a differentiable `log_prob`."
    )


def _with_module(lm: LM, module: torch.nn.Module) -> LM:
    """A copy of ``lm`` that computes with ``module`` (which is a copy of its module)."""
    if isinstance(lm, torch.nn.Module):
        return module  # type: ignore[return-value]
    twin = copy.copy(lm)
    twin.model = module  # type: ignore[attr-defined]
    return twin


def _clone(lm: LM, share: str) -> LM:
    """A copy of ``lm``; ``share`` = "none" (deep copy), "frozen" (share the memory of every
    weight that does not require grad) or "all" (share every weight's memory: only the module
    tree is copied). Shared weights get Parameter objects of their own, so setting
    ``requires_grad`` on the copy leaves the original exactly as it was."""
    module = module_of(lm)
    memo: dict[int, Any] = {}
    if share != "none":
        for p in module.parameters():
            if share == "all" or not p.requires_grad:
                memo[id(p)] = torch.nn.Parameter(p.data, requires_grad=p.requires_grad)
        for b in module.buffers():
            memo[id(b)] = b
    return _with_module(lm, copy.deepcopy(module, memo))


def _lora_config(lora: Any) -> Any:
    from peft import LoraConfig

    if isinstance(lora, LoraConfig):
        return lora
    options = {} if lora is True else dict(lora)
    options.setdefault("r", 8)
    options.setdefault("task_type", "CAUSAL_LM")
    return LoraConfig(**options)


def make_policy(lm: LM, lora: Any = None, name: str | None = None) -> LM:
    """The trainable copy π of ``lm`` (which stays untouched): a deep copy, or with ``lora``
    a peft model on a copy of the module tree that shares the frozen base weights."""
    if lora:
        from peft import get_peft_model

        policy = _clone(lm, share="all")
        peft_model = get_peft_model(module_of(policy), _lora_config(lora))
        peft_model.eval()  # no dropout: the gradient is of the distribution we sample
        policy = _with_module(policy, peft_model)
    else:
        policy = _clone(lm, share="none")
        module_of(policy).requires_grad_(True)
    policy.name = name or f"{lm.name}+fit"
    return policy


def _trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


# --- seeds ---------------------------------------------------------------------------------
def _shard_seed(base_seed: int, step: int, shard: int) -> int:
    """The seed of one shard of one step (the same on every process)."""
    state = np.random.SeedSequence([base_seed, step, shard]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def _prompt_index(base_seed: int, step: int, shard: int, n_prompts: int) -> int:
    """Which prompt a shard of a step conditions on (uniform; the same on every process)."""
    if n_prompts == 1:
        return 0
    return _shard_seed(base_seed, step, shard + (1 << 40)) % n_prompts


def _read_prompts(prompts: Sequence[str] | str | os.PathLike[str]) -> list[str]:
    """A list of prompts, or a text file with one prompt per line (blank lines skipped)."""
    if isinstance(prompts, str | os.PathLike):
        path = Path(prompts)
        if not path.is_file():
            raise KldslInferenceError(
                f"prompts={str(prompts)!r} is not a file; pass a list of prompts or a text "
                "file with one prompt per line"
            )
        found = [line for line in path.read_text("utf-8").splitlines() if line.strip()]
    else:
        found = [str(p) for p in prompts]
    if not found:
        raise KldslInferenceError("prompts= holds no prompt")
    return found


# --- the engine: setup, init, step --------------------------------------------------------
@dataclass
class Trainer:
    """What a run holds fixed from step to step: the target, the LM π trained (its weights
    ``pi_params``) and the proposal q sampled from off-policy (``q_params``; None for
    reverse KL), the optimizer, the accelerator, how a batch splits into shards and
    prompts, and the objective's settings. Built by :func:`setup`; :func:`step` updates its
    weights (and q's) in place."""

    target: Target
    objective: str
    softened: Model | None  # the finite-penalty graph reverse KL fits, if not target.model
    penalty: float | None  # the penalty when softened
    policy: LM
    pi_params: dict[str, torch.nn.Parameter]
    proposal: LM | None
    q_params: dict[str, torch.nn.Parameter] | None
    optimizer: torch.optim.Optimizer
    acc: Any
    batch_size: int
    shards: int
    prompts: list[str]
    conditional: bool  # prompts= given (CDPG): each shard draws a prompt, a group of its own
    baseline: bool
    max_grad_norm: float | None
    sampler: str  # the engine of forward_kl/js's training draws ("importance": from q)
    sampler_engine: Engine | None  # that engine, None when the draws are made here (π or q)
    sampler_options: dict[str, Any]
    min_ess: float
    swap_z: float
    swap_every: int
    swap_samples: int
    swap_min_ess: float
    models: dict[int, Model] = field(default_factory=dict)  # the graph for each prompt
    soft_models: dict[int, Model] = field(default_factory=dict)  # and the softened one
    sampler_targets: dict[int, Target] = field(default_factory=dict)  # the sampler's, per prompt

    @property
    def world(self) -> int:
        return self.acc.num_processes

    @property
    def rank(self) -> int:
        return self.acc.process_index

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def on_policy(self) -> bool:
        return self.objective == "reverse_kl"

    @property
    def shard_size(self) -> int:
        return self.batch_size // self.shards

    @property
    def mine(self) -> range:
        """The shards this process draws."""
        per = self.shards // self.world
        return range(self.rank * per, (self.rank + 1) * per)

    def groups(self, sizes: Sequence[int]) -> list[slice]:
        """The rows of a gathered batch that share a Ẑ and a baseline, given the rows of
        each shard in order (a sampling engine may return fewer than n, as rejection does
        at its draw limit): every shard (one prompt each) with prompts=, else the whole
        batch."""
        if self.conditional:
            ends = np.cumsum([0, *sizes]).tolist()
            return [slice(a, b) for a, b in zip(ends, ends[1:])]
        return [slice(0, int(sum(sizes)))]

    def sampler_target(self, k: int) -> Target:
        """What the sampling engine runs on for prompt k: the model graph, the prior as its
        proposal (as ``kl.infer(model, engine=sampler)`` would), the LMs already loaded."""
        if k not in self.sampler_targets:
            model, _ = self.graphs(k)
            self.sampler_targets[k] = Target(model, runtime=self.target.runtime)
        return self.sampler_targets[k]

    def graphs(self, k: int) -> tuple[Model, Model | None]:
        """The model graph conditioned on prompt k, and its softened graph (or None)."""
        model, softened = self.target.model, self.softened
        if k not in self.models:
            prompt = self.prompts[k]
            self.models[k] = with_prompt(model, prompt) if self.conditional else model
            if softened is not None:
                self.soft_models[k] = (
                    with_prompt(softened, prompt) if self.conditional else softened
                )
        return self.models[k], self.soft_models.get(k)


def _objective(model: Model, objective: str | None, penalty: float) -> tuple[str, Model | None]:
    """The objective (the default for ``model``) and the softened graph reverse KL fits."""
    conditions = model.conditions()
    if objective is None:
        objective = "forward_kl" if conditions else "reverse_kl"
    if objective not in OBJECTIVES:
        raise KldslInferenceError(
            f"unknown objective {objective!r}; the variational engine has {', '.join(OBJECTIVES)}"
        )
    softened = None
    if objective == "reverse_kl" and conditions:
        softened = warn_softened(
            model,
            penalty,
            who="reverse_kl",
            why="KL(π‖p*) is infinite while π puts any mass on a violation",
            hint=", or use objective='forward_kl' (the default with constraints)",
        )
    return objective, softened


def setup(
    target: Target,
    *,
    objective: str,
    softened: Model | None,
    batch_size: int,
    lr: float,
    lora: Any,
    penalty: float,
    baseline: bool,
    max_grad_norm: float | None,
    shards: int | None,
    accelerator: Any,
    name: str | None,
    prompts: Sequence[str] | str | os.PathLike[str] | None,
    sampler: str = "importance",
    sampler_options: dict[str, Any] | None = None,
    min_ess: float = 0.0,
    swap_z: float = 2.0,
    swap_every: int = 4,
    swap_samples: int | None = None,
    swap_min_ess: float = 4.0,
) -> Trainer:
    """π (a copy of the start LM: the prior, or the given proposal), q (a frozen copy of π
    sharing its frozen weights; off-policy objectives with the importance sampler only),
    Adam, the accelerator (yours, or one on π's device) and the layout of a batch over
    shards and processes."""
    sampler_engine = _sampler_engine(objective, sampler)
    if swap_every < 1 or (swap_samples is not None and swap_samples < 2):
        raise KldslInferenceError(
            f"swap_every must be ≥ 1 and swap_samples ≥ 2, got {swap_every} and {swap_samples}"
        )
    start_lm = target.proposal  # the prior, or a given LM to continue from (e.g. fit.model)
    policy = make_policy(start_lm, lora, name)
    pi_module = module_of(policy)
    pi_params = _trainable(pi_module)
    if not pi_params:
        raise KldslInferenceError(f"{start_lm.name} has no trainable parameters")
    off_policy = objective != "reverse_kl" and sampler_engine is None
    proposal = _clone(policy, share="frozen") if off_policy else None
    q_params = None
    if proposal is not None:
        q_module = module_of(proposal)
        named = dict(q_module.named_parameters())
        q_params = {k: named[k] for k in pi_params}
        for p in q_module.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.Adam(list(pi_params.values()), lr=lr)

    acc = accelerator if accelerator is not None else _make_accelerator(pi_module)
    world = acc.num_processes
    shards = shards or world
    if shards % world or batch_size % shards:
        raise KldslInferenceError(
            f"batch_size {batch_size} must split into {shards} shards and the shards over "
            f"{world} processes evenly; pick shards= dividing batch_size, a multiple of {world}"
        )
    conditional = prompts is not None
    return Trainer(
        target=target,
        objective=objective,
        softened=softened,
        penalty=penalty if softened is not None else None,
        policy=policy,
        pi_params=pi_params,
        proposal=proposal,
        q_params=q_params,
        optimizer=optimizer,
        acc=acc,
        batch_size=batch_size,
        shards=shards,
        prompts=_read_prompts(prompts) if conditional else [target.base.prompt],  # type: ignore[arg-type]
        conditional=conditional,
        baseline=baseline,
        max_grad_norm=max_grad_norm,
        sampler=sampler,
        sampler_engine=sampler_engine,
        sampler_options=dict(sampler_options or {}),
        min_ess=min_ess,
        swap_z=swap_z,
        swap_every=swap_every,
        swap_samples=swap_samples or swap_every * batch_size,
        swap_min_ess=swap_min_ess,
    )


def _sampler_engine(objective: str, sampler: str) -> Engine | None:
    """The registered sampling engine forward_kl/js draw from (None: importance from q,
    drawn here in seeded shards); a fitting engine or a sampler for reverse_kl is refused."""
    if sampler == "importance":
        return None
    if objective == "reverse_kl":
        raise KldslInferenceError(
            f"sampler={sampler!r}: reverse_kl learns from π's own draws; sampler= chooses "
            "the training draws of forward_kl and js"
        )
    engine_ = get_engine(sampler)  # an unknown name lists the registered engines
    if engine_.fits:
        raise KldslInferenceError(
            f"sampler={sampler!r} is a fitting engine; pass a sampling engine (importance, "
            "rejection, smc, ...) whose samples forward_kl and js learn from"
        )
    return engine_


def init(tr: Trainer, generator: torch.Generator, *, lr: float, lora: Any) -> State:
    """The state before the first step; its seed (``base_seed``) is drawn from
    ``generator``, and it records every setting resume compares."""
    target = tr.target
    start_lm = target.proposal
    settings = {  # as JSON gives them back from a checkpoint
        "objective": tr.objective,
        "model": str(target.model),
        "proposal": start_lm.name if start_lm is not target.lm else None,
        "batch_size": tr.batch_size,
        "shards": tr.shards,
        "prompts": tr.prompts if tr.conditional else None,
        "lr": lr,
        "lora": _lora_info(lora),
        "penalty": tr.penalty,
        "baseline": tr.baseline,
        "max_grad_norm": tr.max_grad_norm,
        "sampler": tr.sampler,
        "sampler_options": tr.sampler_options,
        "min_ess": tr.min_ess,
        "swap_z": tr.swap_z,
        "swap_every": tr.swap_every,
        "swap_samples": tr.swap_samples,
        "swap_min_ess": tr.swap_min_ess,
        "base_seed": int(torch.randint(0, 2**62, (), generator=generator)),
    }
    settings = json.loads(json.dumps(json_safe(settings)))
    return State(
        step=0,
        log_w_sum=(-math.inf,) * len(tr.prompts),
        count=(0,) * len(tr.prompts),
        proposal_updates=0,
        base_seed=settings.pop("base_seed"),
        settings=settings,
    )


def _draw(tr: Trainer, state: State) -> tuple[list[Batch], list[Tensor]]:
    """This process's shards of the step after ``state``: each shard's columns, and its
    log π (with gradient). Every main-process draw goes to the target's sink."""
    target = tr.target
    sampler = tr.policy if tr.on_policy else tr.proposal
    assert sampler is not None
    batches: list[Batch] = []
    log_pis: list[Tensor] = []
    for shard in tr.mine:  # one prompt per shard; a shard is a group with its own baseline
        k = _prompt_index(state.base_seed, state.step, shard, len(tr.prompts))
        prompt = tr.prompts[k]
        model, soft_model = tr.graphs(k)
        gen = torch.Generator().manual_seed(_shard_seed(state.base_seed, state.step, shard))
        drawn = sampler.sample(tr.shard_size, target.base.max_tokens, prompt=prompt, seed=gen)
        log_s = drawn.log_probs.double().cpu()
        log_a = target.lm.score(drawn.ids, prompt=prompt).double()
        density = model.log_density(drawn.ids, base_log_probs=log_a, lms=target.lms)
        if soft_model is None:
            log_p_penalized = density.log_p
        else:  # nothing scored or evaluated again: reuse= the exact density's values
            soft = soft_model.log_density(
                drawn.ids, base_log_probs=log_a, reuse=density, lms=target.lms
            )
            log_p_penalized = soft.log_p
        log_pi = tr.policy.log_prob(drawn.ids, prompt=prompt)
        if not log_pi.requires_grad:
            raise KldslInferenceError(
                f"{tr.policy.name}.log_prob returned no gradient; an LM fine-tuned by the "
                "variational engine needs a differentiable log_prob (kldsl.lm.LM.log_prob)"
            )
        if tr.main and target.sink is not None:
            write_jsonl(Draw(drawn.ids, log_s, density), target.sink)
        batches.append(
            Batch.of(
                density,
                log_p_penalized=log_p_penalized,
                log_s=log_s,
                log_pi=log_pi.detach().double().cpu(),
                log_a=log_a,
                ids=drawn.ids,
                prompt=k,
            )
        )
        log_pis.append(log_pi)
    return batches, log_pis


def _draw_sampler(tr: Trainer, state: State) -> tuple[list[Batch], list[Tensor]]:
    """Like :func:`_draw`, with each shard's training draws made by the sampling engine
    ``tr.sampler`` (its seed the shard's, so ``kl.infer(model, engine=sampler, n=shard
    size, seed=that seed)`` gives the same samples): weighted samples of p*, log s the
    implied log p̃ − log w, and the engine's Ẑ and proposals spread over its rows."""
    assert tr.sampler_engine is not None
    target = tr.target
    batches: list[Batch] = []
    log_pis: list[Tensor] = []
    for shard in tr.mine:
        k = _prompt_index(state.base_seed, state.step, shard, len(tr.prompts))
        prompt = tr.prompts[k]
        seed = _shard_seed(state.base_seed, state.step, shard)
        options = dict(tr.sampler_options)
        samples = tr.sampler_engine.run(
            tr.sampler_target(k),
            n=tr.shard_size,
            generator=make_generator(seed),
            batch_size=options.pop("batch_size", tr.batch_size),
            progress=False,
            **options,
        )
        rows = len(samples)
        if rows > tr.shard_size:  # a batch's row groups hold at most n a shard
            raise KldslInferenceError(
                f"sampler={tr.sampler!r} returned {rows} samples for n={tr.shard_size}; "
                "the variational engine trains on at most n a shard: drop the option that "
                f"adds samples (sampler_options={tr.sampler_options!r})"
            )
        if rows < tr.shard_size and tr.world > 1:  # the gather takes equal shards
            raise KldslInferenceError(
                f"sampler={tr.sampler!r} returned {rows} of n={tr.shard_size} samples for a "
                "shard; with several processes every shard must hold n: raise the "
                "sampler's draw limit (sampler_options={'max_proposals': ...}) or run in "
                "one process"
            )
        log_w = samples.log_weights.double()
        log_p = samples.log_p.double()
        log_s = torch.where(torch.isfinite(log_w), log_p - log_w, torch.zeros_like(log_w))
        log_a = target.lm.score(samples.ids, prompt=prompt).double()
        log_pi = tr.policy.log_prob(samples.ids, prompt=prompt)
        if tr.main and target.sink is not None:
            write_jsonl(Draw(samples.ids, log_s, samples), target.sink)  # type: ignore[arg-type]
        log_mass = samples.log_z + math.log(samples.n_proposed / rows)  # Σ p̃/s = Ẑ·draws
        batches.append(
            Batch.of(
                samples,
                log_p_penalized=log_p,
                log_s=log_s,
                log_pi=log_pi.detach().double().cpu(),
                log_a=log_a,
                ids=samples.ids,
                prompt=k,
                draws=torch.full((rows,), samples.n_proposed / rows, dtype=torch.float64),
                log_mass=torch.full((rows,), log_mass, dtype=torch.float64),
            )
        )
        log_pis.append(log_pi)
    return batches, log_pis


# the shard index of the proposal-update evidence draws (no batch has it)
_EVIDENCE_SHARD = 1 << 41


def _evidence(tr: Trainer, state: State) -> dict[str, float]:
    """Fresh draws, half from q and half from π (before π's update), for one prompt, and
    :func:`kldsl.estimators.swap_evidence` on them: the gain KL(p*‖q) − KL(p*‖π), its
    standard error and whether to replace q by π. Every process draws the same ones."""
    assert tr.proposal is not None
    k = _prompt_index(state.base_seed, state.step, _EVIDENCE_SHARD, len(tr.prompts))
    prompt = tr.prompts[k]
    model, _ = tr.graphs(k)
    gen = torch.Generator().manual_seed(_shard_seed(state.base_seed, state.step, _EVIDENCE_SHARD))
    half = tr.swap_samples // 2
    n_tokens = tr.target.base.max_tokens
    with torch.no_grad():
        from_q = tr.proposal.sample(half, n_tokens, prompt=prompt, seed=gen)
        from_pi = tr.policy.sample(tr.swap_samples - half, n_tokens, prompt=prompt, seed=gen)
        log_q = torch.cat(
            [from_q.log_probs.double().cpu(), tr.proposal.score(from_pi.ids, prompt=prompt)]
        )
        log_pi = torch.cat(
            [tr.policy.score(from_q.ids, prompt=prompt), from_pi.log_probs.double().cpu()]
        )
    ids = from_q.ids + from_pi.ids
    log_a = tr.target.lm.score(ids, prompt=prompt).double()
    density = model.log_density(ids, base_log_probs=log_a, lms=tr.target.lms)
    return swap_evidence(
        density.log_p, log_q.double(), log_pi.double(), z=tr.swap_z, min_ess=tr.swap_min_ess
    )


def step(tr: Trainer, state: State, *, started: float) -> tuple[State, StepInfo]:
    """One update of π: draw this process's shards (from π, from q, or with the sampling
    engine), gather the batch, add its weights to the running Ẑ, compute the coefficients
    and metrics per group, replace q by π when fresh evidence says π is closer to p* with
    confidence, then one optimizer step on the gradient summed over processes — skipped
    when every group's training weights have an ESS below ``min_ess`` (off-policy).
    ``started``: ``time.perf_counter()`` at the start of the run (for ``time_s``). The new
    state holds the step's record in its history."""
    t0 = time.perf_counter()
    evidence = None
    if tr.proposal is not None and state.step > 0 and state.step % tr.swap_every == 0:
        evidence = _evidence(tr, state)  # π before this step's update: the π that may be q
    try:
        drawn = _draw(tr, state) if tr.sampler_engine is None else _draw_sampler(tr, state)
    except KldslNoSupportError:
        if tr.world > 1:  # the other processes' collective calls would wait for this one
            raise
        return _no_support_step(tr, state, evidence, started=started, t0=t0)
    batches, log_pis = drawn
    local = torch.cat([b.stack() for b in batches])
    every = local if tr.world == 1 else tr.acc.gather(local.to(tr.acc.device)).cpu()
    cols = Batch.unstack(every, like=batches[-1])
    # one process: its shards' own sizes; several: every shard holds n (_draw_sampler)
    sizes = [len(b.log_p) for b in batches] if tr.world == 1 else [tr.shard_size] * tr.shards
    groups = tr.groups(sizes)
    keys = [int(cols.prompt[g.start]) for g in groups]
    for g, k in zip(groups, keys):  # running Ẑ per prompt, this step's draws included
        state = state.with_weights(k, cols.log_mass[g], draws=round(float(cols.draws[g].sum())))
    log_zs = [state.log_z(k) for k in keys]
    parts, skipped = [], 0
    for g, log_z in zip(groups, log_zs):
        c = cols[g]
        log_w = c.log_p - c.log_s  # the sampler's weights p̃/s
        log_z_batch = float(weights.log_z(log_w))  # self-normalised: W = n·w/Σw
        if not tr.on_policy and weights.ess(log_w) < tr.min_ess:
            parts.append(torch.zeros_like(log_w))
            skipped += 1
            continue
        parts.append(
            coefficients(
                tr.objective,
                log_p=c.log_p,
                log_p_penalized=c.log_p_penalized,
                log_s=c.log_s,
                log_pi=c.log_pi,
                log_z=log_z,
                log_z_weights=log_z_batch,
                baseline=tr.baseline and tr.sampler_engine is None,
            )
        )
    coef = torch.cat(parts)
    if tr.sampler_engine is None:
        measured = mean_dicts(
            [metrics(cols[g], log_z, tr.on_policy) for g, log_z in zip(groups, log_zs)]
        )
    else:
        measured = mean_dicts([sample_metrics(cols[g], z) for g, z in zip(groups, log_zs)])
    seen = [state.log_z(k) for k in range(len(tr.prompts)) if state.count[k]]
    measured["log_z"] = sum(seen) / len(seen)  # the mean of log Ẑ over prompts seen
    measured["draws"] = float(cols.draws.sum())
    if not tr.on_policy:
        measured["skipped"] = skipped / len(groups)
    state, replaced = _apply_evidence(tr, state, evidence, measured)

    if skipped == len(groups) and not tr.on_policy:
        grad_norm = 0.0  # no hit to learn from: no step (Adam would move on momentum alone)
    else:
        grad_norm = _update(tr, coef, log_pis, rows=len(local))
    loss = float(-(coef * cols.log_pi).mean())
    return _record(tr, state, measured, replaced, loss, grad_norm, started=started, t0=t0)


def _no_support_step(
    tr: Trainer, state: State, evidence: dict[str, Any] | None, *, started: float, t0: float
) -> tuple[State, StepInfo]:
    """The step when the sampling engine found no draw with p̃ > 0 in a shard: its draws
    enter the running Ẑ with weight zero, π is not updated (nothing to learn from), and a
    pending proposal update is still decided on its evidence."""
    draws = tr.shard_size * len(tr.mine)
    for shard in tr.mine:
        k = _prompt_index(state.base_seed, state.step, shard, len(tr.prompts))
        state = state.with_weights(k, torch.full((1,), -math.inf), draws=tr.shard_size)
    seen = [state.log_z(k) for k in range(len(tr.prompts)) if state.count[k]]
    measured = {"log_z": sum(seen) / len(seen), "draws": float(draws), "skipped": 1.0}
    state, replaced = _apply_evidence(tr, state, evidence, measured)
    return _record(tr, state, measured, replaced, 0.0, 0.0, started=started, t0=t0)


def _apply_evidence(
    tr: Trainer, state: State, evidence: dict[str, Any] | None, measured: dict[str, float]
) -> tuple[State, bool | None]:
    """Record a proposal-update test in ``measured`` and replace q by π when it says so;
    the state and whether q was replaced (None: no frozen proposal)."""
    if tr.proposal is None:
        return state, None
    replaced = False
    if evidence is not None:
        measured.update({f"swap/{key}": value for key, value in evidence.items()})
        measured["draws"] += tr.swap_samples
        replaced = bool(evidence["replace"])
    if replaced:
        assert tr.q_params is not None
        with torch.no_grad():  # q ← π (the π that was just evaluated, pre-update)
            for k, p in tr.pi_params.items():
                tr.q_params[k].copy_(p)
        state = replace(state, proposal_updates=state.proposal_updates + 1)
    return state, replaced


def _record(
    tr: Trainer,
    state: State,
    measured: dict[str, float],
    replaced: bool | None,
    loss: float,
    grad_norm: float,
    *,
    started: float,
    t0: float,
) -> tuple[State, StepInfo]:
    """The step's :class:`StepInfo`, and the state one step on with it in its history."""
    elapsed = time.perf_counter() - t0
    info = StepInfo(
        step=state.step + 1,
        loss=loss,
        grad_norm=grad_norm,
        metrics=measured,
        samples_per_s=measured["draws"] / max(elapsed, 1e-9),
        time_s=time.perf_counter() - started,
        proposal_replaced=replaced,
        proposal_updates=state.proposal_updates if replaced is not None else None,
    )
    return replace(state, step=state.step + 1, history=(*state.history, info.record())), info


def _update(tr: Trainer, coef: Tensor, log_pis: list[Tensor], rows: int) -> float:
    """One optimizer step on −Σ c·log π / batch_size (this process's ``rows`` of ``coef``;
    gradients summed over processes, clipped to ``max_grad_norm``); the gradient norm."""
    mine_coef = coef[tr.rank * rows : (tr.rank + 1) * rows]
    log_pi = torch.cat(log_pis)
    loss = -(mine_coef.to(log_pi.device, log_pi.dtype) * log_pi).sum() / tr.batch_size
    tr.optimizer.zero_grad(set_to_none=False)
    loss.backward()
    params = list(tr.pi_params.values())
    _all_reduce_grads(params, tr.acc, tr.world)
    if tr.max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    tr.optimizer.step()
    return grad_norm


def run(
    target: Target,
    *,
    n: int,
    generator: torch.Generator,
    batch_size: int,
    progress: bool | None,
    objective: str | None = None,
    steps: int = 100,
    lr: float = 1e-4,
    lora: Any = None,
    penalty: float = 10.0,
    baseline: bool = True,
    max_grad_norm: float | None = 1.0,
    output_dir: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    overwrite: bool = False,
    shards: int | None = None,
    accelerator: Any = None,
    name: str | None = None,
    prompts: Sequence[str] | str | os.PathLike[str] | None = None,
    sampler: str = "importance",
    sampler_options: dict[str, Any] | None = None,
    min_ess: float = 0.0,
    swap_z: float = 2.0,
    swap_every: int = 4,
    swap_samples: int | None = None,
    swap_min_ess: float = 4.0,
) -> Fit:
    """Fine-tune a copy of the prior (or of ``proposal``) toward the posterior for ``steps``
    steps of ``batch_size`` draws (``n`` is not used) and return it as a ``Fit``.

    objective: reverse_kl, forward_kl (DPG) or js (default forward_kl with constraints, else reverse_kl)
    steps: optimizer steps
    lr: Adam learning rate
    lora: peft LoRA settings, e.g. {"r": 8, "target_modules": ["c_attn"]} (true: peft's defaults)
    penalty: reverse_kl with constraints: log-density penalty of a violation
    baseline: use the variance-reducing baseline
    max_grad_norm: clip the gradient norm to this (none: no clipping)
    output_dir: folder for metrics, TensorBoard, checkpoints and the fit
    checkpoint_every: steps between checkpoints (0: only at the end)
    resume: continue the run in output_dir from its latest checkpoint
    overwrite: start again over an output_dir that holds a run
    shards: independently seeded pieces of a batch (default: the number of processes)
    accelerator: an accelerate.Accelerator to run under
    name: name of the fine-tuned LM (default: the start LM's name + "+fit")
    prompts: prompts to fit a conditional target (CDPG): a list, or a file with one a line
    sampler: forward_kl/js: the sampling engine of the training draws (importance: from q)
    sampler_options: options of that engine, e.g. {"max_proposals": 100000} for rejection,
        and its batch_size (default: batch_size)
    min_ess: forward_kl/js: skip a step whose training weights have an ESS below this
    swap_z: replace q by π only when the gain exceeds swap_z standard errors
    swap_every: steps between two proposal-update tests (each draws swap_samples)
    swap_samples: draws of each proposal-update test, half from q, half from π
        (default swap_every × batch_size: the test costs as many draws as training)
    swap_min_ess: replace q only when the test's weights have at least this ESS
    """
    objective, softened = _objective(target.model, objective, penalty)
    if steps < 0:
        raise KldslInferenceError(f"steps must be ≥ 0, got {steps}")
    if resume and output_dir is None:
        raise KldslInferenceError("resume=True needs the output_dir of the run to continue")
    folder = Path(output_dir) if output_dir is not None else None
    if folder is not None:
        check_output_dir(folder, resume, overwrite)
    tr = setup(
        target,
        objective=objective,
        softened=softened,
        batch_size=batch_size,
        lr=lr,
        lora=lora,
        penalty=penalty,
        baseline=baseline,
        max_grad_norm=max_grad_norm,
        shards=shards,
        accelerator=accelerator,
        name=name,
        prompts=prompts,
        sampler=sampler,
        sampler_options=sampler_options,
        min_ess=min_ess,
        swap_z=swap_z,
        swap_every=swap_every,
        swap_samples=swap_samples,
        swap_min_ess=swap_min_ess,
    )
    state = init(tr, generator, lr=lr, lora=lora)
    checkpoints = None
    if folder is not None:
        checkpoints = Checkpoints(folder, checkpoint_every, tr.pi_params, tr.q_params, tr.optimizer)
    if resume:
        stored = checkpoints.resume(state, steps)  # type: ignore[union-attr]
        if stored is not None:
            state = stored
        elif tr.main:
            warnings.warn(f"no checkpoint in {folder}: starting from step 0", stacklevel=3)
    log = None
    if folder is not None and tr.main:
        prepare_folder(folder, resume)
        log = MetricsLog(folder, state.history)

    started = time.perf_counter()
    show = progress if tr.main else False
    with bar(steps, f"variational {objective}", show, unit="step") as pbar:
        pbar.update(state.step)
        while state.step < steps:
            state, info = step(tr, state, started=started)
            if tr.main:
                pbar.update(1)
                pbar.set_postfix(_postfix(info.record(), objective))
                if log is not None:
                    log.write(info.record())
            if checkpoints is not None and checkpoints.due(state.step, steps):
                if tr.main:
                    checkpoints.write(state)
                tr.acc.wait_for_everyone()
    if log is not None:
        log.close()
    fit = _fit(tr, state, lr=lr, lora=lora, folder=folder)
    if folder is not None and tr.main:
        fit.save(folder)
    if folder is not None:
        tr.acc.wait_for_everyone()
    return fit


def _fit(tr: Trainer, state: State, *, lr: float, lora: Any, folder: Path | None) -> Fit:
    return Fit(
        model=tr.policy,
        history=list(state.history),
        objective=tr.objective,
        target=tr.target.model,
        info={
            "engine": "variational",
            "steps": state.step,
            "batch_size": tr.batch_size,
            "lr": lr,
            "lora": _lora_info(lora),
            "penalty": tr.penalty,
            "shards": tr.shards,
            "processes": tr.world,
            "proposal_updates": state.proposal_updates,
            "sampler": tr.sampler if not tr.on_policy else None,
            "skipped_steps": sum(1 for r in state.history if r.get("skipped") == 1.0),
            "log_z": [state.log_z(k) for k in range(len(tr.prompts))],
            "prompts": tr.prompts if tr.conditional else None,
            "output_dir": str(folder) if folder is not None else None,
        },
    )


def _make_accelerator(module: torch.nn.Module) -> Any:
    from accelerate import Accelerator

    on_cpu = next(module.parameters()).device.type == "cpu"
    return Accelerator(cpu=on_cpu)


def _all_reduce_grads(params: Sequence[torch.nn.Parameter], acc: Any, world: int) -> None:
    """Sum gradients over processes (each process's loss is already divided by the global
    batch) with one flat all-reduce; works for any LM, with no DDP wrapper."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world == 1:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    flat = acc.reduce(flat, reduction="sum")
    offset = 0
    for p in params:
        size = p.grad.numel()
        p.grad.copy_(flat[offset : offset + size].view_as(p.grad))
        offset += size


def _postfix(record: dict[str, Any], objective: str) -> dict[str, str]:
    key = {"reverse_kl": "kl_pi_p", "forward_kl": "kl_p_pi", "js": "js"}[objective]
    shown = {key: ".4f", "kl_pi_a": ".3f", "log_z": ".3f", "entropy_per_token": ".3f"}
    names = {"entropy_per_token": "ent/tok"}
    return {names.get(k, k): format(record[k], f) for k, f in shown.items() if k in record}


def _lora_info(lora: Any) -> Any:
    if not lora:
        return None
    if lora is True:
        return {}
    if isinstance(lora, dict):
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in lora.items()}
    # a peft LoraConfig: the fields that change what is trained
    keys = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "modules_to_save")
    return _lora_info({k: getattr(lora, k, None) for k in keys})


engine = Engine(
    "variational",
    "fine-tune an LM toward the posterior (reverse KL = KL-regularised RL, forward KL = DPG, "
    "JS = f-DPG); returns a Fit",
    run,
)
