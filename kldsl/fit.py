"""``Fit``: what the variational engine returns — a fine-tuned LM and its training curves.

``fit.model`` is an ordinary :class:`kldsl.LM`, usable as a prior or as a proposal;
``fit.history`` holds one dict of metrics per step; ``fit.save(folder)`` writes both and
``kl.resolve(folder)`` (or :func:`load_model`) loads the LM back (``kl.prior(folder)``
names it as a prior, loaded when inference resolves it).

Example::

    fit = kl.infer(posterior, engine="variational", steps=100, lr=0.05)
    fit.save("runs/toy")
    kl.infer(posterior, engine="importance", proposal=kl.resolve("runs/toy"))
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kldsl.errors import KldslModelLoadError
from kldsl.graph import Model
from kldsl.lm import LM, ToyLM, torch_module
from kldsl.target import json_float

FORMAT = "kldsl-fit"
VERSION = 1

# curves Fit.plot draws, in this order, when the history has them
_CURVES = (
    ("kl_pi_p", "KL(π‖p*)"),
    ("kl_p_pi", "KL(p*‖π)"),
    ("js", "JS(π, p*)"),
    ("kl_pi_a", "KL(π‖a)"),
    ("log_z", "log Ẑ"),
    ("entropy_per_token", "entropy per token"),
    ("ess", "ESS of the batch"),
    ("loss", "loss"),
    ("grad_norm", "gradient norm"),
)


@dataclass
class Fit:
    """A fine-tuned LM π ≈ p* with its per-step metrics."""

    model: LM  # the fine-tuned LM (a prior or a proposal like any other)
    history: list[dict[str, Any]]  # one dict of metrics per training step
    objective: str  # "reverse_kl", "forward_kl" or "js"
    target: Model | None = None  # the posterior it was fitted to
    info: dict[str, Any] = field(default_factory=dict)  # settings: steps, lr, lora, ...

    @property
    def final(self) -> dict[str, Any]:
        """The metrics of the last step (empty before any step)."""
        return self.history[-1] if self.history else {}

    def __repr__(self) -> str:
        last = self.final
        shown = ", ".join(
            f"{key}={last[key]:.4g}" for key in ("kl_pi_p", "kl_p_pi", "kl_pi_a") if key in last
        )
        return (
            f"Fit(objective={self.objective!r}, steps={len(self.history)}, "
            f"model={self.model.name!r}{', ' + shown if shown else ''})"
        )

    # --- files ----------------------------------------------------------------------
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the LM (safetensors / a Hugging Face folder), the history and a manifest.

        ``fit.json`` is written last, so a folder with one is complete.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        kind = save_model(self.model, folder)
        history = "".join(json.dumps(json_safe(r)) + "\n" for r in self.history)
        atomic_write(folder / "history.jsonl", lambda tmp: tmp.write_text(history, "utf-8"))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "kind": kind,
            "name": self.model.name,
            "objective": self.objective,
            "target": str(self.target) if self.target is not None else None,
            "steps": len(self.history),
            "info": json_safe(self.info),
        }
        if isinstance(self.model, ToyLM):
            manifest["toy"] = {"vocab": self.model.chars}
        text = json.dumps(manifest, indent=2, ensure_ascii=False)
        atomic_write(folder / "fit.json", lambda tmp: tmp.write_text(text, "utf-8"))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, into: LM | None = None) -> Fit:
        """A saved fit: the LM and the history (the target graph is kept as text in info).

        ``into`` is needed for a custom LM class only (see :func:`load_model`)."""
        folder = Path(folder)
        manifest = _manifest(folder)
        history_file = folder / "history.jsonl"
        history = (
            [json.loads(line) for line in history_file.read_text("utf-8").splitlines() if line]
            if history_file.is_file()
            else []
        )
        info = dict(manifest.get("info") or {})
        info["target"] = manifest.get("target")
        return cls(load_model(folder, into=into), history, manifest["objective"], None, info)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """PNG of the training curves: divergences, Ẑ, entropy, loss, rewards, constraints."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [(k, label) for k, label in _CURVES if any(k in r for r in self.history)]
        extra = sorted(
            {k for r in self.history for k in r if k.startswith(("reward/", "constraint/"))}
        )
        keys += [(k, k.replace("/", ": ")) for k in extra]
        cols = 3
        rows = max(1, math.ceil(len(keys) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
        for ax, (key, label) in zip(axes.flat, keys):
            pts = [
                (r["step"], r[key])
                for r in self.history
                if isinstance(r.get(key), int | float) and math.isfinite(r[key])
            ]
            if pts:
                sparse = len(pts) < len(self.history)  # e.g. KL(π‖p*) is ∞ on some steps
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    lw=1.2,
                    marker="." if sparse else None,
                    ls=":" if sparse else "-",
                )
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        title = f"variational ({self.objective})"
        if self.target is not None:
            title += f": {self.target}"
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


# --- saving and loading the LM ------------------------------------------------------------
def is_fit_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a saved Fit (its ``fit.json``)."""
    return (Path(folder) / "fit.json").is_file()


def save_model(lm: LM, folder: Path) -> str:
    """Write ``lm`` under ``folder/model`` and return its kind ("toy", "hf" or "module").

    Everything is written as safetensors and JSON, never as a pickle: loading a folder must
    not be able to run code. A LoRA model is saved merged (an ordinary Hugging Face folder)
    and its adapter alone under ``folder/adapter``. Any other LM that is a
    ``torch.nn.Module`` ("module") keeps only its parameters and buffers; its class is code,
    so loading needs an instance to fill (``load_model(folder, into=MyLM(...))``).
    """
    model = getattr(lm, "model", None)
    if isinstance(lm, ToyLM):
        from safetensors.torch import save_file

        weights = {"logits": lm.logits.detach().cpu().contiguous()}
        kind, write = "toy", lambda d: save_file(weights, str(d / "weights.safetensors"))
    elif hasattr(model, "save_pretrained") and hasattr(lm, "tokenizer"):
        kind = "hf"

        def write(d: Path) -> None:
            merged = model
            if hasattr(model, "merge_and_unload"):  # peft: keep the adapter, save merged
                model.save_pretrained(str(d.parent / ".adapter.tmp"))
                merged = copy.deepcopy(model).merge_and_unload()
            merged.save_pretrained(str(d))
            lm.tokenizer.save_pretrained(str(d))

    elif torch_module(lm) is lm:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in lm.state_dict().items()}
        kind, write = "module", lambda d: save_file(state, str(d / "weights.safetensors"))
    else:
        raise KldslModelLoadError(
            f"cannot save {lm.name}: kldsl saves ToyLMs, Hugging Face LMs and LMs that are "
            "torch.nn.Modules"
        )
    _replace_folder(folder / "model", write)
    adapter_tmp = folder / ".adapter.tmp"
    if adapter_tmp.is_dir():
        shutil.rmtree(folder / "adapter", ignore_errors=True)
        os.replace(adapter_tmp, folder / "adapter")
    return kind


def load_model(
    folder: str | os.PathLike[str], name: str | None = None, *, into: LM | None = None
) -> LM:
    """The LM of a saved Fit (what ``kl.prior(folder)`` uses).

    Reads only safetensors, JSON and tokenizer files. A fit of a custom ``torch.nn.Module``
    LM ("module") loads into ``into``, an instance of that LM's class that you build in
    Python; kldsl never imports or unpickles code named by a file, so ``prior(folder)`` in
    a .kl file refuses such a folder.

    Example::

        lm = load_model("runs/unigram", into=Unigram())
    """
    folder = Path(folder)
    manifest = _manifest(folder)
    kind = manifest.get("kind")
    name = name or manifest.get("name") or str(folder)
    weights = folder / "model" / "weights.safetensors"
    if kind == "toy":
        from safetensors.torch import load_file

        vocab = (manifest.get("toy") or {}).get("vocab")
        if not isinstance(vocab, str) or not vocab:
            raise KldslModelLoadError(f"{folder}/fit.json: a toy fit needs its vocabulary string")
        lm = ToyLM(vocab=vocab, name=name)
        logits = _load_tensors(weights, load_file).get("logits")
        if logits is None or logits.shape != lm.logits.shape:
            raise KldslModelLoadError(
                f"{weights} holds no logits of shape {tuple(lm.logits.shape)} for the vocabulary "
                f"{vocab!r}; the folder is damaged"
            )
        with torch.no_grad():
            lm.logits.copy_(logits)
        return lm
    if kind == "hf":
        from kldsl.hf import HFLM

        return HFLM.from_pretrained(folder / "model", name=name)
    if kind == "module":
        if into is None:
            raise KldslModelLoadError(
                f"{folder} holds the weights of a custom LM class ({manifest.get('name')!r}); "
                "kldsl never runs code a file names, so it cannot rebuild that class from the "
                "folder. In Python, build the LM and fill it: "
                "kl.fit.load_model(folder, into=YourLM(...))"
            )
        from safetensors.torch import load_file

        if not isinstance(into, torch.nn.Module):
            raise KldslModelLoadError("load_model(into=...) takes an LM that is a torch.nn.Module")
        try:
            into.load_state_dict(_load_tensors(weights, load_file))
        except RuntimeError as err:
            raise KldslModelLoadError(f"{weights} does not fit {into!r}: {err}") from err
        return into
    if kind == "torch":
        raise KldslModelLoadError(
            f"{folder} was written by an older kldsl as a pickle (model/lm.pt); kldsl no longer "
            "unpickles files, since loading a pickle can run any code. If you trust the folder, "
            "load the module in Python yourself and save it again with Fit.save"
        )
    raise KldslModelLoadError(f"{folder}/fit.json names an unknown model kind {kind!r}")


def _load_tensors(path: Path, load_file: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise KldslModelLoadError(
            f"cannot read {path} ({type(err).__name__}: {err}); the folder is damaged"
        ) from err


def _manifest(folder: Path) -> dict[str, Any]:
    path = folder / "fit.json"
    if not path.is_file():
        raise KldslModelLoadError(
            f"{folder} holds no saved fit (no fit.json); pass the folder given to Fit.save or "
            "the output_dir of a variational run"
        )
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KldslModelLoadError(f"cannot read {path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KldslModelLoadError(f"{path} is not a kldsl fit manifest")
    return manifest


def _replace_folder(final: Path, write: Callable[[Path], None]) -> None:
    """Write a folder under a temporary name, fsync what was written, then swap it in with
    os.replace (and fsync the parent folder, so the swap itself is on disk)."""
    work = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write(work)
    for written in sorted(work.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync(written)  # deepest first: files, then the folders that name them
    fsync(work)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


# --- small file helpers (shared with the variational engine) --------------------------------
def fsync(path: str | os.PathLike[str]) -> None:
    """Flush a file's contents, or a folder's entries (so that a file created or renamed in
    it survives a crash of the machine), to disk. Folders cannot be fsync'ed on Windows."""
    path = Path(path)
    if path.is_dir():
        if os.name == "nt":
            return
        fd = os.open(path, os.O_RDONLY)
    else:
        fd = os.open(path, os.O_RDWR)  # Windows commits only files opened for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write a file under a temporary name in the same folder, fsync it, os.replace it and
    fsync the folder: after a crash at any moment the file is the old one or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def json_safe(value: Any) -> Any:
    """Plain JSON: non-finite floats become None, tensors numbers, tuples lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float):
        return json_float(value)
    if isinstance(value, str | int | bool) or value is None:
        return value
    return str(value)
