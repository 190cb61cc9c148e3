"""Hostile input at the command line: each one ends in one short ``error:`` message and exit
status 2 — never a traceback, a hang, an internal error or a file written by the input."""

from __future__ import annotations

import pytest

from kldsl.cli import main

#: the longest error message a user should have to read
MAX_MESSAGE = 2_000

DEEP = 600  # deeper than Python's default recursion limit allows a recursive printer

TEXTS: dict[str, str] = {
    # syntax
    "empty": "",
    "only a comment": "# nothing here\n",
    "dangling operator": "m = prior(smollm2) *",
    "unbalanced (": "m = (prior(smollm2)",
    "unbalanced )": "m = prior(smollm2))",
    "single quotes": "m = prior('smollm2')",
    "unterminated string": 'm = prior(smollm2, prompt="abc)',
    "bang": "m = prior(smollm2) | !curse",
    "ampersand": "m = prior(smollm2) | curse & curse",
    "two equals": "m = n = prior(smollm2)",
    "keyword as name": "not = prior(smollm2)",
    "number as name": "1 = prior(smollm2)",
    "bad escape": 'm = prior(smollm2, prompt="\\q")',
    "tab in string": 'm = prior(smollm2, prompt="a\tb")',
    "null byte": "m = prior(smollm2)\x00",
    "random bytes as text": "\x01\x02\x03 ** ( ) | ,,",
    "emoji name": "😀 = prior(smollm2)",
    "form feed then error": "m = prior(smollm2)\f\nn = *",
    "line separator then error": "m = prior(smollm2)\u2028n = *",
    "lone CR": "m = prior(smollm2)\rn = prior(smollm2) *",
    # names and calls
    "unknown name": "m = prior(smollm2) * exp(sentimnt / 0.1)",
    "unknown function": "m = priors(smollm2)",
    "call a value": "m = sentiment(1)",
    "function as value": "m = prior",
    "unknown keyword": "m = prior(smollm2, temperature=2)",
    "duplicate keyword": 'm = prior(smollm2, prompt="a", prompt="b")',
    "positional after keyword": 'm = prior(smollm2, prompt="a", 3)',
    "too many arguments": 'm = prior(smollm2, "a", 3, 4)',
    "long unknown name": "m = " + "x" * 1_000_000,
    "unknown name after many statements": "".join(f"v{i} = 1\n" for i in range(30_000)) + "m = y",
    # types
    "model times number": "m = 2 * prior(smollm2)",
    "name times tilt": "m = smollm2 * exp(length / 0.5)",
    "string times prior": 'm = "" * prior(smollm2)',
    "exp of a constraint": "m = prior(smollm2) * exp(curse)",
    "exp of a model": "m = prior(smollm2) * exp(prior(smollm2))",
    "not of a reward": "m = prior(smollm2) | not length",
    "condition on a reward": "m = prior(smollm2) | length",
    "reward times reward": "m = prior(smollm2) * exp(length * length)",
    "constraint or reward": "m = prior(smollm2) | curse or length",
    "mean of a constraint": "m = prior(smollm2) | mean(curse) == 0.5",
    "mean without a target": "m = prior(smollm2) | mean(length)",
    "mean of a model": "m = prior(smollm2) | mean(prior(smollm2)) == 1",
    "mean set to a string": 'm = prior(smollm2) | mean(length) == "half"',
    "mean infinite": "m = prior(smollm2) | mean(length) == 1e999",
    "mean at a bound": 'm = prior(smollm2) | mean(indicator(contains("a"))) == 1',
    "mean outside the bounds": "m = prior(smollm2) | mean(length) == -1",
    "chained equality": "m = prior(smollm2) | mean(length) == 1 == 2",
    "means joined by and": "m = prior(smollm2) | mean(length) == 1 and mean(length) == 2",
    "equality of a reward": "m = prior(smollm2) | length == 1",
    "not of a mean": "m = prior(smollm2) | not mean(length) == 1",
    "mean as a factor": "m = prior(smollm2) * (mean(length) == 1)",
    "model plus model": "m = prior(smollm2) + prior(smollm2)",
    "last statement a reward": "m = length",
    "last statement a number": "m = 3",
    "no prior": "m = exp(length / 0.5)",
    "prior of a number": "m = prior(3)",
    "prior of an empty name": 'm = prior("")',
    "prompt a number": "m = prior(smollm2, prompt=3)",
    "max_tokens negative": "m = prior(smollm2, max_tokens=-1)",
    "max_tokens fraction": "m = prior(smollm2, max_tokens=1.5)",
    "max_tokens a string": 'm = prior(smollm2, max_tokens="4")',
    "contains empty": 'm = prior(smollm2) | contains("")',
    "contains a number": "m = prior(smollm2) | contains(3)",
    "regex a number": "m = prior(smollm2) | regex(3)",
    "reward_model missing": 'm = prior(smollm2) * exp(reward_model("no/such/folder"))',
    "reward_model a number": "m = prior(smollm2) * exp(reward_model(3))",
    "reward_model a long name": 'm = prior(smollm2) * exp(reward_model("' + "a" * 5000 + '"))',
    # numbers
    "β zero": "m = prior(smollm2) * exp(length / 0)",
    "β negative": "m = prior(smollm2) * exp(length / (0 - 1))",
    "β infinite": "m = prior(smollm2) * exp(length / 1e999)",
    "scale infinite": "m = prior(smollm2) * exp(length * 1e999)",
    "inf minus inf": "m = prior(smollm2) * exp(length / (1e999 - 1e999))",
    "α zero": "m = prior(smollm2) ** 0",
    "α negative": "m = prior(smollm2) ** (0 - 1)",
    "α infinite": "m = prior(smollm2) ** 1e999",
    "huge integer": "m = prior(smollm2) * exp(length / " + "9" * 400 + ")",
    "power overflow": "m = prior(smollm2) * exp(length / 10 ** 400)",
    "complex power": "m = prior(smollm2) * exp(length / (0 - 8) ** 0.5)",
    "zero to a negative power": "m = prior(smollm2) * exp(length / 0 ** (0 - 1))",
    "division by zero": "m = prior(smollm2) * exp(length / (1 / 0))",
    "huge max_tokens": "m = prior(smollm2, max_tokens=" + "9" * 400 + ")",
    # depth
    "deep parentheses": "m = prior(smollm2) * exp(" + "(" * DEEP + "length" + ")" * DEEP + ")",
    "deep not": "m = prior(smollm2) | " + "not " * DEEP + "curse",
    "deep negation": "m = prior(smollm2) * exp(" + "-" * DEEP + "length)",
    "deep sum": "m = prior(smollm2) * exp(" + " + ".join(["length"] * DEEP) + ")",
    "deep and": "m = prior(smollm2) | " + " and ".join(["curse"] * DEEP),
    "deep statements": "r = length\n"
    + "r = r + length\n" * DEEP
    + "m = prior(smollm2) * exp(r / 1.0)",
    "deep regex": 'm = prior(smollm2) | regex("' + "(" * 5000 + "a" + ")" * 5000 + '")',
    # regular expressions
    "regex backreference": 'm = prior(smollm2) | regex("(a)\\\\1")',
    "regex lookahead": 'm = prior(smollm2) | regex("(?=a)")',
    "regex unbalanced": 'm = prior(smollm2) | regex("[")',
    "regex huge repetition": 'm = prior(smollm2) | regex("a{1000}{1000}")',
    # strings
    "lone surrogate in prompt": 'm = prior(smollm2, prompt="\\ud800")',
    "huge prompt literal": 'm = prior(smollm2, prompt="' + "a" * 200_000 + '"',
    # code execution attempts
    "import": 'm = __import__("os")',
    "dunder attribute": "m = prior.__class__",
    "eval": 'm = eval("1")',
    "exec": 'm = exec("import os")',
    "lambda": "m = lambda: 1",
    "f-string": 'm = f"{prior}"',
    "open": 'm = open("x", "w")',
    "subscript": "m = [1][0]",
    "attribute call": "m = prior(smollm2).lm",
    "semicolon": "m = prior(smollm2); import os",
    "walrus": "m = (x := 1)",
    "decorator": "@prior\nm = 1",
    "dict literal": "m = {}",
    "comprehension": "m = [x for x in y]",
    "stray backslash": "m = prior(smollm2) \\ * 2",
}

