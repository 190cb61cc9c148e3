"""Files a user did not write are data: model folders never run code, patterns never hang."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from test_variational import Unigram
from tiny_hf import tiny_hf

import kldsl as kl
from kldsl.cli import main
from kldsl.errors import KldslModelLoadError, KldslTypeError
from kldsl.fit import load_model
from kldsl.models import load_lm


class _Payload:
    """Unpickling this creates the file ``marker``: proof that a load ran code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_fit_folder(tmp_path, kind: str = "torch"):
    folder = tmp_path / "downloaded"
    (folder / "model").mkdir(parents=True)
    marker = tmp_path / "pwned"
    with open(folder / "model" / "lm.pt", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    manifest = {"format": "kldsl-fit", "version": 1, "kind": kind, "name": "x", "objective": "js"}
    (folder / "fit.json").write_text(json.dumps(manifest))
    return folder, marker


def test_a_pickled_model_folder_is_refused_and_never_unpickled(tmp_path, capsys):
    folder, marker = _hostile_fit_folder(tmp_path)
    model = kl.parse(f'm = prior({json.dumps(str(folder))}) | contains("a")')
    with pytest.raises(KldslModelLoadError, match="no longer unpickles"):
        load_lm(model.base().model)
    assert not marker.exists()
    kl_file = tmp_path / "a.kl"
    kl_file.write_text('m = prior(smollm2, max_tokens=2) | contains("a")\n')
    assert main(["sample", str(kl_file), "--proposal", str(folder), "--n", "2"]) == 2
    assert "no longer unpickles" in capsys.readouterr().err
    assert not marker.exists()


def test_an_hf_folder_with_pickled_weights_is_not_read(tmp_path):
    lm = tiny_hf("ab ")
    folder = tmp_path / "hf"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    marker = tmp_path / "pwned"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    with pytest.raises(KldslModelLoadError, match=r"\.bin weights"):
        load_lm(kl.parse(f"m = prior({json.dumps(str(folder))})").base().model)
    assert not marker.exists()


def test_a_custom_module_lm_is_saved_as_safetensors_and_loads_only_into_an_instance(tmp_path):
    lm = Unigram()
    with torch.no_grad():
        lm.logits.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    folder = kl.Fit(model=lm, history=[], objective="reverse_kl").save(tmp_path / "fit")
    assert not list(folder.rglob("*.pt")) and list(folder.rglob("*.safetensors"))
    with pytest.raises(KldslModelLoadError, match="never runs code"):
        load_lm(str(folder))
    loaded = load_model(folder, into=Unigram())
    assert torch.equal(loaded.logits, lm.logits)


def test_an_empty_model_name_is_refused():
    with pytest.raises(KldslTypeError, match="empty name"):
        kl.parse('m = prior("")')
    with pytest.raises(KldslTypeError, match="empty name"):
        kl.prior("  ")


@pytest.mark.parametrize(
    "pattern, text",
    [
        (r"(\w+\s?)+!!!$", "word " * 2000 + "!!"),  # hung > 120 s under Python's re
        (r"(a+)+$", "a" * 5000 + "b"),  # hung > 180 s under Python's re
    ],
)
def test_regex_runs_in_linear_time(pattern, text):
    # a subprocess, so that a regression is a failure after the timeout instead of a hung suite
    code = textwrap.dedent(
        f"""
        import kldsl as kl
        print(kl.regex({pattern!r})([{text!r}] * 20).tolist().count(True))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "0"


def test_regex_matches_like_a_search():
    c = kl.regex(r"\bPar(is|ma)\b")
    assert c(["I love Paris.", "Parisian", "parma", "Parma ham"]).tolist() == [
        True,
        False,
        False,
        True,
    ]
    assert kl.regex(r"(?i)paris")(["PARIS"]).tolist() == [True]


@pytest.mark.parametrize(
    "pattern, reason",
    [
        (r"(?=a)b", "lookaround"),
        (r"(a)\1", "backreferences"),
        ("[", "missing ]"),
        ("a{1000}{1000}", "bad repetition"),
        ("a" * 10_001, "more than 10,000"),
    ],
)
def test_regex_features_re2_lacks_are_clear_errors(pattern, reason):
    with pytest.raises(KldslTypeError, match=reason):
        kl.parse(f"m = prior(smollm2) | regex({json.dumps(pattern)})")


def test_a_fine_tuning_run_writes_no_pickle(tmp_path):
    model = kl.prior(kl.ToyLM(vocab="ab"), max_tokens=3) | kl.contains("a")
    kl.infer(model, engine="variational", steps=2, batch_size=8, output_dir=tmp_path / "run")
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "optimizer.safetensors" for p in written)
    for path in written:
        head = path.read_bytes()[:4]
        # a pickle starts with its protocol byte 0x80, torch.save's zip with PK
        assert not head.startswith((b"\x80", b"PK\x03\x04")), f"{path.name} is a pickle"
