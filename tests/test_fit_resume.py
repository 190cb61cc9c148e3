"""Nothing finished is lost: resume refuses other settings, a new run refuses a folder that
holds finished work, checkpoints are fsync'ed, and a SIGKILLed ``kldsl fit`` resumes to the
uninterrupted run's weights bit for bit."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import kldsl as kl
from kldsl.cli import main
from kldsl.errors import KldslInferenceError
from kldsl.fit import json_safe

TIMING = ("samples_per_s", "time_s")


@kl.reward
def count_a(texts):
    """Occurrences of the letter a."""
    return [float(t.count("a")) for t in texts]


def model(beta: float = 0.5, lm: kl.ToyLM | None = None):
    lm = lm or kl.ToyLM(vocab="abc", seed=0)
    return kl.prior(lm, max_tokens=4) * kl.exp(count_a / beta) | kl.regex("^a")


# reverse_kl with a hard constraint, so that penalty= matters too
OPTIONS = dict(
    engine="variational",
    objective="reverse_kl",
    steps=3,
    batch_size=16,
    lr=0.1,
    checkpoint_every=1,
    progress=False,
)


def fit(folder: Path | None, m=None, **changes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reverse_kl's penalty warning
        return kl.infer(m or model(), output_dir=folder, **{**OPTIONS, **changes})


def strip(history):
    """The history without timings, as JSON holds it (a loaded fit has None for ∞)."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in json_safe(history)]


