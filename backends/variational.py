"""Variational inference: fine-tune an LM π toward the posterior p* and return it as a ``Fit``.

Every objective reads the same model graph p̃(x) = a(x)·exp(r(x)/β)·1[c(x)]; the reference
a is the untouched base prior (π trains on a copy; it is never tempered).

- ``reverse_kl``: KL(π‖p*), which *is* KL-regularised RL (DESIGN.md). Samples from π at
  temperature 1 (no top-k/top-p); score-function gradient −E_π[(R − b)∇log π] with the
  per-sequence reward R = log p̃(x) − log π(x) and a leave-one-out baseline b. A hard
  constraint has R = −∞ on violations, so reverse KL fits ``kl.transforms.soften(model,
  penalty)`` (a warning says so): π then targets a·exp(r/β)·exp(−penalty·[violation]).
- ``forward_kl``: KL(p*‖π), DPG/GDC (Khalifa et al. 2021). Samples from a frozen proposal q,
  gradient −E_q[(p̃/(Ẑq) − π/q)∇log π] (the π/q baseline of Korbak et al. 2022 has mean
  zero), Ẑ the running mean of every weight p̃/q drawn so far. q is a copy of π replaced
  only when its estimated KL(p*‖q) is worse than π's (estimated on the step's draws, before
  the update). The default when the model has hard constraints.
- ``js``: Jensen–Shannon, the f-DPG member (Go et al. 2023) with f(t) = ½[t log t −
  (1+t) log((1+t)/2)]: gradient E_q[(π/q)(f′(π/p*) − b)∇log π], f′(t) = ½ log(2t/(1+t)),
  the same proposal and running Ẑ as ``forward_kl``, and a leave-one-out baseline b.

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
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kldsl import weights
from kldsl.errors import KldslInferenceError
from kldsl.fit import Fit, atomic_write, fsync, is_fit_folder, json_safe
from kldsl.graph import Model
from kldsl.infer import Engine
from kldsl.lm import LM, Ids
from kldsl.progress import bar
from kldsl.target import Draw, Target, write_jsonl
from kldsl.transforms import warn_softened, with_prompt

OBJECTIVES = ("reverse_kl", "forward_kl", "js")
_LOG2 = math.log(2.0)


# --- the LM being trained ---------------------------------------------------------------
def module_of(lm: LM) -> torch.nn.Module:
    """The torch module holding an LM's weights: the LM itself, or its ``.model``."""
    if isinstance(lm, torch.nn.Module):
        return lm
    inner = getattr(lm, "model", None)
    if isinstance(inner, torch.nn.Module):
        return inner
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


# --- seeds, checkpoints ---------------------------------------------------------------------
def _shard_seed(base_seed: int, step: int, shard: int) -> int:
    """The seed of one shard of one step (the same on every process)."""
    state = np.random.SeedSequence([base_seed, step, shard]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def _save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    data = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(data, str(tmp)))


def _load_tensors(params: dict[str, torch.nn.Parameter], path: Path) -> None:
    from safetensors.torch import load_file

    stored = load_file(str(path))
    if set(stored) != set(params):
        raise KldslInferenceError(
            f"checkpoint {path} holds other weights than this run trains (was it made with "
            "another model or another lora setting?); start again with overwrite=True "
            "(kldsl fit --overwrite)"
        )
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(stored[k].to(p.device))


