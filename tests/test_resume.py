"""Nothing finished is lost: ``out=`` files are never clobbered, and ``resume=True`` continues
an interrupted one to exactly what an uninterrupted run writes and returns.

Interruptions are simulated by cutting the file of an uninterrupted run (after whole
batches, inside a batch, through a line) and, at the end, by SIGKILLing ``kldsl sample``
at random moments.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kldsl as kl
from kldsl.cli import main as cli_main
from kldsl.errors import KldslError
from kldsl.sink import manifest_path

ENGINES = ["importance", "rejection", "qrs"]
N = {"importance": 60, "rejection": 30, "qrs": 30}
BATCH = 8


@kl.reward(bounds=(0.0, 1.0))
def frac_a(texts):
    return [t.count("a") / len(t) if t else 0.0 for t in texts]


LM = kl.ToyLM("ab", seed=0, name="toy")
MODEL = kl.prior(LM, max_tokens=4) * kl.exp(frac_a / 1.0) | kl.contains("b")


def _run(path: Path, engine: str = "importance", n: int | None = None, **kw) -> kl.Samples:
    kw.setdefault("seed", 3)
    kw.setdefault("batch_size", BATCH)
    return kl.infer(kw.pop("model", MODEL), engine=engine, n=n or N[engine], out=path, **kw)


def _same(a: kl.Samples, b: kl.Samples) -> None:
    """Every field of two results, exactly (floats compared by repr, so NaN equals NaN)."""
    assert a.ids == b.ids and a.texts == b.texts
    assert torch.equal(a.log_weights, b.log_weights) and torch.equal(a.log_p, b.log_p)
    for name in ("terms", "rewards", "constraints"):
        x, y = getattr(a, name), getattr(b, name)
        assert list(x) == list(y) and all(torch.equal(x[k], y[k]) for k in x), name
    for name in ("log_z", "log_z_se", "n_proposed", "acceptance_rate", "proposal_means"):
        assert repr(getattr(a, name)) == repr(getattr(b, name)), name
    assert repr(a.divergences) == repr(b.divergences) and repr(a.info) == repr(b.info)


def _failing_model(batches: int) -> kl.Model:
    """MODEL (the same text) with a reward that fails after ``batches`` batches."""
    left = {"calls": batches}

    @kl.reward(bounds=(0.0, 1.0))
    def frac_a(texts):
        if left["calls"] <= 0:
            raise RuntimeError("reward server went away")
        left["calls"] -= 1
        return [t.count("a") / len(t) if t else 0.0 for t in texts]

    model = kl.prior(LM, max_tokens=4) * kl.exp(frac_a / 1.0) | kl.contains("b")
    assert str(model) == str(MODEL)
    return model


@pytest.fixture
def sampled_rows(monkeypatch):
    """How many sequences the ToyLM draws (to check that resuming re-draws nothing held)."""
    counter = {"rows": 0}
    real = kl.ToyLM._sample_batch

    def counting(self, n, *args, **kwargs):
        counter["rows"] += n
        return real(self, n, *args, **kwargs)

    monkeypatch.setattr(kl.ToyLM, "_sample_batch", counting)
    return counter


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Each engine's uninterrupted run: its file's lines and its result."""
    out = {}
    for engine in ENGINES:
        path = tmp_path_factory.mktemp(engine) / "draws.jsonl"
        samples = _run(path, engine)
        out[engine] = (path.read_text().splitlines(keepends=True), samples, path)
    return out


