"""What rewards and constraints return is checked before any engine counts it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kldsl as kl
from kldsl.errors import KldslRewardError

LM = kl.ToyLM(vocab="ab", seed=0)


def _constant(value_of, kind):
    """A reward or constraint named ``odd`` that returns ``value_of(n)`` for n texts."""

    def odd(texts):
        return value_of(len(texts))

    return kl.constraint(odd) if kind == "constraint" else kl.reward(odd)


BAD_CONSTRAINTS = {
    "nan": (lambda n: [float("nan")] * n, "nan"),
    "string": (lambda n: ["False"] * n, "'False'"),
    "fraction": (lambda n: [0.3] * n, "0.3"),
    "tensor of fractions": (lambda n: torch.full((n,), 0.3), "0.3"),
    "none": (lambda n: [None] * n, "None"),
    "2-D array": (lambda n: np.zeros((n, 2), dtype=bool), "shape"),
    "too few": (lambda n: [True] * (n - 1), "values for"),
    "not a list": (lambda n: True, "a bool"),
    "a string": (lambda n: "T" * n, "a str"),
}


@pytest.mark.parametrize("case", BAD_CONSTRAINTS)
@pytest.mark.parametrize("engine", ["importance", "rejection", "exact"])
def test_a_constraint_must_return_truth_values(case, engine):
    value_of, shown = BAD_CONSTRAINTS[case]
    model = kl.prior(LM, max_tokens=3) | _constant(value_of, "constraint")
    with pytest.raises(KldslRewardError, match="constraint `odd`") as err:
        kl.infer(model, engine=engine, n=8, seed=0)
    assert shown in str(err.value)
    if "sample" in str(err.value):  # a per-value error names the text it was given
        assert "on the sample '" in str(err.value)


BAD_REWARDS = {
    "overflowing int": (lambda n: [10**400] * n, "1000"),
    "numeric string": (lambda n: ["0"] * n, "'0'"),
    "complex": (lambda n: [1 + 2j] * n, "(1+2j)"),
    "numpy complex": (lambda n: np.full(n, 1 + 2j), "(1+2j)"),
    "infinite": (lambda n: [float("inf")] * n, "inf"),
    "not a list": (lambda n: 1.5, "a float"),
}


@pytest.mark.parametrize("case", BAD_REWARDS)
def test_a_reward_must_return_finite_real_numbers(case):
    value_of, shown = BAD_REWARDS[case]
    model = kl.prior(LM, max_tokens=3) * kl.exp(_constant(value_of, "reward"))
    with pytest.raises(KldslRewardError, match="reward `odd`") as err:
        kl.infer(model, engine="importance", n=8, seed=0)
    assert shown in str(err.value)


@pytest.mark.parametrize(
    "value_of",
    [
        lambda texts: [len(t) % 2 == 1 for t in texts],
        lambda texts: np.array([len(t) % 2 for t in texts]),  # 0/1 integers
        lambda texts: torch.tensor([len(t) % 2 == 1 for t in texts]),
        lambda texts: [np.bool_(len(t) % 2) for t in texts],
        lambda texts: [float(len(t) % 2) for t in texts],
    ],
)
def test_truth_values_of_every_common_type_agree_with_the_exact_posterior(value_of):
    plain = kl.prior(LM, max_tokens=3) | kl.constraint(
        lambda texts: [len(t) % 2 == 1 for t in texts]
    )
    model = kl.prior(LM, max_tokens=3) | kl.constraint(value_of)
    want, got = kl.infer(plain, engine="exact"), kl.infer(model, engine="exact")
    assert got.log_z == want.log_z
    assert torch.equal(got.log_weights, want.log_weights)


def test_reward_values_of_numpy_and_torch_types_are_read_exactly():
    values = [np.float32(0.5), np.int64(2), torch.tensor(0.25, dtype=torch.float64), True, 3]
    r = kl.reward(lambda texts: values[: len(texts)], name="mixed")
    assert r(["a"] * 5).tolist() == [0.5, 2.0, 0.25, 1.0, 3.0]


def test_a_message_quotes_long_values_and_texts_briefly():
    r = kl.reward(lambda texts: ["x" * 10_000 for _ in texts], name="long")
    with pytest.raises(KldslRewardError) as err:
        r(["y" * 10_000])
    assert len(str(err.value)) < 300
