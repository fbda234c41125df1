"""A variant written as one file outside the checkout: exactly the README's example, through ``--plugin``."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from sffn_lab.config import VARIANTS, load_config
from sffn_lab.errors import UserError
from tests.support import TINY, as_flags, run_cli

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> tuple[str, list[str]]:
    """The plugin file and the command of the README's "How to add a variant"."""
    section = ROOT.joinpath("README.md").read_text().split("## How to add a variant")[1].split("\n## ")[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    command = re.search(r"```bash\n(sffn train .*?)\n```", section, re.S).group(1)
    return code, shlex.split(command)[1:]


@pytest.fixture
def registry():
    """The registry as it was, after the test (the plugin's kind leaves with it)."""
    saved = dict(VARIANTS)
    yield
    VARIANTS.clear()
    VARIANTS.update(saved)


def sffn(*args, env=None) -> subprocess.CompletedProcess:
    """``sffn ARGS`` in a fresh process (nothing of this one's registry carries over)."""
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", "from sffn_lab.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env)


def test_the_readme_example_trains_is_counted_and_evaluates_samples_and_resumes_through_its_plugin(
        tmp_path, capsys, registry):
    code, command = readme_example()
    plugin = tmp_path / "outside" / "mine.py"
    plugin.parent.mkdir()
    plugin.write_text(code)
    command = [str(plugin) if arg == "mine.py" else arg for arg in command]
    out = tmp_path / "runs"
    args = [*command, *as_flags(TINY), "--set", "model.ffn.n_experts=4", "--set", "model.ffn.expert_size=16",
            "--max-steps", "10", "--out", out, "--no-progress"]
    exit_code, _, err = run_cli(args, capsys)
    assert exit_code == 0, err
    run_dir = next(out.iterdir())
    saved = load_config(run_dir / "config.yaml")
    assert saved.plugins == str(plugin) and saved.model.ffn.kind == "mine"
    assert saved.model.ffn.mine.temperature == 0.5

    listed = sffn("variants", "--d-model", 64, "--d-ff", 256, "--expert-size", 32, "--top-k", 2,
                  env={"SFFN_PLUGINS": str(plugin)})
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if " mine " in line)
    # a learned W_sel [N_E, D] and N_E blocks of 2·G·D: parameter-equal to dense d_ff 256 at D 64
    assert "N_E=8 G=32 K=2" in row and "33,280" in row.replace(" ", "")

    evaluated = sffn("eval", run_dir, "--json")  # no --plugin: the run's saved plugins
    assert evaluated.returncode == 0, evaluated.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert json.loads(evaluated.stdout)["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    sampled = sffn("sample", run_dir, "--tokens", 5, "--prompt", "")
    assert sampled.returncode == 0, sampled.stderr

    exit_code, _, err = run_cli(["train", "--resume", run_dir, "--set", "train.max_steps=20", "--no-progress"], capsys)
    assert exit_code == 0, err
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 20


def test_a_missing_or_broken_plugin_is_a_clear_error(tmp_path, registry):
    with pytest.raises(UserError, match="does not exist"):
        load_config(None, [f"plugins={tmp_path / 'nowhere.py'}"])
    broken = tmp_path / "broken.py"
    broken.write_text("raise ValueError('no')\n")
    with pytest.raises(UserError, match=r"broken.py' failed to load: ValueError: no"):
        load_config(None, [f"plugins={broken}"])
    with pytest.raises(UserError, match="cannot be imported"):
        load_config(None, ["plugins=no_such_module_of_sffn"])
    with pytest.raises(UserError, match=r"Unknown config key 'model.ffn.mine'.*--plugin"):
        from sffn_lab.config import Config, from_dict

        from_dict(Config, {"model": {"ffn": {"mine": {"temperature": 1.0}}}})


def test_an_installed_package_s_entry_point_registers_its_variant_without_plugin(tmp_path, monkeypatch, registry):
    import importlib.metadata

    from sffn_lab.variants import plugins

    code, _ = readme_example()
    (tmp_path / "my_package_mine.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = importlib.metadata.EntryPoint("mine", "my_package_mine", plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [entry] if group == entry.group else [])
    plugins.load_installed()
    assert load_config(None, ["model.ffn.kind=mine", "model.ffn.mine.temperature=2"]).model.ffn.mine.temperature == 2


def test_the_readme_example_joins_a_compute_matched_grid_sized_from_its_measured_cost(tmp_path, registry):
    """A grid naming the plugin (the key ``plugins``) plans its run at the dense run's FLOPs per token: G solved
    from the router's cost as measured from the built layer (a learned W_sel adds N_E·D multiply-adds), with
    nothing about its cost written in the plugin."""
    from sffn_lab.ablation import check_matching, load_grid

    code, _ = readme_example()
    plugin = tmp_path / "outside" / "mine.py"
    plugin.parent.mkdir()
    plugin.write_text(code)
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: plugin_grid\n"
        f"set: [{', '.join(repr(s) for s in TINY)}, 'model.ffn.d_ff=128', 'plugins={plugin}']\n"
        "match: compute_equal\nbaseline: dense\nseeds: [0]\nruns:\n"
        "  - {name: dense, set: ['model.ffn.kind=dense']}\n"
        "  - {name: mine, set: ['model.ffn.kind=mine', 'model.ffn.n_experts=8', 'model.ffn.top_k=2']}\n")
    sweep = load_grid(grid)
    check_matching(sweep)  # raises unless every run is within 2% of the baseline's FLOPs
    dense, mine = sweep.runs
    D = mine.config.model.d_model
    G = mine.config.model.ffn.expert_size
    assert mine.config.model.ffn.kind == "mine" and mine.config.plugins == str(plugin)
    assert 4 * 2 * G * D + 2 * 8 * D == pytest.approx(4 * 128 * D, abs=4 * 2 * D)  # K·G cells + N_E scores
    assert abs(mine.flops_per_token - dense.flops_per_token) <= 0.02 * dense.flops_per_token
