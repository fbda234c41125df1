"""Every option of ``sffn sample``, ``eval`` and ``train``: a bad value is refused with exit code 2 and a message,
never a traceback (Hypothesis over each command's option space), and each sampling option's own message."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from sffn_lab import training
from sffn_lab.config import Config, all_keys, load_config
from tests.support import TINY, as_flags, run_cli

SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny trained run (10 steps: one validation, one checkpoint) to sample from and evaluate."""
    out = tmp_path_factory.mktemp("runs")
    config = load_config(None, [*TINY, "train.max_steps=10", f"train.out_dir={out}"])
    return Path(training.train(config, progress=False).run_dir)


def text_or(values: st.SearchStrategy) -> st.SearchStrategy[str]:
    """An option's value as the shell passes it: mostly a value of the option's type, sometimes any text."""
    return st.integers(0, 19).flatmap(lambda i: st.text(max_size=12) if i == 0 else values.map(str))


def options(**values) -> list[str]:
    """``--key=value`` for each option given (one argument each, so a value may start with "-")."""
    return [f"--{key.rstrip('_').replace('_', '-')}={value}" for key, value in values.items() if value is not None]


INTS = st.one_of(st.integers(-(2**70), 2**70), st.integers(-1, 9))
FLOATS = st.floats(allow_nan=True, allow_infinity=True)


def assert_clean(code: int, out: str, err: str, args: list) -> None:
    assert "Traceback" not in out + err, f"sffn {args}\n{err}"
    assert code in (0, 2), f"sffn {args} exited {code}\n{err}"
    if code == 2:
        assert err.strip(), f"sffn {args} exited 2 without a message"


def replay(seed: int):
    """Hypothesis seeded from the test's printed seed, so that ``pytest --seed N`` replays a failure."""
    return lambda test: hypothesis_seed(seed)(SETTINGS(test))


def test_sample_options_never_give_a_traceback(run_dir, capsys, seed):
    @replay(seed)
    @given(
        tokens=text_or(st.integers(0, 6)),
        temperature=text_or(st.one_of(FLOATS, st.sampled_from([0.0, -1.0, 0.7]))),
        top_k=st.none() | text_or(st.one_of(INTS, st.integers(-2, 40))),
        seed_=text_or(INTS),
        prompt=text_or(st.just("")),  # the synthetic corpus' symbols are no text: most prompts are refused
    )
    def check(tokens, temperature, top_k, seed_, prompt):
        args = ["sample", run_dir, *options(tokens=tokens, temperature=temperature, top_k=top_k, seed_=seed_,
                                            prompt=prompt)]
        assert_clean(*run_cli(args, capsys), args)

    check()


def test_eval_options_never_give_a_traceback(run_dir, capsys, seed, tmp_path):
    keys = all_keys(Config)

    @replay(seed)
    @given(
        target=st.sampled_from(["run", "ckpt", "missing", "garbage", "dir"]),
        split=text_or(st.sampled_from(["valid", "test"])),
        overrides=st.lists(st.tuples(st.sampled_from(keys), text_or(st.one_of(st.integers(-2, 64), FLOATS))),
                           max_size=2),
        as_json=st.booleans(),
    )
    def check(target, split, overrides, as_json):
        (tmp_path / "garbage.ckpt").write_bytes(b"\x00not a checkpoint")
        path = {"run": run_dir, "ckpt": run_dir / "checkpoints" / "last.ckpt", "missing": tmp_path / "none.ckpt",
                "garbage": tmp_path / "garbage.ckpt", "dir": tmp_path}[target]
        args = ["eval", path, *options(split=split), *as_flags(f"{k}={v}" for k, v in overrides)]
        args += ["--json"] if as_json else []
        assert_clean(*run_cli(args, capsys), args)

    check()


def test_train_options_never_give_a_traceback(capsys, seed, tmp_path):
    @replay(seed)
    @given(
        data=text_or(st.sampled_from(["synthetic", "/nonexistent.txt"])),  # named corpora: tests/test_data.py
        max_steps=text_or(st.integers(-1, 2)),
        seed_=text_or(INTS),
        accelerator=text_or(st.sampled_from(["cpu", "gpu", "auto", "tpu", "mps"])),
        devices=text_or(st.integers(-1, 2)),
        strategy=text_or(st.sampled_from(["auto", "ddp", "fsdp", "deepspeed"])),
        precision=text_or(st.sampled_from(["32-true", "bf16-mixed", "16-mixed", "64", "bf16"])),
        name=st.text(max_size=10),
        num_nodes=text_or(st.integers(0, 2)),
    )
    def check(data, max_steps, seed_, accelerator, devices, strategy, precision, name, num_nodes):
        args = ["train", *as_flags(TINY), *options(
            data=data, max_steps=max_steps, seed_=seed_, accelerator=accelerator, devices=devices, strategy=strategy,
            precision=precision, name=name, num_nodes=num_nodes), "--out", tmp_path / "runs", "--no-progress"]
        assert_clean(*run_cli(args, capsys), args)

    check()


@pytest.mark.parametrize("option, value, message", [
    ("--top-k", "0", "--top-k must be at least 1"),
    ("--top-k", "-3", "--top-k must be at least 1"),
    ("--top-k", "33", "vocabulary of 32"),
    ("--temperature", "-1", "--temperature"),
    ("--temperature", "nan", "--temperature"),
    ("--temperature", "inf", "--temperature"),
    ("--tokens", "0", "--tokens must be at least 1"),
    ("--seed", "-1", "--seed"),
])
def test_each_bad_sampling_option_is_named(run_dir, capsys, option, value, message):
    code, _, err = run_cli(["sample", run_dir, option, value], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_temperature_zero_is_greedy_whatever_the_seed(run_dir, capsys):
    outs = {run_cli(["sample", run_dir, "--temperature", "0", "--seed", str(s), "--tokens", "12"], capsys)[1]
            for s in (0, 1, 2)}
    assert len(outs) == 1 and len(next(iter(outs)).rstrip("\n")) == 13


def test_top_k_one_is_greedy(run_dir, capsys):
    greedy = run_cli(["sample", run_dir, "--temperature", "0", "--tokens", "12"], capsys)[1]
    assert run_cli(["sample", run_dir, "--top-k", "1", "--seed", "5", "--tokens", "12"], capsys)[1] == greedy


@pytest.mark.parametrize("temperature", ["4.9e-171", "1e-300"])
def test_a_vanishing_temperature_samples_greedily(run_dir, capsys, temperature):
    """Found by the property test: logits / 4.9e-171 overflowed to inf − inf. The logits are shifted first, so a
    temperature that small picks the largest logit, as greedy decoding does."""
    greedy = run_cli(["sample", run_dir, "--temperature", "0", "--tokens", "12"], capsys)[1]
    code, out, err = run_cli(["sample", run_dir, "--temperature", temperature, "--seed", "3", "--tokens", "12"],
                             capsys)
    assert code == 0 and out == greedy, err