def _save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The optimizer's state without a pickle: its tensors (``optimizer.safetensors``, keyed
    ``param/name``) and its hyper-parameters and any plain values (``optimizer.json``)."""
    saved = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for index, entries in saved["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{index}/{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    _save_tensors(tensors, folder / "optimizer.safetensors")
    text = json.dumps({"param_groups": saved["param_groups"], "state": plain})
    atomic_write(folder / "optimizer.json", lambda tmp: tmp.write_text(text))


def _load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore what :func:`_save_optimizer` wrote (no file is unpickled)."""
    from safetensors.torch import load_file

    meta = json.loads((folder / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for index, entries in meta["state"].items():
        state.setdefault(int(index), {}).update(entries)
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _write_checkpoint(
    folder: Path,
    state: dict[str, Any],
    policy: dict[str, torch.nn.Parameter],
    proposal: dict[str, torch.nn.Parameter] | None,
    optimizer: torch.optim.Optimizer,
    keep: int = 2,
) -> Path:
    """Write checkpoints/step-N (each file to a temporary name, fsync'ed, then os.replace)
    and point checkpoints/latest at it last, fsync'ing each folder after each rename, so a
    crash at any moment (of the process or of the machine) leaves the previous one valid."""
    root = folder / "checkpoints"
    final = root / f"step-{state['step']:07d}"
    work = root / f".step-{state['step']:07d}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    created = not root.is_dir()
    work.mkdir(parents=True)
    if created:
        fsync(folder)
    _save_tensors(policy, work / "policy.safetensors")
    if proposal is not None:
        _save_tensors(proposal, work / "proposal.safetensors")
    _save_optimizer(optimizer, work)
    atomic_write(work / "state.json", lambda tmp: tmp.write_text(json.dumps(state)))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(work, final)
    fsync(root)
    atomic_write(root / "latest", lambda tmp: tmp.write_text(final.name))
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# every setting that changes a run's draws or updates; resume refuses any other value
# (``steps`` may change: nothing before the last step depends on it)
_SETTINGS = (
    "objective",
    "model",
    "proposal",
    "batch_size",
    "shards",
    "prompts",
    "lr",
    "lora",
    "penalty",
    "baseline",
    "max_grad_norm",
    "base_seed",
)
_LABELS = {"base_seed": "base_seed (drawn from seed)", "proposal": "proposal (the start LM)"}


def _check_resume(found: Path, stored: dict[str, Any], state: dict[str, Any], steps: int) -> None:
    """Refuse to continue the checkpoint ``stored`` with other settings than it was made with
    (a key an older checkpoint lacks is not compared), or at fewer steps than it has done."""
    changed = [
        f"{_LABELS.get(key, key)}={stored[key]!r} (this run: {state[key]!r})"
        for key in _SETTINGS
        if key in stored and stored[key] != state[key]
    ]
    if changed:
        raise KldslInferenceError(
            f"the checkpoint in {found} was made with other settings than this run has: "
            f"{', '.join(changed)}; resume with the checkpoint's settings (only steps may "
            "change) or pass overwrite=True (kldsl fit --overwrite) to start again"
        )
    if stored["step"] > steps:
        raise KldslInferenceError(
            f"the checkpoint in {found} is at step {stored['step']}, past steps={steps}; resume "
            f"with steps ≥ {stored['step']} or pass overwrite=True (kldsl fit --overwrite) to "
            "start again"
        )


def _check_output_dir(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a run over a folder that holds finished work (checkpoints or a fit)
    unless ``overwrite``; with ``resume`` only a fit with no checkpoint to continue from."""
    if resume and overwrite:
        raise KldslInferenceError(
            "resume=True continues the run in output_dir and overwrite=True starts it again; "
            "pass one of them"
        )
    if overwrite:
        return
    checkpoints = folder / "checkpoints"
    held = []
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        held.append("checkpoints")
    if is_fit_folder(folder):
        held.append("a fit (fit.json)")
    if not resume and held:
        raise KldslInferenceError(
            f"{folder} already holds {' and '.join(held)}; pass resume=True (kldsl fit "
            "--resume) to continue that run, or overwrite=True (kldsl fit --overwrite) to "
            "start again and replace it"
        )
    if resume and latest_checkpoint(folder) is None and is_fit_folder(folder):
        raise KldslInferenceError(
            f"{folder} holds a fit but no checkpoint to continue from; pass overwrite=True "
            "(kldsl fit --overwrite) instead of resume=True to start again and replace it"
        )


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The folder of the latest complete checkpoint under ``folder``, or None."""
    pointer = Path(folder) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


# --- estimators on one batch (all ranks compute them from the gathered batch) ---------------
def _rho(log_pi: Tensor, log_s: Tensor, on_policy: bool) -> Tensor:
    """Self-normalised weights of the draws as samples of π (uniform when drawn from π)."""
    if on_policy:
        return torch.full_like(log_pi, 1.0 / len(log_pi))
    return weights.normalize(log_pi - log_s).exp()


def _metrics(c: dict[str, Tensor], log_z_run: float, on_policy: bool) -> dict[str, float]:
    """KL(π‖a), KL(p*‖π), KL(π‖p*), JS(π, p*), entropy per token, ESS and the means of every
    reward and constraint under π, from one group of draws of s (π for reverse_kl, the
    proposal q otherwise); ``c`` holds the group's columns."""
    log_p, log_s, log_pi, log_a = c["log_p"], c["log_s"], c["log_pi"], c["log_a"]
    n = len(log_p)
    rho = _rho(log_pi, log_s, on_policy)
    log_w = log_p - log_s  # p̃/s: the sampler's importance weights
    out: dict[str, float] = {
        "kl_pi_a": float((rho * (log_pi - log_a)).sum()),
        "entropy_per_token": float(
            (rho * -log_pi).sum() / (rho * c["length"]).sum().clamp(min=1e-12)
        ),
        "ess": weights.ess(log_w),
    }
    if on_policy:  # the shared estimators, with Ẑ from this batch
        out["kl_pi_p"] = weights.kl_q_p(log_w)
        out["kl_p_pi"] = weights.kl_p_q(log_w)
        batch_log_z = float(weights.log_z(log_w))
        log_z = batch_log_z if math.isfinite(batch_log_z) else log_z_run
    else:
        log_z = log_z_run
        out["kl_p_pi"] = _kl_p_r(log_w, log_p - log_pi, log_z, n)
        out["kl_p_q"] = _kl_p_r(log_w, log_w, log_z, n)
        hit = (rho > 0) & torch.isneginf(log_p)
        out["kl_pi_p"] = (
            math.inf if bool(hit.any()) else float((rho * (log_pi - log_p)).sum() + log_z)
        )
    # JS(π, p*) = ½E_π[log 2π/(π+p*)] + ½E_p*[log 2p*/(π+p*)], u = log π/p*
    if math.isfinite(log_z):
        u = log_pi - (log_p - log_z)
        p_over_s = torch.exp(log_w - log_z)
        softplus = torch.nn.functional.softplus
        half_pi = (rho * (_LOG2 - softplus(-u))).sum()
        inside = torch.isfinite(u)
        half_p = torch.where(inside, p_over_s * (_LOG2 - softplus(u)), torch.zeros_like(u))
        out["js"] = float(0.5 * half_pi + 0.5 * half_p.sum() / n)
    else:
        out["js"] = math.nan
    for key, value in c.items():
        if key.startswith(("reward/", "constraint/")):
            out[key] = float((rho * value).sum())
    return out


def _mean_dicts(parts: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise means of equally sized groups' metrics."""
    return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}


def _running_log_z(state: dict[str, Any], k: int) -> float:
    """log Ẑ of prompt k: the log-mean of every weight p̃/s drawn for it so far."""
    count = state["count"][k]
    return state["log_w_sum"][k] - math.log(count) if count else -math.inf


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


def _kl_p_r(log_w: Tensor, log_p_over_r: Tensor, log_z: float, n: int) -> float:
    """KL(p*‖r) from draws of s with weights w = p̃/s: (1/n)Σ (w/Ẑ)(log p̃/r − log Ẑ)."""
    if not math.isfinite(log_z):
        return math.nan
    ratio = torch.exp(log_w - log_z)
    terms = torch.where(ratio > 0, ratio * (log_p_over_r - log_z), torch.zeros_like(ratio))
    return float(terms.sum() / n)


def _loo_mean(values: Tensor) -> Tensor:
    """Leave-one-out means: entry i is the mean of every other entry."""
    n = len(values)
    if n < 2:
        return torch.zeros_like(values)
    return (values.sum() - values) / (n - 1)


def coefficients(
    objective: str,
    *,
    log_p: Tensor,
    log_p_penalized: Tensor,
    log_s: Tensor,
    log_pi: Tensor,
    log_z: float,
    baseline: bool = True,
) -> Tensor:
    """Per-sequence coefficients c with loss = −mean(c · log π(x)) for each objective."""
    if objective == "reverse_kl":
        reward = log_p_penalized - log_s  # log p̃ − log π (π sampled these draws)
        return reward - _loo_mean(reward) if baseline else reward
    if not math.isfinite(log_z):  # no draw has been in the support yet: no signal
        return torch.zeros_like(log_p)
    ratio_pi = torch.exp(log_pi - log_s)  # π/q
    if objective == "forward_kl":
        c = torch.exp(log_p - log_s - log_z)  # p*/q
        return c - ratio_pi if baseline else c
    if objective == "js":
        u = log_pi - (log_p - log_z)  # log π/p* (+∞ outside the support)
        f_prime = 0.5 * (_LOG2 - torch.nn.functional.softplus(-u))
        weighted = ratio_pi * f_prime
        if baseline and len(u) > 1:
            b = (weighted.sum() - weighted) / (ratio_pi.sum() - ratio_pi).clamp(min=1e-300)
        else:
            b = torch.zeros_like(u)
        return -ratio_pi * (f_prime - b)
    raise KldslInferenceError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")


# --- the engine -------------------------------------------------------------------------------
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
) -> Fit:
    model = target.model
    conditions = model.conditions()
    if objective is None:
        objective = "forward_kl" if conditions else "reverse_kl"
    if objective not in OBJECTIVES:
        raise KldslInferenceError(
            f"unknown objective {objective!r}; the variational engine has {', '.join(OBJECTIVES)}"
        )
    softened = None  # the finite-penalty target reverse KL fits, if it differs from model
    if objective == "reverse_kl" and conditions:
        softened = warn_softened(
            model,
            penalty,
            who="reverse_kl",
            why="KL(π‖p*) is infinite while π puts any mass on a violation",
            hint=", or use objective='forward_kl' (the default with constraints)",
        )
    if steps < 0:
        raise KldslInferenceError(f"steps must be ≥ 0, got {steps}")
    if resume and output_dir is None:
        raise KldslInferenceError("resume=True needs the output_dir of the run to continue")
    if output_dir is not None:
        _check_output_dir(Path(output_dir), resume, overwrite)

    start_lm = target.proposal  # the prior, or a given LM to continue from (e.g. fit.model)
    policy = make_policy(start_lm, lora, name)
    pi_module = module_of(policy)
    pi_params = _trainable(pi_module)
    if not pi_params:
        raise KldslInferenceError(f"{start_lm.name} has no trainable parameters")
    on_policy = objective == "reverse_kl"
    proposal = None if on_policy else _clone(policy, share="frozen")
    q_params = None
    if proposal is not None:
        q_module = module_of(proposal)
        named = dict(q_module.named_parameters())
        q_params = {k: named[k] for k in pi_params}
        for p in q_module.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.Adam(list(pi_params.values()), lr=lr)

    acc = accelerator if accelerator is not None else _make_accelerator(pi_module)
    world, rank = acc.num_processes, acc.process_index
    main = acc.is_main_process
    shards = shards or world
    if shards % world or batch_size % shards:
        raise KldslInferenceError(
            f"batch_size {batch_size} must split into {shards} shards and the shards over "
            f"{world} processes evenly; pick shards= dividing batch_size, a multiple of {world}"
        )
    shard_size = batch_size // shards
    mine = range(rank * (shards // world), (rank + 1) * (shards // world))

    base = target.base
    conditional = prompts is not None
    prompt_list = _read_prompts(prompts) if conditional else [base.prompt]
    models: dict[int, Model] = {}  # the model graph conditioned on each prompt
    soft_models: dict[int, Model] = {}  # and its softened graph (reverse KL with constraints)
    folder = Path(output_dir) if output_dir is not None else None
    settings = {  # _SETTINGS, as JSON gives them back from a checkpoint
        "objective": objective,
        "model": str(model),
        "proposal": start_lm.name if start_lm is not target.lm else None,
        "batch_size": batch_size,
        "shards": shards,
        "prompts": prompt_list if conditional else None,
        "lr": lr,
        "lora": _lora_info(lora),
        "penalty": penalty if (objective == "reverse_kl" and conditions) else None,
        "baseline": baseline,
        "max_grad_norm": max_grad_norm,
        "base_seed": int(torch.randint(0, 2**62, (), generator=generator)),
    }
    state: dict[str, Any] = {
        "step": 0,
        "log_w_sum": [-math.inf] * len(prompt_list),  # per prompt: log Σ p̃/s so far
        "count": [0] * len(prompt_list),  # per prompt: draws so far (running Ẑ = Σ/count)
        "proposal_updates": 0,
        **json.loads(json.dumps(json_safe(settings))),
        "history": [],
    }
    if resume:
        found = latest_checkpoint(folder)  # type: ignore[arg-type]
        if found is not None:
            stored = json.loads((found / "state.json").read_text())
            _check_resume(found, stored, state, steps)
            state = stored
            _load_tensors(pi_params, found / "policy.safetensors")
            if q_params is not None:
                _load_tensors(q_params, found / "proposal.safetensors")
            _load_optimizer(optimizer, found)
        elif main:
            warnings.warn(f"no checkpoint in {folder}: starting from step 0", stacklevel=3)
    history: list[dict[str, Any]] = state["history"]

    writer = None
    if folder is not None and main:
        folder.mkdir(parents=True, exist_ok=True)
        if not resume:  # an empty folder, or overwrite=True (_check_output_dir)
            (folder / "fit.json").unlink(missing_ok=True)  # first: no longer a finished fit
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        _rewrite_metrics(folder / "metrics.jsonl", history)
        writer = _tensorboard(folder / "tensorboard", purge_step=state["step"] + 1)

    started = time.perf_counter()
    with bar(steps, f"variational {objective}", progress if main else False, unit="step") as pbar:
        pbar.update(state["step"])
        for step in range(state["step"], steps):
            t0 = time.perf_counter()
            sampler = policy if on_policy else proposal
            ids: list[Ids] = []
            rows: list[Tensor] = []
            log_pis: list[Tensor] = []
            for shard in mine:  # one prompt per shard; a shard is a group with its own baseline
                k = _prompt_index(state["base_seed"], step, shard, len(prompt_list))
                prompt = prompt_list[k]
                if k not in models:
                    models[k] = with_prompt(model, prompt) if conditional else model
                    if softened is not None:
                        soft_models[k] = with_prompt(softened, prompt) if conditional else softened
                gen = torch.Generator().manual_seed(_shard_seed(state["base_seed"], step, shard))
                drawn = sampler.sample(shard_size, base.max_tokens, prompt=prompt, seed=gen)
                log_s = drawn.log_probs.double().cpu()
                log_a = target.lm.score(drawn.ids, prompt=prompt).double()
                density = models[k].log_density(drawn.ids, base_log_probs=log_a)
                if softened is None:
                    log_p_penalized = density.log_p
                else:  # nothing scored or evaluated again: reuse= the exact density's values
                    soft = soft_models[k].log_density(
                        drawn.ids, base_log_probs=log_a, reuse=density
                    )
                    log_p_penalized = soft.log_p
                log_pi = policy.log_prob(drawn.ids, prompt=prompt)
                if not log_pi.requires_grad:
                    raise KldslInferenceError(
                        f"{policy.name}.log_prob returned no gradient; an LM fine-tuned by the "
                        "variational engine needs a differentiable log_prob (kldsl.lm.LM.log_prob)"
                    )
                if main and target.sink is not None:
                    write_jsonl(Draw(drawn.ids, log_s, density), target.sink)
                log_pi_cpu = log_pi.detach().double().cpu()
                rows.append(
                    _columns(density, log_p_penalized, log_s, log_pi_cpu, log_a, drawn.ids, k)
                )
                log_pis.append(log_pi)
                ids.extend(drawn.ids)
            local = torch.cat(rows)
            every = local if world == 1 else acc.gather(local.to(acc.device)).cpu()
            cols = _unpack(every, density)
            # groups: every shard (one prompt each) with prompts=, else the whole batch
            if conditional:
                groups = [slice(g * shard_size, (g + 1) * shard_size) for g in range(shards)]
            else:
                groups = [slice(0, batch_size)]
            keys = [int(cols["prompt"][g.start]) for g in groups]
            for g, k in zip(groups, keys):  # running Ẑ per prompt, this step's draws included
                log_w = cols["log_p"][g] - cols["log_s"][g]
                state["log_w_sum"][k] = float(
                    torch.logaddexp(torch.tensor(state["log_w_sum"][k]), torch.logsumexp(log_w, 0))
                )
                state["count"][k] += len(log_w)
            log_zs = [_running_log_z(state, k) for k in keys]
            coef = torch.cat(
                [
                    coefficients(
                        objective,
                        log_p=cols["log_p"][g],
                        log_p_penalized=cols["log_p_penalized"][g],
                        log_s=cols["log_s"][g],
                        log_pi=cols["log_pi"][g],
                        log_z=log_z,
                        baseline=baseline,
                    )
                    for g, log_z in zip(groups, log_zs)
                ]
            )
            metrics = _mean_dicts(
                [
                    _metrics({k: v[g] for k, v in cols.items()}, log_z, on_policy)
                    for g, log_z in zip(groups, log_zs)
                ]
            )
            seen = [_running_log_z(state, k) for k in range(len(prompt_list)) if state["count"][k]]
            metrics["log_z"] = sum(seen) / len(seen)  # the mean of log Ẑ over prompts seen

            replaced = False
            if proposal is not None and metrics["kl_p_pi"] < metrics["kl_p_q"]:
                with torch.no_grad():  # q ← π (the π that was just evaluated, pre-update)
                    for k, p in pi_params.items():
                        q_params[k].copy_(p)  # type: ignore[index]
                state["proposal_updates"] += 1
                replaced = True

            mine_coef = coef[rank * len(ids) : (rank + 1) * len(ids)]
            log_pi = torch.cat(log_pis)
            loss = -(mine_coef.to(log_pi.device, log_pi.dtype) * log_pi).sum() / batch_size
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            params = list(pi_params.values())
            _all_reduce_grads(params, acc, world)
            if max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            else:
                grad_norm = float(
                    torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
                )
            optimizer.step()

            loss_all = float(-(coef * cols["log_pi"]).mean())
            elapsed = time.perf_counter() - t0
            record = {
                "step": step + 1,
                "loss": loss_all,
                "grad_norm": grad_norm,
                **metrics,
                "samples_per_s": batch_size / max(elapsed, 1e-9),
                "time_s": time.perf_counter() - started,
            }
            if proposal is not None:
                record["proposal_replaced"] = float(replaced)
                record["proposal_updates"] = state["proposal_updates"]
            history.append(record)
            state["step"] = step + 1
            if main:
                pbar.update(1)
                pbar.set_postfix(_postfix(record, objective))
                if folder is not None:
                    with (folder / "metrics.jsonl").open("a", encoding="utf-8") as f:
                        f.write(json.dumps(json_safe(record)) + "\n")
                    _tensorboard_step(writer, record)
            last = step + 1 == steps
            if folder is not None and (
                last or (checkpoint_every and (step + 1) % checkpoint_every == 0)
            ):
                if main:
                    _write_checkpoint(folder, state, pi_params, q_params, optimizer)
                acc.wait_for_everyone()
    if writer is not None:
        writer.close()
    fit = Fit(
        model=policy,
        history=history,
        objective=objective,
        target=model,
        info={
            "engine": "variational",
            "steps": state["step"],
            "batch_size": batch_size,
            "lr": lr,
            "lora": _lora_info(lora),
            "penalty": penalty if (objective == "reverse_kl" and conditions) else None,
            "shards": shards,
            "processes": world,
            "proposal_updates": state["proposal_updates"],
            "log_z": [_running_log_z(state, k) for k in range(len(prompt_list))],
            "prompts": prompt_list if conditional else None,
            "output_dir": str(folder) if folder is not None else None,
        },
    )
    if folder is not None and main:
        fit.save(folder)
    if folder is not None:
        acc.wait_for_everyone()
    return fit


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


def _columns(
    density: Any,
    log_p_penalized: Tensor,
    log_s: Tensor,
    log_pi: Tensor,
    log_a: Tensor,
    ids: list[Ids],
    prompt: int,
) -> Tensor:
    """One float64 row per draw: what every process needs to compute the global step."""
    cols = [
        density.log_p,
        log_p_penalized,
        log_s,
        log_pi,
        log_a,
        torch.tensor([float(len(s)) for s in ids], dtype=torch.float64),
        torch.full((len(ids),), float(prompt), dtype=torch.float64),
    ]
    cols += [v.double() for v in density.rewards.values()]
    cols += [v.double() for v in density.constraints.values()]
    return torch.stack(cols, 1)


def _unpack(matrix: Tensor, density: Any) -> dict[str, Tensor]:
    names = ["log_p", "log_p_penalized", "log_s", "log_pi", "log_a", "length", "prompt"]
    names += [f"reward/{k}" for k in density.rewards]
    names += [f"constraint/{k}" for k in density.constraints]
    return {k: matrix[:, i] for i, k in enumerate(names)}


def _postfix(record: dict[str, Any], objective: str) -> dict[str, str]:
    key = {"reverse_kl": "kl_pi_p", "forward_kl": "kl_p_pi", "js": "js"}[objective]
    return {
        key: f"{record[key]:.4f}",
        "kl_pi_a": f"{record['kl_pi_a']:.3f}",
        "log_z": f"{record['log_z']:.3f}",
        "ent/tok": f"{record['entropy_per_token']:.3f}",
    }


def _rewrite_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(json_safe(r)) + "\n" for r in history)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _tensorboard(folder: Path, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra (kldsl[train])
        warnings.warn("tensorboard is not installed: no event files", stacklevel=3)
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)


def _tensorboard_step(writer: Any, record: dict[str, Any]) -> None:
    if writer is None:
        return
    for key, value in record.items():
        if key != "step" and isinstance(value, int | float) and math.isfinite(value):
            writer.add_scalar(key, value, record["step"])
    writer.flush()


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
