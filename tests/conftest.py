"""Shared fixtures."""

from __future__ import annotations

import json

import pytest
import torch

import kldsl as kl


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M model (converted once into the kldsl cache)."""
    from kldsl.models import load_lm

    return load_lm("smollm2")


@pytest.fixture(autouse=True)
def _threads(request):
    """One torch thread for the tiny models (on a busy 2-core machine a second thread makes
    a tiny op ~100× slower); two for tests on the embedded model."""
    before = torch.get_num_threads()
    torch.set_num_threads(2 if "smollm2" in request.fixturenames else 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy_kl(tmp_path_factory):
    """A .kl file over a saved ToyLM (``| contains("a")``), so the CLI samples without the
    embedded model."""
    root = tmp_path_factory.mktemp("toy")
    folder = kl.Fit(model=kl.ToyLM(vocab="ab"), history=[], objective="js").save(root / "toy")
    path = root / "toy.kl"
    path.write_text(f'm = prior({json.dumps(str(folder))}, max_tokens=3) | contains("a")\n')
    return path