def _cut(lines: list[str], kind: str) -> tuple[str, int]:
    """The text of an interrupted file, and how many of its lines are whole held batches."""
    batch = [json.loads(line)["batch"] for line in lines]
    starts = [i for i in range(len(lines)) if i == 0 or batch[i] != batch[i - 1]]
    k = starts[2]  # two whole batches
    half = lines[k][: len(lines[k]) // 2]
    return {
        "nothing": ("", 0),
        "torn first line": (half, 0),
        "two batches": ("".join(lines[:k]), k),
        "inside the third batch": ("".join(lines[: k + 3]), k),
        "inside the third batch, torn": ("".join(lines[: k + 3]) + lines[k + 3][:9], k),
        "torn last line": ("".join(lines[:-1]) + lines[-1][:-5], starts[-1]),
    }[kind]


CUTS = [
    "nothing",
    "torn first line",
    "two batches",
    "inside the third batch",
    "inside the third batch, torn",
    "torn last line",
]


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("engine", ENGINES)
def test_resume_after_an_interruption_equals_the_uninterrupted_run(
    engine, cut, reference, tmp_path, sampled_rows
):
    lines, want, ref_path = reference[engine]
    path = tmp_path / "draws.jsonl"
    text, held = _cut(lines, cut)
    path.write_text(text)
    manifest_path(path).write_text(manifest_path(ref_path).read_text())
    got = _run(path, engine, resume=True)
    assert path.read_text() == "".join(lines)
    _same(got, want)
    assert sampled_rows["rows"] == len(lines) - held  # the held batches were read, not drawn


@pytest.mark.parametrize("engine", ENGINES)
def test_a_killed_run_leaves_a_prefix_of_whole_batches(engine, reference, tmp_path):
    """What a run has written when it dies is a prefix of the uninterrupted file."""
    lines, _, _ = reference[engine]
    path = tmp_path / "draws.jsonl"
    with pytest.raises(kl.KldslRewardError):
        _run(path, engine, model=_failing_model(3))  # dies in the fourth batch
    assert path.read_text() == "".join(lines[: 3 * BATCH])
    _same(_run(path, engine, resume=True), reference[engine][1])
    assert path.read_text() == "".join(lines)


@pytest.mark.parametrize(
    ("engine", "first"), [("importance", 40), ("importance", 44), ("rejection", 12)]
)
def test_resume_continues_to_a_larger_n(engine, first, tmp_path):
    full = tmp_path / "full.jsonl"
    want = _run(full, engine, n=2 * N[engine])
    path = tmp_path / "draws.jsonl"
    _run(path, engine, n=first)  # finished, but with a smaller n (44: its last batch is 4)
    _same(_run(path, engine, n=2 * N[engine], resume=True), want)
    assert path.read_text() == full.read_text()


@pytest.mark.parametrize("engine", ENGINES)
def test_resume_of_a_finished_file_draws_nothing_and_a_smaller_n_cuts_it(
    engine, reference, tmp_path, sampled_rows
):
    lines, want, ref_path = reference[engine]
    path = tmp_path / "draws.jsonl"
    path.write_text("".join(lines))
    manifest_path(path).write_text(manifest_path(ref_path).read_text())
    _same(_run(path, engine, resume=True), want)
    assert sampled_rows["rows"] == 0 and path.read_text() == "".join(lines)

    small = tmp_path / "small.jsonl"
    want_small = _run(small, engine, n=N[engine] // 3)
    _same(_run(path, engine, n=N[engine] // 3, resume=True), want_small)
    assert path.read_text() == small.read_text()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"seed": 4}, "seed"),
        ({"batch_size": 4}, "batch_size"),
        ({"engine": "qrs"}, "engine"),
        ({"model": kl.prior(LM, max_tokens=4) | kl.contains("b")}, "model"),
        ({"proposal": kl.ToyLM("ab", seed=5, name="q")}, "proposal"),
    ],
)
def test_resume_refuses_a_file_made_by_another_run(change, field, reference, tmp_path):
    lines, _, ref_path = reference["importance"]
    path = tmp_path / "draws.jsonl"
    path.write_text("".join(lines[:20]))
    meta = manifest_path(ref_path).read_text()
    manifest_path(path).write_text(meta)
    engine = change.pop("engine", "importance")
    with pytest.raises(KldslError) as info:
        _run(path, engine, resume=True, **change)
    message = str(info.value)
    assert message.startswith(f"cannot resume {path}: it was made by another run ({field}: ")
    assert "or pass overwrite=True (--force) to start it again" in message
    assert path.read_text() == "".join(lines[:20]) and manifest_path(path).read_text() == meta


