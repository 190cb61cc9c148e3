"""The variational engine's training state and the files it lives in.

:class:`State` is everything a run carries from one step to the next besides the weights
(which live in the LMs' modules and the optimizer): the step, the running Ẑ per prompt,
the proposal's replacements, the settings that fix the run's draws (with the seed) and the
per-step history. :class:`Checkpoints` writes it with the weights and the optimizer to
``checkpoints/step-N`` (``state.json``: :meth:`State.to_json`; atomically, no pickle) and
reads it back; :class:`MetricsLog` writes each step's record to ``metrics.jsonl`` and
TensorBoard.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kldsl.errors import KldslInferenceError
from kldsl.fit import atomic_write, fsync, is_fit_folder, json_safe

# every setting that changes a run's draws or updates; resume refuses any other value
# (``steps`` may change: nothing before the last step depends on it). ``base_seed`` is
# State.base_seed, the others State.settings.
SETTINGS = (
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
    "sampler",
    "sampler_options",
    "min_ess",
    "swap_z",
    "swap_every",
    "swap_samples",
    "swap_min_ess",
    "base_seed",
)
_LABELS = {"base_seed": "base_seed (drawn from seed)", "proposal": "proposal (the start LM)"}


@dataclass(frozen=True)
class State:
    """A run between two steps (the weights aside)."""

    step: int  # steps done
    log_w_sum: tuple[float, ...]  # per prompt: log Σ p̃/s of every draw so far
    count: tuple[int, ...]  # per prompt: draws so far (running Ẑ = Σ/count)
    proposal_updates: int  # times the proposal q was replaced by π
    base_seed: int  # every shard's seed and prompt derive from it (drawn from seed=)
    settings: dict[str, Any]  # SETTINGS but base_seed, as JSON gives them back
    history: tuple[dict[str, Any], ...] = ()  # one record per step done

    def log_z(self, k: int) -> float:
        """log Ẑ of prompt k: the log-mean of every weight p̃/s drawn for it so far."""
        count = self.count[k]
        return self.log_w_sum[k] - math.log(count) if count else -math.inf

    def with_weights(self, k: int, log_w: Tensor, draws: int | None = None) -> State:
        """The state with the log-weights ``log_w`` of draws for prompt k added to its Ẑ;
        ``draws``: how many draws they sum over (default one each: importance draws; a
        rejection run's rows stand for all its proposals)."""
        log_w_sum, count = list(self.log_w_sum), list(self.count)
        log_w_sum[k] = float(torch.logaddexp(torch.tensor(log_w_sum[k]), torch.logsumexp(log_w, 0)))
        count[k] += len(log_w) if draws is None else draws
        return replace(self, log_w_sum=tuple(log_w_sum), count=tuple(count))

    def compared(self) -> dict[str, Any]:
        """The values of SETTINGS (what resume compares)."""
        return {**self.settings, "base_seed": self.base_seed}

    def to_json(self) -> dict[str, Any]:
        """``state.json``: one flat dict (the settings among the counters)."""
        return {
            "step": self.step,
            "log_w_sum": list(self.log_w_sum),
            "count": list(self.count),
            "proposal_updates": self.proposal_updates,
            **self.compared(),
            "history": list(self.history),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        """The state a ``state.json`` holds (a setting an older one lacks stays absent)."""
        return cls(
            step=data["step"],
            log_w_sum=tuple(data["log_w_sum"]),
            count=tuple(data["count"]),
            proposal_updates=data["proposal_updates"],
            base_seed=data["base_seed"],
            settings={k: data[k] for k in SETTINGS if k in data and k != "base_seed"},
            history=tuple(data["history"]),
        )


@dataclass(frozen=True)
class StepInfo:
    """What one step measured; :meth:`record` is its entry of the history."""

    step: int  # the steps done after it
    loss: float  # −mean(c · log π) over the whole batch
    grad_norm: float  # before clipping
    metrics: dict[str, float] = field(default_factory=dict)  # kldsl.estimators.metrics, log_z
    samples_per_s: float = 0.0
    time_s: float = 0.0  # since the run (this process) started
    proposal_replaced: bool | None = None  # None on-policy (no proposal)
    proposal_updates: int | None = None

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "step": self.step,
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            **self.metrics,
            "samples_per_s": self.samples_per_s,
            "time_s": self.time_s,
        }
        if self.proposal_replaced is not None:
            out["proposal_replaced"] = float(self.proposal_replaced)
            out["proposal_updates"] = self.proposal_updates
        return out


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


def check_output_dir(folder: Path, resume: bool, overwrite: bool) -> None:
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


def check_resume(found: Path, stored: State, fresh: State, steps: int) -> None:
    """Refuse to continue the checkpoint ``stored`` with other settings than it was made with
    (a key an older checkpoint lacks is not compared), or at fewer steps than it has done."""
    old, new = stored.compared(), fresh.compared()
    changed = [
        f"{_LABELS.get(key, key)}={old[key]!r} (this run: {new[key]!r})"
        for key in SETTINGS
        if key in old and old[key] != new[key]
    ]
    if changed:
        raise KldslInferenceError(
            f"the checkpoint in {found} was made with other settings than this run has: "
            f"{', '.join(changed)}; resume with the checkpoint's settings (only steps may "
            "change) or pass overwrite=True (kldsl fit --overwrite) to start again"
        )
    if stored.step > steps:
        raise KldslInferenceError(
            f"the checkpoint in {found} is at step {stored.step}, past steps={steps}; resume "
            f"with steps ≥ {stored.step} or pass overwrite=True (kldsl fit --overwrite) to "
            "start again"
        )


class Checkpoints:
    """The checkpoints of a run in ``folder``: the trained weights ``policy``, the proposal's
    (or None), the optimizer and the State, every ``every`` steps and at the last."""

    def __init__(
        self,
        folder: Path,
        every: int,
        policy: dict[str, torch.nn.Parameter],
        proposal: dict[str, torch.nn.Parameter] | None,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        self.folder, self.every = folder, every
        self.policy, self.proposal, self.optimizer = policy, proposal, optimizer

    def due(self, step: int, steps: int) -> bool:
        """Whether the run writes one after ``step`` steps of ``steps``."""
        return step == steps or bool(self.every and step % self.every == 0)

    def write(self, state: State) -> Path:
        return _write_checkpoint(
            self.folder, state.to_json(), self.policy, self.proposal, self.optimizer
        )

    def resume(self, fresh: State, steps: int) -> State | None:
        """The latest checkpoint's state, its weights and optimizer loaded, after
        :func:`check_resume` against the ``fresh`` state; None when there is none."""
        found = latest_checkpoint(self.folder)
        if found is None:
            return None
        stored = State.from_json(json.loads((found / "state.json").read_text()))
        check_resume(found, stored, fresh, steps)
        _load_tensors(self.policy, found / "policy.safetensors")
        if self.proposal is not None:
            _load_tensors(self.proposal, found / "proposal.safetensors")
        _load_optimizer(self.optimizer, found)
        return stored


def prepare_folder(folder: Path, resume: bool) -> None:
    """Make ``folder``; a run that does not resume first removes the fit and checkpoints
    (only there with overwrite=True: see :func:`check_output_dir`)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not resume:
        (folder / "fit.json").unlink(missing_ok=True)  # first: no longer a finished fit
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)


class MetricsLog:
    """Each step's record, appended to ``folder/metrics.jsonl`` and to TensorBoard event
    files in ``folder/tensorboard`` (if tensorboard is installed). It starts from
    ``history`` (a resumed run's records: the file is rewritten to them, TensorBoard's later
    events purged)."""

    def __init__(self, folder: Path, history: tuple[dict[str, Any], ...] | list[Any]) -> None:
        self.path = folder / "metrics.jsonl"
        text = "".join(json.dumps(json_safe(r)) + "\n" for r in history)
        atomic_write(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        self.writer = _tensorboard(folder / "tensorboard", purge_step=len(history) + 1)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(record)) + "\n")
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                self.writer.add_scalar(key, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard(folder: Path, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra (kldsl[train])
        warnings.warn("tensorboard is not installed: no event files", stacklevel=4)
        return None
    return SummaryWriter(str(folder), purge_step=purge_step)