def same_run(a: kl.Fit, b: kl.Fit) -> None:
    assert torch.equal(a.model.logits, b.model.logits)  # bitwise
    assert strip(a.history) == strip(b.history)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished run (3 steps, a checkpoint each step) and its folder."""
    folder = tmp_path_factory.mktemp("done") / "run"
    return folder, fit(folder)


# --- 1. resume refuses changed settings --------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "shown"),
    [
        ({"objective": "js"}, "objective='reverse_kl' (this run: 'js')"),
        ({"lr": 5.0}, "lr=0.1 (this run: 5.0)"),
        ({"batch_size": 8}, "batch_size=16 (this run: 8)"),
        ({"shards": 2}, "shards=1 (this run: 2)"),
        ({"penalty": 3.0}, "penalty=10.0 (this run: 3.0)"),
        ({"baseline": False}, "baseline=True (this run: False)"),
        ({"max_grad_norm": None}, "max_grad_norm=1.0 (this run: None)"),
        ({"seed": 1}, "base_seed (drawn from seed)="),
        ({"prompts": ["a", "b"]}, "prompts=None (this run: ['a', 'b'])"),
        ({"proposal": kl.ToyLM(vocab="abc", seed=1, name="other")}, "(this run: 'other')"),
        ({"m": model(beta=0.25)}, "(this run: 'prior(toy, max_tokens=4) * exp(count_a / 0.25)"),
    ],
)
def test_resume_refuses_each_changed_setting(done, changes, shown):
    folder, _ = done
    before = (folder / "checkpoints" / "latest").read_text()
    with pytest.raises(KldslInferenceError, match="other settings than this run has") as err:
        fit(folder, resume=True, **changes)
    message = str(err.value)
    assert shown in message
    assert "only steps may change" in message and "overwrite=True" in message
    assert (folder / "checkpoints" / "latest").read_text() == before  # nothing was touched


def test_resume_lists_every_changed_setting_at_once(done):
    folder, _ = done
    with pytest.raises(KldslInferenceError) as err:
        fit(folder, resume=True, lr=5.0, batch_size=8, penalty=3.0)
    message = str(err.value)
    for shown in ("lr=0.1 (this run: 5.0)", "batch_size=16 (this run: 8)", "penalty=10.0"):
        assert shown in message


def test_penalty_is_only_compared_where_it_is_used(tmp_path):
    """forward_kl never uses penalty=, so changing it changes nothing and is allowed."""
    first = fit(tmp_path / "run", objective="forward_kl", steps=2)
    again = fit(tmp_path / "run", objective="forward_kl", steps=2, penalty=3.0, resume=True)
    assert torch.equal(again.model.logits, first.model.logits)


def test_lora_settings_are_compared(tmp_path):
    pytest.importorskip("peft")
    from tiny_hf import tiny_hf

    lm = tiny_hf("abcde ", hidden=16, layers=1, heads=2, tie_word_embeddings=False)
    m = kl.prior(lm, prompt="ab", max_tokens=3) | kl.contains("c")
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    options = dict(engine="variational", steps=1, batch_size=4, lr=0.05, progress=False)
    kl.infer(m, output_dir=tmp_path / "run", lora=lora, **options)
    with pytest.raises(KldslInferenceError, match=r"lora=\{'r': 4, .*\(this run: \{'r': 8, "):
        kl.infer(m, output_dir=tmp_path / "run", resume=True, lora={**lora, "r": 8}, **options)
    with pytest.raises(KldslInferenceError, match=r"\(this run: None\)"):
        kl.infer(m, output_dir=tmp_path / "run", resume=True, **options)


def test_steps_may_grow_on_resume_and_equal_a_run_of_that_length(done, tmp_path):
    folder, _ = done
    shutil.copytree(folder, tmp_path / "run")
    longer = fit(tmp_path / "run", resume=True, steps=5)
    same_run(longer, fit(None, steps=5))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert kl.Fit.load(tmp_path / "run").info["steps"] == 5


def test_steps_below_the_checkpoint_are_refused(done):
    folder, _ = done
    with pytest.raises(KldslInferenceError, match="is at step 3, past steps=2"):
        fit(folder, resume=True, steps=2)


def test_resuming_a_finished_run_returns_it(done):
    folder, finished = done
    same_run(fit(folder, resume=True), finished)


# --- 2. a new run refuses a folder with finished work ----------------------------------------
def test_a_new_run_refuses_a_folder_with_checkpoints_or_a_fit(tmp_path):
    folder = tmp_path / "run"
    first = fit(folder)
    latest = (folder / "checkpoints" / "latest").read_text()
    manifest = (folder / "fit.json").read_text()
    with pytest.raises(KldslInferenceError, match="already holds checkpoints and a fit") as err:
        fit(folder, lr=0.2)
    assert "resume=True (kldsl fit --resume)" in str(err.value)
    assert "overwrite=True (kldsl fit --overwrite)" in str(err.value)
    assert (folder / "checkpoints" / "latest").read_text() == latest
    assert (folder / "fit.json").read_text() == manifest
    same_run(kl.Fit.load(folder), first)

    with pytest.raises(KldslInferenceError, match="pass one of them"):
        fit(folder, resume=True, overwrite=True)

    # overwrite=True starts again: the same as a run in an empty folder
    again = fit(folder, lr=0.2, steps=2, overwrite=True)
    same_run(again, fit(tmp_path / "fresh", lr=0.2, steps=2))
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
        "latest",
        "step-0000001",
        "step-0000002",
    ]
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert kl.Fit.load(folder).info["lr"] == 0.2


def test_a_saved_fit_alone_is_refused_too(tmp_path):
    folder = kl.Fit(model=kl.ToyLM(vocab="abc"), history=[], objective="reverse_kl").save(
        tmp_path / "saved"
    )
    with pytest.raises(KldslInferenceError, match=r"already holds a fit \(fit.json\)"):
        fit(folder)
    with pytest.raises(KldslInferenceError, match="holds a fit but no checkpoint"):
        fit(folder, resume=True)
    assert kl.Fit.load(folder).history == []  # untouched
    fit(folder, overwrite=True)
    assert len(kl.Fit.load(folder).history) == 3


def test_a_folder_without_finished_work_is_fine(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # empty: a crash before step 1
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    same_run(fit(tmp_path / "run"), fit(None))


# --- 3. checkpoints are fsync'ed -------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")
def test_every_file_and_folder_written_is_fsynced(tmp_path, monkeypatch):
    synced: list[str] = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    folder = (tmp_path / "run").resolve()
    fit(folder, steps=1)
    root = folder / "checkpoints"
    work = root / ".step-0000001.tmp"
    for name in ("policy.safetensors", "optimizer.safetensors", "optimizer.json", "state.json"):
        tmp = [i for i, p in enumerate(synced) if Path(p).parent == work and f".{name}.tmp" in p]
        assert tmp, f"{name} was not fsynced"
        assert str(work) in synced[tmp[0] + 1 :]  # its folder, after the rename
    last_in_work = max(i for i, p in enumerate(synced) if p == str(work))
    assert str(root) in synced[last_in_work + 1 :]  # checkpoints/, after step-N was renamed
    latest = [i for i, p in enumerate(synced) if Path(p).parent == root and ".latest.tmp" in p]
    assert latest and str(root) in synced[latest[-1] + 1 :]
    assert str(folder) in synced  # checkpoints/ itself was created in it
    # the final Fit: the model folder's files, the folder, and fit.json
    assert any(Path(p).parent == folder / ".model.tmp" for p in synced)
    assert any(".fit.json.tmp" in p for p in synced)
    assert synced[-1] == str(folder)  # fit.json's rename is the last thing made durable


def test_fsync_takes_files_and_folders(tmp_path):
    from kldsl.fit import atomic_write, fsync

    atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"))
    fsync(tmp_path / "a.txt")
    fsync(tmp_path)
    assert (tmp_path / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary left


# --- the command line --------------------------------------------------------------------------
def test_cli_refuses_changed_settings_and_an_occupied_folder(tmp_path, capsys):
    start = kl.Fit(model=kl.ToyLM(vocab="abc", seed=0), history=[], objective="reverse_kl")
    start.save(tmp_path / "start")
    source = tmp_path / "toy.kl"
    source.write_text(f'posterior = prior("{tmp_path / "start"}", max_tokens=4) | regex("^a")\n')
    out = tmp_path / "out"
    args = ["fit", str(source), "--out", str(out), "--lr", "0.1", "--batch-size", "8"]
    assert main([*args, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main([*args, "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints and a fit" in err
    assert "--resume" in err and "--overwrite" in err
    assert main([*args[:4], "--lr", "5.0", "--batch-size", "8", "--steps", "2", "--resume"]) == 2
    assert "lr=0.1 (this run: 5.0)" in capsys.readouterr().err
    assert json.loads((out / "fit.json").read_text())["info"]["lr"] == 0.1  # untouched
    assert main([*args, "--steps", "3", "--resume"]) == 0
    assert json.loads((out / "fit.json").read_text())["steps"] == 3
    assert main([*args, "--steps", "1", "--overwrite"]) == 0
    assert json.loads((out / "fit.json").read_text())["steps"] == 1


# --- 4. SIGKILL, then --resume: the uninterrupted weights, bitwise -----------------------------
STEPS = 24
TRIALS = 5


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path):
    """Kill ``kldsl fit`` at seeded random moments (any point of a step: drawing, updating,
    writing a checkpoint, saving the fit), then ``--resume``: the same weights, bit for bit."""
    start = kl.Fit(model=kl.ToyLM(vocab="abc", seed=0), history=[], objective="reverse_kl")
    start.save(tmp_path / "start")
    source = tmp_path / "toy.kl"
    source.write_text(  # forward_kl: a proposal and a running Ẑ to restore as well
        f'posterior = prior("{tmp_path / "start"}", max_tokens=4) * exp(length / 1.0)'
        ' | regex("^a")\n'
    )

    def args(out: Path) -> list[str]:
        return [
            "fit",
            str(source),
            "--out",
            str(out),
            "--steps",
            str(STEPS),
            "--lr",
            "0.1",
            "--batch-size",
            "8",
            "--checkpoint-every",
            "1",
            "--seed",
            "7",
        ]

    assert main(args(tmp_path / "full")) == 0
    full = kl.Fit.load(tmp_path / "full")
    assert len(full.history) == STEPS

    step_s = full.history[-1]["time_s"] / STEPS  # one step with its checkpoint
    rng = random.Random(20240601)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    interrupted = 0
    for trial in range(TRIALS):
        out = tmp_path / f"cut{trial}"
        after_step = rng.randint(1, STEPS - 4)  # kill once this many steps are logged ...
        delay = rng.uniform(0.0, 2 * step_s)  # ... and up to two steps later
        proc = subprocess.Popen(
            [sys.executable, "-m", "kldsl.cli", *args(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=tmp_path,
        )
        deadline = time.monotonic() + 60
        while _lines(out / "metrics.jsonl") < after_step and proc.poll() is None:
            assert time.monotonic() < deadline, "kldsl fit made no progress"
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        proc.stderr.close()
        assert proc.returncode in (0, -signal.SIGKILL), stderr[-3000:]
        latest = out / "checkpoints" / "latest"
        if not latest.is_file() or latest.read_text() != f"step-{STEPS:07d}":
            interrupted += 1  # killed before the last step was checkpointed

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no checkpoint: starting from step 0"
            assert main([*args(out), "--resume"]) == 0
        resumed = kl.Fit.load(out)
        assert torch.equal(resumed.model.logits, full.model.logits), f"trial {trial}"  # bitwise
        assert strip(resumed.history) == strip(full.history)
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))
    assert interrupted >= TRIALS - 1  # the kills did land while the run was training


def test_state_json_round_trips_through_state(tmp_path):
    from kldsl.backends.variational_state import SETTINGS, State

    fit(tmp_path / "run")
    data = json.loads(
        (tmp_path / "run" / "checkpoints" / "step-0000003" / "state.json").read_text()
    )
    state = State.from_json(data)
    assert state.step == 3 and len(state.history) == 3
    assert set(SETTINGS) <= set(data)
    assert state.to_json() == data
    assert state.log_z(0) == data["log_w_sum"][0] - math.log(data["count"][0])