def test_resume_refuses_a_file_without_its_manifest(tmp_path):
    path = tmp_path / "draws.jsonl"
    path.write_text('{"text": "a"}\n')
    with pytest.raises(KldslError, match="its manifest draws.jsonl.meta.json is missing"):
        _run(path, resume=True)
    assert path.read_text() == '{"text": "a"}\n'


def test_an_out_file_that_holds_draws_is_not_overwritten(reference, tmp_path):
    lines, want, _ = reference["importance"]
    path = tmp_path / "draws.jsonl"
    path.write_text("precious\n")
    with pytest.raises(KldslError) as info:
        _run(path, model=kl.prior("no-such-model-folder/x/y"))  # refused before it loads
    assert f"{path} already holds draws; pass resume=True" in str(info.value)
    assert path.read_text() == "precious\n" and not manifest_path(path).exists()

    _same(_run(path, overwrite=True), want)
    assert path.read_text() == "".join(lines)
    assert json.loads(manifest_path(path).read_text())["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draws.jsonl", "draws.jsonl.meta.json"]


def test_overwrite_keeps_the_old_file_until_the_first_new_batch(reference, tmp_path):
    lines, _, _ = reference["importance"]
    path = tmp_path / "draws.jsonl"
    path.write_text("precious\n")
    manifest_path(path).write_text('{"old": true}\n')
    with pytest.raises(kl.KldslRewardError):
        _run(path, model=_failing_model(0), overwrite=True)  # fails in its first batch
    assert path.read_text() == "precious\n"  # no new batch: the old file and manifest stay
    assert manifest_path(path).read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draws.jsonl", "draws.jsonl.meta.json"]

    with pytest.raises(kl.KldslRewardError):
        _run(path, model=_failing_model(1), overwrite=True)  # fails in its second batch
    assert path.read_text() == "".join(lines[:BATCH])  # the new batch replaced the old file
    assert json.loads(manifest_path(path).read_text())["engine"] == "importance"


def test_an_empty_or_missing_file_is_simply_written(reference, tmp_path):
    lines, want, _ = reference["importance"]
    path = tmp_path / "draws.jsonl"
    path.write_text("")
    _same(_run(path), want)
    assert path.read_text() == "".join(lines)
    fresh = tmp_path / "sub" / "fresh.jsonl"
    _same(_run(fresh, resume=True), want)  # nothing to resume: it starts
    assert fresh.read_text() == "".join(lines)


@pytest.mark.parametrize("engine", ["exact", "mcmc", "pyro-importance", "pyro-svi"])
def test_engines_that_cannot_resume_refuse(engine, tmp_path):
    path = tmp_path / "draws.jsonl"
    with pytest.raises(KldslError) as info:
        _run(path, engine, n=8, resume=True)
    message = str(info.value)
    assert f"engine {engine!r} cannot resume an out= file" in message
    assert message.endswith("the engines that can: importance, qrs, rejection")
    assert not path.exists()


def test_resume_needs_an_out_file_and_not_overwrite(tmp_path):
    with pytest.raises(KldslError, match="resume=True continues an interrupted out= file"):
        kl.infer(MODEL, n=8, resume=True)
    with pytest.raises(KldslError, match="pass one of them"):
        _run(tmp_path / "d.jsonl", resume=True, overwrite=True)


def test_the_seed_stream_is_still_one_stream_per_seed():
    a = kl.infer(MODEL, engine="qrs", n=20, seed=1, batch_size=5)
    b = kl.infer(MODEL, engine="qrs", n=20, seed=1, batch_size=5)
    c = kl.infer(MODEL, engine="qrs", n=20, seed=2, batch_size=5)
    _same(a, b)
    assert a.ids != c.ids


# --- the command line, and SIGKILL ------------------------------------------------------------


@pytest.fixture(scope="module")
def kl_file(tmp_path_factory):
    """A .kl model over a saved ToyLM (a .kl file names models by folder)."""
    folder = tmp_path_factory.mktemp("toy")
    kl.Fit(model=kl.ToyLM("abc", seed=3), history=[], objective="reverse_kl").save(folder / "lm")
    path = folder / "m.kl"
    path.write_text(
        f'm = prior("{folder / "lm"}", max_tokens=6) * exp(length / 2.0) | contains("ab")\n'
    )
    return path