BYTES: dict[str, bytes] = {
    "invalid utf-8": b'm = prior(smollm2, prompt="\xff\xfe")\n',
    "utf-16": "m = prior(smollm2)\n".encode("utf-16"),
    "latin-1 prompt": 'm = prior(smollm2, prompt="caf\xe9")\n'.encode("latin-1"),
    "truncated utf-8": b'm = prior(smollm2, prompt="\xe2\x82")\n',
}


def _run(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit status {code}: {err[:500]}"
    assert err.startswith("error: ")
    assert "Traceback" not in err
    assert len(err) <= MAX_MESSAGE, f"a {len(err):,}-character message"
    return err


@pytest.mark.parametrize("name", TEXTS)
def test_hostile_text_is_one_clear_error(name, tmp_path, capsys):
    path = tmp_path / "hostile.kl"
    path.write_text(TEXTS[name], encoding="utf-8", errors="surrogatepass", newline="")
    _run(["explain", str(path)], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile.kl"]  # nothing written


@pytest.mark.parametrize("name", BYTES)
def test_undecodable_files_are_one_clear_error(name, tmp_path, capsys):
    path = tmp_path / "hostile.kl"
    path.write_bytes(BYTES[name])
    _run(["explain", str(path)], capsys)


def test_a_folder_or_a_missing_file_as_the_model_file(tmp_path, capsys):
    _run(["explain", str(tmp_path)], capsys)
    _run(["explain", str(tmp_path / "missing.kl")], capsys)
    _run(["sample", str(tmp_path)], capsys)


HOSTILE_OPTIONS = {
    "unknown engine": ["--engine", "importanse"],
    "zero samples": ["--n", "0"],
    "negative samples": ["--n", "-5"],
    "a billion samples": ["--n", "1000000000"],
    "zero batch": ["--batch-size", "0"],
    "huge batch": ["--engine", "rejection", "--batch-size", "100000000"],
    "missing proposal": ["--proposal", "no/such/folder"],
    "empty proposal": ["--proposal", ""],
    "option of another engine": ["--engine", "exact", "--chains", "4"],
    "bad moves": ["--engine", "mcmc", "--moves", "teleport:1"],
    "rejection without a bound": ["--engine", "qrs", "--qrs-beta", "-1"],
}


@pytest.mark.parametrize("name", HOSTILE_OPTIONS)
def test_hostile_sampling_options_are_one_clear_error(name, toy_kl, capsys):
    _run(["sample", str(toy_kl), "--n", "8", *HOSTILE_OPTIONS[name]], capsys)


def test_out_into_a_folder_is_one_clear_error(toy_kl, tmp_path, capsys):
    _run(["sample", str(toy_kl), "--n", "8", "--out", str(tmp_path)], capsys)
