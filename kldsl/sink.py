"""The ``out=`` file of a sampling run (``kldsl sample --out``): one JSON line per draw.

Each line is a draw (text, ids, log q, log p̃, log w, the factor terms, rewards and
constraints, see :func:`kldsl.target.write_jsonl`) and ``batch``, the index of the batch it
was drawn in; each batch is written in one go and flushed, so a killed run leaves a file
that is a prefix of the uninterrupted run's. Next to ``draws.jsonl`` the manifest
``draws.jsonl.meta.json`` (written atomically) says what made the file: the model text, the
engine, the seed, the batch size and the proposal.

- A new run refuses a file that already holds draws unless ``overwrite=True``. Even then the
  old file is not destroyed before new work exists: the run writes to a hidden sibling
  (``.draws.jsonl.new``) and moves it, and then its manifest, over the old ones once its
  first batch is written; a run that fails before that leaves the old file as it was.
- ``resume=True`` continues a file whose manifest matches (a mismatch is refused, naming the
  settings that differ). Batch k of a run is drawn from generators derived from (seed, k)
  (:class:`kldsl.target.BatchSeeds`), so the complete batches the file holds are read back
  instead of drawn (nothing is sampled or scored again), the last, partial batch of a killed
  run and a torn last line are dropped, and the run continues from there: the file and the
  result equal an uninterrupted run's. ``n`` and the engine's options may change on resume
  (the lines are proposals; acceptance is recomputed from them); a missing or empty file is
  simply started.

Example:
    >>> import kldsl as kl, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "draws.jsonl"
    >>> model = kl.prior(kl.ToyLM(), max_tokens=3)
    >>> a = kl.infer(model, n=40, batch_size=16, out=path)
    >>> lines = path.read_text().splitlines(keepends=True)
    >>> _ = path.write_text("".join(lines[:20]))  # as if killed in the second batch
    >>> b = kl.infer(model, n=40, batch_size=16, out=path, resume=True)
    >>> a.ids == b.ids and path.read_text() == "".join(lines)
    True
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import IO, Any

import torch

from kldsl.errors import KldslError
from kldsl.graph import Density
from kldsl.target import Draw

FORMAT = "kldsl-draws/1"
#: the manifest entries a resumed file must share with the run that continues it
CHECKED = ("model", "engine", "seed", "batch_size", "proposal")


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """The manifest next to an ``out=`` file: ``draws.jsonl`` → ``draws.jsonl.meta.json``."""
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def _hidden(path: Path) -> Path:
    return path.with_name(f".{path.name}.new")


def _write_atomic(path: Path, text: str) -> None:
    tmp = _hidden(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class Sink:
    """The stream an engine's draws go to (a text stream for :func:`write_jsonl`), with the
    overwrite policy, the manifest and the batches a resumed file already holds."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: dict[str, Any],
        *,
        resume: bool = False,
        overwrite: bool = False,
    ):
        if resume and overwrite:
            raise KldslError(
                "resume=True continues the out= file and overwrite=True starts it again; "
                "pass one of them"
            )
        self.path = Path(path)
        self.meta = manifest_path(self.path)
        self.manifest = {"format": FORMAT, **manifest}
        self._stream: IO[str] | None = None
        self._pending: tuple[Path, Path] | None = None  # hidden data and manifest to move
        self._batches: list[tuple[int, int, int]] = []  # resumed: (start, end, lines)
        self._end = 0  # resumed: the end of the last whole line held
        self._replayed = 0  # resumed: batches read back so far
        self._resuming = False
        if self.path.exists() and not self.path.is_file():
            raise KldslError(f"out={str(self.path)!r} is not a file")
        held = self.path.is_file() and self.path.stat().st_size > 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.manifest, indent=2, ensure_ascii=False, default=repr) + "\n"
        if held and resume:
            self._check_manifest()
            self._scan()
            self._resuming = True
        elif held and not overwrite:
            raise KldslError(
                f"{self.path} already holds draws; pass resume=True (kldsl sample --resume) "
                "to continue it, or overwrite=True (--force) to replace it (the old file "
                "stays until the new run has written its first batch)"
            )
        elif held:  # overwrite: the old file stays until the first batch is written
            data, meta = _hidden(self.path), _hidden(self.meta)
            meta.write_text(text, encoding="utf-8")
            self._stream = data.open("w", encoding="utf-8", buffering=1)
            self._pending = (data, meta)
        else:
            _write_atomic(self.meta, text)
            self._stream = self.path.open("w", encoding="utf-8", buffering=1)

    # --- resuming ---------------------------------------------------------------------
    def _check_manifest(self) -> None:
        try:
            stored = json.loads(self.meta.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KldslError(
                f"cannot resume {self.path}: its manifest {self.meta.name} is missing, so "
                "nothing says which model, engine, seed, batch size and proposal made it; "
                "pass overwrite=True (--force) to start it again"
            ) from None
        except (OSError, ValueError) as err:
            raise KldslError(
                f"cannot resume {self.path}: {self.meta.name} is unreadable ({err}); pass "
                "overwrite=True (--force) to start it again"
            ) from err
        if not isinstance(stored, dict) or stored.get("format") != FORMAT:
            raise KldslError(
                f"cannot resume {self.path}: {self.meta.name} is not a kldsl draws manifest "
                f"({FORMAT}); pass overwrite=True (--force) to start it again"
            )
        differ = [k for k in CHECKED if stored.get(k) != self.manifest.get(k)]
        if differ:
            shown = "; ".join(
                f"{k}: {stored.get(k)!r} there, {self.manifest.get(k)!r} now" for k in differ
            )
            raise KldslError(
                f"cannot resume {self.path}: it was made by another run ({shown}). Resume "
                "with the same model, engine, seed, batch size and proposal, or pass "
                "overwrite=True (--force) to start it again"
            )

    def _scan(self) -> None:
        """Find the batches held: consecutive runs of lines tagged 0, 1, 2, ...; stop at the
        first torn, unreadable or out-of-order line."""
        offset = 0
        with self.path.open("rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # torn: the run was killed while writing it
                try:
                    batch = json.loads(line)["batch"]
                except (ValueError, KeyError, TypeError):
                    break
                end = offset + len(line)
                if self._batches and batch == len(self._batches) - 1:
                    start, _, lines = self._batches[-1]
                    self._batches[-1] = (start, end, lines + 1)
                elif batch == len(self._batches):
                    self._batches.append((offset, end, 1))
                else:
                    break
                offset = self._end = end

    def recorded(self, index: int, size: int) -> Draw | None:
        """Batch ``index`` read back from the resumed file when it holds it complete (its
        ``size`` lines) and every batch before it was read back; otherwise None."""
        if not self._resuming or index != self._replayed or index >= len(self._batches):
            return None
        start, end, lines = self._batches[index]
        if lines != size:
            return None
        with self.path.open("rb") as f:
            f.seek(start)
            records = [json.loads(line) for line in f.read(end - start).splitlines()]
        self._replayed += 1
        return draw_from_records(records)

    def _held_end(self) -> int:
        """Where the batches read back end: new lines go after them."""
        return self._batches[self._replayed - 1][1] if self._replayed else 0

    # --- the stream ---------------------------------------------------------------------
    def write(self, text: str) -> int:
        if self._stream is None:  # resumed: drop what was not read back, then append
            os.truncate(self.path, self._held_end())
            self._stream = self.path.open("a", encoding="utf-8", buffering=1)
            self._resuming = False
        return self._stream.write(text)

    def flush(self) -> None:
        if self._stream is None:
            return
        self._stream.flush()
        if self._pending is not None and self._stream.tell() > 0:
            self._promote()

    def _promote(self) -> None:
        """Move the overwriting run's file, then its manifest, over the old ones."""
        assert self._pending is not None
        data, meta = self._pending
        os.replace(data, self.path)  # the open stream keeps writing to it under its new name
        os.replace(meta, self.meta)
        self._pending = None

    def close(self, ok: bool = True) -> None:
        """Finish the file: after a finished run, keep exactly the batches it used (a resumed
        file may hold a torn line or, resumed to a smaller n, more batches); after a failure,
        keep every batch written, and an overwritten file when no new batch was."""
        if self._stream is not None:
            self._stream.close()
        if self._pending is not None:
            if ok:
                self._promote()
            else:
                for p in self._pending:
                    p.unlink(missing_ok=True)
                self._pending = None
        elif ok and self._resuming:
            os.truncate(self.path, self._held_end())
        self._resuming = False


def draw_from_records(records: list[dict[str, Any]]) -> Draw:
    """The :class:`Draw` a batch's JSON lines hold (``null`` log-values are −∞)."""

    def floats(values: list[Any]) -> torch.Tensor:
        return torch.tensor(
            [-math.inf if v is None else float(v) for v in values], dtype=torch.float64
        )

    first = records[0]
    density = Density(
        floats([r["log_p"] for r in records]),
        {k: floats([r["terms"][k] for r in records]) for k in first["terms"]},
        {k: floats([r["rewards"][k] for r in records]) for k in first["rewards"]},
        {
            k: torch.tensor([bool(r["constraints"][k]) for r in records], dtype=torch.bool)
            for k in first["constraints"]
        },
        [r["text"] for r in records],
    )
    return Draw([list(r["ids"]) for r in records], floats([r["log_q"] for r in records]), density)