def test_cli_refuses_overwrite_and_takes_resume_and_force(kl_file, tmp_path, capsys):
    out = tmp_path / "draws.jsonl"
    args = ["sample", str(kl_file), "--n", "24", "--batch-size", "5", "--out", str(out)]
    assert cli_main(args) == 0
    whole = out.read_text()
    assert cli_main(args) == 2
    assert (
        "already holds draws; pass resume=True (kldsl sample --resume)" in capsys.readouterr().err
    )
    assert out.read_text() == whole
    out.write_text("".join(whole.splitlines(keepends=True)[:7]))
    assert cli_main([*args, "--resume"]) == 0
    assert out.read_text() == whole
    assert cli_main([*args, "--seed", "1", "--resume"]) == 2
    assert "it was made by another run (seed: 0 there, 1 now)" in capsys.readouterr().err
    assert cli_main([*args, "--seed", "1", "--force"]) == 0
    assert out.read_text() != whole


KILL_RUNS = {  # engine: (n, options); batches of 10 on a ToyLM
    "importance": (3000, {}),
    "rejection": (800, {"bound": 0.5}),  # length ≤ 1 word: log w ≤ 1/2
    "qrs": (800, {"qrs_beta": 1.2}),
}
KILL_TRIALS = 6


def test_sigkill_at_random_moments_then_resume_equals_the_uninterrupted_run(kl_file, tmp_path):
    """SIGKILL ``kldsl sample --out`` (the trials run side by side) once its file reaches a
    random length (seeded), check that the file is a prefix of the uninterrupted run's,
    resume it, and compare file and result."""
    model = kl.load(kl_file)
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in-process: tiny ops, one thread
    reference = {}
    for engine, (n, options) in KILL_RUNS.items():
        path = tmp_path / f"reference-{engine}.jsonl"
        samples = kl.infer(model, engine=engine, n=n, seed=7, batch_size=10, out=path, **options)
        reference[engine] = (path.read_bytes(), samples)
    trials = []
    for trial in range(KILL_TRIALS):
        engine = list(KILL_RUNS)[trial % len(KILL_RUNS)]
        n, options = KILL_RUNS[engine]
        out = tmp_path / f"trial-{trial}.jsonl"
        command = [sys.executable, "-m", "kldsl.cli", "sample", str(kl_file), "--engine", engine]
        command += ["--n", str(n), "--seed", "7", "--batch-size", "10", "--out", str(out)]
        for key, value in options.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        at = int(rng.uniform(0.0, 0.8) * len(reference[engine][0]))  # kill at this length
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        trials.append((engine, out, at, proc))
    running = set(range(KILL_TRIALS))
    deadline = time.monotonic() + 600  # only against a hang: kills go by file length
    while running and time.monotonic() < deadline:
        for t in sorted(running):
            _, out, at, proc = trials[t]
            if proc.poll() is not None:
                running.discard(t)
            elif out.exists() and out.stat().st_size >= at:
                proc.send_signal(signal.SIGKILL)
                running.discard(t)
        time.sleep(0.002)
    killed = 0
    for trial, (engine, out, _, proc) in enumerate(trials):
        proc.wait(timeout=60)
        killed += proc.returncode == -signal.SIGKILL
        whole, want = reference[engine]
        left = out.read_bytes() if out.exists() else b""
        assert whole.startswith(left), f"trial {trial}: not a prefix of the uninterrupted file"
        n, options = KILL_RUNS[engine]
        got = kl.infer(
            model, engine=engine, n=n, seed=7, batch_size=10, out=out, resume=True, **options
        )
        assert out.read_bytes() == whole, f"trial {trial} ({engine}, killed at {len(left)} bytes)"
        _same(got, want)
    codes = [proc.returncode for *_, proc in trials]
    assert killed >= KILL_TRIALS // 2, f"most trials should be cut short; exit codes {codes}"
