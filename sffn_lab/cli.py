"""The ``sffn`` command line: one Typer command per toolkit function.

User mistakes raise ``UserError``; ``main`` prints them as one short paragraph and exits with 2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sffn_lab.config import MAX_SEED
from sffn_lab.config_help import complete_override
from sffn_lab.durations import format_duration
from sffn_lab.errors import UserError
from sffn_lab.experiments import DEFAULT_CONFIG, resolve, shipped_names
from sffn_lab.units import per

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="sffn-lab: train, evaluate and ablate sparse feed-forward layers in language models.",
)
console = Console(width=None if sys.stdout.isatty() else 160)


def _print_warning(text: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {text}", soft_wrap=True)


def _warn_if_cpu_busy() -> None:
    """Before CPU work: say so when other processes hold the cores torch's threads need."""
    import torch

    from sffn_lab.busy_cpu import contention_warning

    if not torch.cuda.is_available() and (warning := contention_warning(torch.get_num_threads())):
        _print_warning(warning)


def _warn_if_slow_fp32(config) -> None:
    """Before GPU training: say so when fp32 products would bypass the tensor cores."""
    import torch

    from sffn_lab.training import slow_fp32_warning

    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    if warning := slow_fp32_warning(config.train, capability):
        _print_warning(warning)


def _typed_overrides(**values) -> list[str]:
    """Typed CLI options → dotted overrides, for the options the user actually gave."""
    keys = {
        "data": "data.corpus",
        "max_steps": "train.max_steps",
        "seed": "train.seed",
        "accelerator": "train.accelerator",
        "devices": "train.devices",
        "strategy": "train.strategy",
        "precision": "train.precision",
        "out": "train.out_dir",
        "name": "name",
        "num_nodes": "train.num_nodes",
    }
    return [f"{keys[k]}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items() if v is not None]


def _format_summary(summary) -> Table:
    table = Table(title="Run summary", show_header=False)
    unit = per(summary.unit)
    if summary.val_loss is not None:
        table.add_row(f"validation loss (nats {unit})", f"{summary.val_loss:.4f}")
        table.add_row(f"validation bits {unit}", f"{summary.val_bits:.4f}")
    if summary.val_ppl is not None:
        table.add_row(f"validation perplexity {unit}", f"{summary.val_ppl:.2f}")
    if summary.val_bpb is not None:
        table.add_row("validation bits per byte of text", f"{summary.val_bpb:.4f}")
    if summary.entropy_rate_bits is not None and summary.entropy_gap_bits is not None:
        table.add_row("true entropy rate (bits/token)", f"{summary.entropy_rate_bits:.4f}")
        table.add_row("gap to the entropy rate (bits/token)", f"{summary.entropy_gap_bits:+.4f}")
    table.add_row("tokens scored", summary.scored)
    table.add_row("evaluation protocol", summary.protocol)
    table.add_row("parameters (total / active)", f"{summary.total_params:,} / {summary.active_params:,}")
    table.add_row("forward FLOPs per token", f"{summary.flops_per_token:,}")
    table.add_row("steps", str(summary.step))
    table.add_row("tokens seen", f"{summary.tokens_seen:,}")
    table.add_row("wall time", format_duration(summary.wall_time_s))
    return table


def _complete_corpus(incomplete: str) -> list[str]:
    from sffn_lab.data.corpora import CORPUS_NAMES

    return [name for name in CORPUS_NAMES if name.startswith(incomplete)]


def _complete_shipped(incomplete: str) -> list[str]:
    return [name for name in shipped_names() if name.startswith(incomplete)]


def _experiment_file(config: Path | None) -> Path:
    """The experiment file ``sffn train -c`` names: a path, a shipped name, or the default; grids are refused."""
    if config is None:
        return DEFAULT_CONFIG
    config = resolve(config)
    if config.is_file():
        from sffn_lab.ablation import is_grid

        if is_grid(config):
            raise UserError(f"'{config}' is an ablation grid, not an experiment: run it with  sffn ablate {config}")
    return config


@app.command()
def train(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML experiment file or a shipped name."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: --set model.d_model=256.",
                                   autocompletion=complete_override),
    data: str | None = typer.Option(None, help="Corpus name, path to a text file or hf:NAME.",
                                    autocompletion=_complete_corpus),
    max_steps: int | None = typer.Option(None, help="Training steps."),
    seed: int | None = typer.Option(None, help="Random seed."),
    accelerator: str | None = typer.Option(None, help="cpu, gpu, auto ..."),
    devices: int | None = typer.Option(None, help="Number of devices."),
    strategy: str | None = typer.Option(None, help="Lightning strategy: auto, ddp, fsdp ..."),
    precision: str | None = typer.Option(None, help="32-true, bf16-mixed, 16-mixed ..."),
    out: str | None = typer.Option(None, help="Directory that holds run directories."),
    name: str | None = typer.Option(None, help="Run name (prefix of the run directory)."),
    resume: Path | None = typer.Option(None, help="Continue the run in this run directory."),
    num_nodes: int | None = typer.Option(None, help="Machines of a multi-node run (train.num_nodes)."),
    run_dir: Path | None = typer.Option(None, help="The new run's directory instead of a timestamped one; a "
                                        "multi-node run gives the same shared path on every node."),
    progress: bool = typer.Option(True, help="Show the progress bar."),
    plugin: list[str] = typer.Option([], "--plugin", help="A Python file or module that registers FFN variants "
                                     "(repeatable; with $SFFN_PLUGINS, saved as the config key plugins)."),
) -> None:
    """Train a language model (the default experiment when run without options)."""
    from sffn_lab.config import load_config
    from sffn_lab.run_dir import is_launched_rank
    from sffn_lab.variants.plugins import canonical, from_environment

    plugins = [canonical(p) for p in [*from_environment(), *plugin]]
    overrides = _typed_overrides(
        data=data, max_steps=max_steps, seed=seed, accelerator=accelerator, devices=devices,
        strategy=strategy, precision=precision, out=out, name=name, num_nodes=num_nodes,
    ) + ([f"plugins={','.join(plugins)}"] if plugins else []) + list(set_)
    if resume is not None:
        if config is not None:
            raise UserError("--resume continues a run with its own config; do not pass --config with it.")
        if run_dir is not None:
            raise UserError("--resume continues the run in its own directory; do not pass --run-dir with it.")
        from sffn_lab.checkpoints import load_run_config

        cfg = load_run_config(resume, overrides)
    else:
        cfg = load_config(_experiment_file(config), overrides)
    from sffn_lab import training

    _warn_if_cpu_busy()
    _warn_if_slow_fp32(cfg)
    summary = training.train(cfg, progress=progress, resume_dir=resume, run_dir=run_dir)
    if not is_launched_rank():
        console.print(_format_summary(summary))
        console.print(f"run directory: {summary.run_dir}", soft_wrap=True)


def _check_exists(checkpoint: Path) -> None:
    """A checkpoint or run directory that is not there is refused before torch and Lightning are imported."""
    if not checkpoint.exists():
        raise UserError(f"Checkpoint '{checkpoint}' does not exist.")


class Split(str, Enum):
    valid = "valid"
    test = "test"


@app.command("eval")
def eval_(
    checkpoint: Path = typer.Argument(..., help="A .ckpt file, a run directory or an sffn export folder."),
    split: Split = typer.Option(Split.valid, help="Which split to score."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key (e.g. data.corpus=...)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Exact loss and bits / perplexity over every token of a split."""
    from sffn_lab.config import Config, apply_overrides, from_dict, to_dict

    _check_exists(checkpoint)
    from_dict(Config, apply_overrides(to_dict(Config()), list(set_)))  # keys and types, before torch is imported
    from sffn_lab.training import evaluate

    result = evaluate(checkpoint, split.value, list(set_))
    if as_json:
        print(json.dumps(result))
        return
    unit = per(result["unit"])
    names = {"loss": f"loss (nats {unit})", "bits": f"bits {unit}", "ppl": f"perplexity {unit}",
             "bpb": "bits per byte of the text", "tokens": f"tokens scored ({result['unit']}s)"}
    table = Table(title=f"{result['corpus']} — {split.value}", show_header=False)
    for key, value in result.items():
        table.add_row(names.get(key, key), f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


@app.command()
def sample(
    checkpoint: Path = typer.Argument(..., help="A .ckpt file, a run directory or an sffn export folder."),
    prompt: str = typer.Option("", help="Text to continue."),
    tokens: int = typer.Option(200, help="Number of tokens to generate (at least 1)."),
    temperature: float = typer.Option(1.0, help="Sampling temperature, > 0; 0 is greedy decoding (always the "
                                      "most likely token, whatever --top-k and --seed)."),
    top_k: int | None = typer.Option(None, help="Sample from the k most likely tokens (1 to the vocabulary size)."),
    seed: int = typer.Option(0, help=f"Random seed (0 to {MAX_SEED})."),
) -> None:
    """Generate text from a trained model."""
    if tokens < 1:
        raise UserError(f"--tokens must be at least 1, got {tokens}.")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"--temperature must be 0 (greedy decoding) or a positive number, got {temperature}.")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be at least 1 (1: the most likely token), got {top_k}.")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED}, got {seed}.")
    _check_exists(checkpoint)
    from sffn_lab.training import sample as sample_text

    print(sample_text(checkpoint, prompt, tokens, temperature, top_k, seed))


@app.command()
def export(
    source: Path = typer.Argument(..., help="A .ckpt file or a run directory (its best, else last, checkpoint)."),
    out: Path = typer.Option(..., help="The folder to write (new or empty)."),
) -> None:
    """Write a trained model as a folder without pickles: model.safetensors, config.yaml, tokenizer.json and a
    README.md model card, which eval and sample accept."""
    from sffn_lab.export import export_model

    console.print(f"wrote {export_model(source, out)}", soft_wrap=True)


class XAxis(str, Enum):
    steps = "steps"
    tokens = "tokens"
    time = "time"
    flops = "flops"


class Launcher(str, Enum):
    local = "local"
    slurm = "slurm"


class Budget(str, Enum):
    final = "final"
    steps = "steps"
    tokens = "tokens"
    time = "time"
    flops = "flops"


@app.command()
def plot(
    runs: list[Path] = typer.Argument(..., help="Run directories to overlay."),
    x: XAxis = typer.Option(XAxis.steps, help="Horizontal axis."),
    output: Path = typer.Option(Path("curves.png"), "--output", "-o", help="PNG file to write."),
) -> None:
    """Plot validation curves (bits, or perplexity for word corpora) of one or more runs into a PNG."""
    from sffn_lab.analysis.curves import plot_runs, run_corpus

    corpora = {run: run_corpus(run) for run in runs}
    if len(set(corpora.values())) > 1:
        _print_warning("these runs trained on different corpora, so their losses are not comparable: "
                       + ", ".join(f"{run.name}: {corpus}" for run, corpus in corpora.items()))
    plot_runs(runs, output, x.value)
    console.print(f"wrote {output}")


@app.command()
def variants(
    d_model: int = typer.Option(512, help="Model width."),
    d_ff: int = typer.Option(2048, help="Width of the dense FFN the variants are matched to."),
    expert_size: int = typer.Option(128, help="G: cells per expert block."),
    top_k: int = typer.Option(4, help="K: blocks per token (Switch and HashLayer use 1)."),
    n_layers: int = typer.Option(12, help="Layers of the Transformer the backbones are matched to."),
    seq_len: int = typer.Option(512, help="Context length (sMLP token mixing and attention depend on it)."),
    vocab_size: int = typer.Option(256, help="Vocabulary size (256: a byte-level corpus)."),
    memory: bool = typer.Option(False, "--memory", help="Instead: memory and communication per device of every "
                                "run of the paper grids (or --grid), measured with the toolkit's own model."),
    grids: list[str] = typer.Option([], "--grid", help="With --memory: a grid file or shipped name (repeatable; "
                                    "default: every paper/ grid).", autocompletion=_complete_shipped),
    set_: list[str] = typer.Option([], "--set", "-s", help="With --memory: override a key in every run.",
                                   autocompletion=complete_override),
    markdown: Path | None = typer.Option(None, "--markdown", help="With --memory: also write the tables to this "
                                         "Markdown file."),
) -> None:
    """Every FFN variant, and every backbone, at equal total parameters: sizes, active parameters, FLOPs."""
    from sffn_lab.analysis.accounting import variants_table
    from sffn_lab.analysis.backbones import backbones_table

    if memory:
        _print_memory(list(grids), list(set_), markdown)
        return

    ffns = variants_table(d_model, d_ff, expert_size, top_k)
    _print_cost_table(f"FFN variants (one layer), parameter-equal to dense d_model={d_model} d_ff={d_ff}",
                      "kind", ffns)
    backbones = backbones_table(d_model, d_ff, n_layers, seq_len, vocab_size, expert_size)
    _print_cost_table(f"Backbones, parameter-equal to a {n_layers}-layer dense Transformer "
                      f"(seq_len={seq_len}, vocab={vocab_size}; MoE layers: top-1)", "backbone", backbones)


def _print_memory(grids: list[str], overrides: list[str], markdown: Path | None) -> None:
    """One table per grid: each run's memory and communication per device and step (``training_memory``)."""
    from sffn_lab.ablation import is_grid, load_grid, planned_vocab_size
    from sffn_lab.analysis.training_memory import training_memory
    from sffn_lab.config import load_config
    from sffn_lab.markdown import markdown_table

    columns = ("run", "params", "state GB", "activations GB", "fixed GB", "total GB", "tokens/device",
               "DP all-reduce GB", "EP all-to-all GB")
    sections = []
    for name in grids or [n for n in shipped_names() if n.startswith("paper/")]:
        path = resolve(Path(name))
        if not path.is_file():
            raise UserError(f"'{name}' is not a file nor a shipped experiment ({', '.join(shipped_names())}).")
        if is_grid(path):
            sweep = load_grid(path, overrides, seeds=[0])
            label, runs = sweep.name, [(run.name, run.config) for run in sweep.runs]
        else:
            config = load_config(path, overrides)
            label, runs = config.name, [(config.name, config)]
        first = runs[0][1]
        title = (f"{label}: per device and step, batch {first.data.batch_size} × {first.data.seq_len} over "
                 f"{first.train.devices * first.train.num_nodes} device(s), {first.train.precision}")
        table, rows = Table(title=title), []
        for column in columns:
            table.add_column(column, justify="left" if column == "run" else "right")
        for run_name, config in runs:
            m = training_memory(config, planned_vocab_size(config))
            row = [run_name, f"{m.params / 1e6:.1f}M", *(f"{b / 1e9:.2f}" for b in (
                m.state_bytes, m.activation_bytes, m.fixed_bytes, m.total_bytes)), f"{m.tokens:,}",
                f"{m.allreduce_bytes / 1e9:.2f}", f"{m.all_to_all_bytes / 1e9:.2f}" if m.all_to_all_bytes else "—"]
            table.add_row(*row)
            rows.append(row)
        console.print(table)
        sections.append("\n".join([f"**{title}**", "", *markdown_table(columns, rows)]))
    if markdown:
        command = "sffn variants --memory " + " ".join(f"--grid {g}" for g in grids)
        command += "".join(f" --set {o}" for o in overrides)
        markdown.write_text(f"<!-- written by: {command} -->\n\n" + "\n\n".join(sections) + "\n")
        console.print(f"wrote {markdown}")


def _print_cost_table(title: str, name: str, rows: list[dict]) -> None:
    table = Table(title=title)
    for column in (name, "sizes", "total params", "active params", "FLOPs/token", "FLOPs vs dense"):
        table.add_column(column, justify="left" if column in (name, "sizes") else "right")
    for row in rows:
        table.add_row(row[name], row["sizes"], f"{row['total_params']:,}", f"{row['active_params']:,}",
                      f"{row['flops_per_token']:,}", f"{row['flops_vs_dense']:.3f}")
    console.print(table)


@app.command()
def ablate(
    grid: Path = typer.Argument(..., help="Grid file, or the name of a shipped grid (cpu_variants, paper/avgk …).",
                                autocompletion=_complete_shipped),
    out: Path = typer.Option(Path("runs"), help="Parent directory of the sweep directory."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key in every run.",
                                   autocompletion=complete_override),
    seeds: str | None = typer.Option(None, help="Comma-separated seeds, replacing the grid's."),
    jobs: int = typer.Option(1, help="Runs trained in parallel processes."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (and with --launcher slurm, the job "
                                 "scripts) and stop."),
    launcher: Launcher = typer.Option(Launcher.local, help="local: train here; slurm: submit one sbatch job per "
                                      "unfinished run (each resumable) and return."),
    sbatch: list[str] = typer.Option([], "--sbatch", help="An SBATCH option for every job, e.g. "
                                     "--sbatch partition=gpu --sbatch time=12:00:00 (replaces a default)."),
    run: str | None = typer.Option(None, "--run", help="Train only this run of the grid: one seed's, e.g. dense-s0 "
                                   "(what each cluster job does), or every seed of a run, e.g. dense."),
) -> None:
    """Train a grid of matched runs over several seeds (resumable), then report mean ± std."""
    seed_list = [int(s) for s in seeds.split(",")] if seeds else None
    grid_path = resolve(grid)
    if not grid_path.is_file():
        raise UserError(f"Grid file '{grid}' does not exist, nor is it a shipped grid ({', '.join(shipped_names())}).")
    if launcher is Launcher.slurm and jobs != 1:
        raise UserError("--jobs applies to --launcher local; on SLURM every run is its own job.")
    from sffn_lab.ablation import ESTIMATE_METHOD, estimate_seconds, execute, load_grid, run_state, run_sweep

    sweep = load_grid(grid_path, list(set_), seed_list)
    sweep_dir = out / sweep.name
    if run is not None:
        chosen = [r for r in sweep.runs if run in (r.dir_name, r.name)]
        if not chosen:
            names = ", ".join(dict.fromkeys(r.name for r in sweep.runs))
            raise UserError(f"Grid '{sweep.name}' has no run '{run}'; its runs: {names} (one seed's: "
                            f"{sweep.runs[0].dir_name}, …).")
        if not dry_run:
            from sffn_lab.ablation import write_sweep_spec

            write_sweep_spec(sweep, sweep_dir)
            for planned in chosen:
                console.print(f"{planned.dir_name}: {execute(planned, sweep_dir)}")
        return
    estimate_seconds(sweep, sweep_dir)
    base = sweep.base_config or "the built-in defaults (the grid has no config:; see sffn config keys)"
    table = Table(title=f"Plan: {sweep.name} ({len(sweep.runs)} runs, matched: {sweep.match}, "
                        f"baseline: {sweep.baseline}) → {sweep_dir}\nevery run starts from {base}")
    for column in ("run", "variant", "seed", "total params", "active params", "FLOPs/token", "est. time", "state"):
        table.add_column(column, justify="left" if column in ("run", "variant", "state") else "right")
    states = {planned.dir_name: run_state(sweep_dir / planned.dir_name) for planned in sweep.runs}
    for planned in sweep.runs:
        table.add_row(planned.name, planned.variant, str(planned.seed), f"{planned.total_params:,}",
                      f"{planned.active_params:,}", f"{planned.flops_per_token:,}",
                      format_duration(planned.estimated_s), states[planned.dir_name])
    total = sum(planned.estimated_s for planned in sweep.runs)
    left = [planned.estimated_s for planned in sweep.runs if states[planned.dir_name] != "finished"]
    table.add_section()
    table.add_row("total", "", "", "", "", "", format_duration(total), "", style="bold")
    if len(left) < len(sweep.runs):
        table.add_row("left", "", "", "", "", "", format_duration(sum(left)), f"{len(left)} runs", style="bold")
    console.print(table)
    if launcher is Launcher.local and jobs > 1 and left:
        console.print(f"with --jobs {jobs}: at least {format_duration(max(sum(left) / jobs, max(left)))} of wall "
                      "time", soft_wrap=True)
    console.print(f"estimated times: {ESTIMATE_METHOD}", soft_wrap=True)
    if launcher is Launcher.slurm:
        _submit_to_slurm(sweep, sweep_dir, grid_path, out, list(set_), sbatch, dry_run)
        return
    if dry_run:
        return
    _warn_if_cpu_busy()
    run_sweep(sweep, sweep_dir, jobs, on_done=lambda planned, what: console.print(f"{planned.dir_name}: {what}"))
    _print_report(sweep_dir)


def _submit_to_slurm(sweep, sweep_dir: Path, grid: Path, out: Path, overrides: list[str], sbatch_options: list[str],
                     dry_run: bool) -> None:
    """Write a job script per unfinished run not already queued, print them (dry run) or sbatch them."""
    from sffn_lab import cluster
    from sffn_lab.ablation import run_state, write_sweep_spec

    queued = cluster.queued_jobs(sweep_dir)
    for name, job in queued.items():
        console.print(f"{name}: job {job} still queued or running, not submitted again")
    pending = [r for r in sweep.runs if run_state(sweep_dir / r.dir_name) != "finished" and r.dir_name not in queued]
    if not pending:
        console.print("Every run is finished or queued; nothing to submit.")
        return
    scripts = cluster.job_scripts(dataclasses.replace(sweep, runs=pending), sweep_dir, grid, out, overrides,
                                  sbatch_options)
    if dry_run:
        for path, text in scripts.values():
            console.rule(str(path))
            console.print(text, markup=False, highlight=False, soft_wrap=True)
        return
    write_sweep_spec(sweep, sweep_dir)
    submitted = cluster.submit(scripts, sweep_dir)
    for name, job in submitted.items():
        console.print(f"{name}: submitted as job {job}")
    console.print(f"When they finish: sffn report {sweep_dir}", soft_wrap=True)


@app.command()
def report(
    sweep_dirs: list[Path] = typer.Argument(..., help="Sweep directories written by sffn ablate (several: merged)."),
    out: Path | None = typer.Option(None, help="Directory for the merged report (default: the one sweep directory)."),
    baseline: str | None = typer.Option(None, help="Run the others are compared with (default: the grid's)."),
    budget: Budget = typer.Option(Budget.final, help="Compare final values, or values at the largest equal number "
                                  "of steps, tokens, seconds or training FLOPs every run reached."),
    scaling: bool = typer.Option(False, "--scaling", help="Also fit final loss against active parameters and "
                                 "training FLOPs per variant (a sweep over model sizes): scaling.md, scaling.png."),
) -> None:
    """Mean ± std over seeds of a sweep's runs, each against the baseline with a 95% interval and a verdict:
    a table, results.md, results.csv and curves.png (results_<budget>.* for an equal-budget view)."""
    _print_report(*sweep_dirs, out=out, baseline=baseline, budget=budget.value)
    if scaling:
        from sffn_lab.analysis.scaling import AXES, write_scaling_report

        out = out or sweep_dirs[0]
        fits = write_scaling_report(*sweep_dirs, out=out)
        for axis, by_variant in fits.items():
            for variant, law in by_variant.items():
                console.print(f"{variant} against {AXES[axis]}: L = {law.c:.4f} + {law.a:.4g}·x^(−{law.b:.3f} ± "
                              f"{law.b_err:.3f})", soft_wrap=True)
        console.print(f"wrote {out}/scaling.md and scaling.png", soft_wrap=True)


@app.command()
def bench(
    out: Path = typer.Option(Path("bench"), help="Directory for bench.csv, environment.json and PNG plots."),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes: a seconds-long run of every section."),
    repeats: int | None = typer.Option(None, help="Timed repetitions per variant (default: 5, quick: 2)."),
    gpu_check: bool = typer.Option(
        False, "--gpu-check", help="The GPU acceptance check instead: kernels vs float64, bf16 training of "
        "every kind, speed vs cuBLAS dense. One PASS/FAIL line each; exit 1 on a failure."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="With --gpu-check: print its parts, Triton compiles, "
                                 "autotune timings and estimated time, and run nothing (no GPU needed)."),
    full: bool = typer.Option(False, "--full", help="With --gpu-check: fp32 speed rows too (bf16 only by default)."),
    kernel_resources: bool = typer.Option(
        False, "--kernel-resources", help="Instead: compile every config of every Triton launch of a layer's "
        "training step for a Hopper GPU (sm_90a; no GPU needed) with the real call's specialisation, and list the "
        "main loop's load widths, pipeline depth, registers, spills, shared memory; writes OUT/kernel_resources.md. "
        "With --quick: bf16 and fp16 of the 16-byte-aligned layer only."
    ),
) -> None:
    """Speed and activation memory of σ-MoE vs dense and vs other MoE implementations, on 2 threads."""
    if kernel_resources:
        _print_kernel_resources(out, quick)
        return
    if gpu_check:
        _gpu_check(out, dry_run, full)
        return
    if dry_run or full:
        raise UserError("--dry-run and --full belong to --gpu-check.")
    if repeats is not None and repeats < 1:
        raise UserError("--repeats must be at least 1.")
    from sffn_lab.analysis.saved_memory import METHOD
    from sffn_lab.bench import run_bench
    from sffn_lab.bench.targets import check_targets

    _warn_if_cpu_busy()
    rows, env = run_bench(out, DEFAULT_CONFIG, quick, repeats, on_section=lambda title: console.rule(title))
    console.print(", ".join(f"{k}: {v}" for k, v in env.items()), soft_wrap=True)
    for section in dict.fromkeys(r.section for r in rows):
        table = Table(title=section)
        for column in ("case", "variant", "metric", "value", "ratio", "relative to"):
            table.add_column(column, justify="right" if column in ("value", "ratio") else "left")
        for r in (r for r in rows if r.section == section):
            value = f"{r.value:.4g}" if r.value is not None else r.status
            table.add_row(r.case, r.variant, r.metric, value, f"{r.ratio:.3f}" if r.ratio is not None else "",
                          r.reference)
        console.print(table)
    table = Table(title="Targets: the ratios the sparse path aims at")
    for column in ("ratio measured", "value", "target", "met"):
        table.add_column(column)
    for c in check_targets(rows):
        met = {True: "yes", False: "[red]no[/]", None: "not measured"}[c.met]
        table.add_row(c.what, f"{c.measured:.3f}" if c.measured is not None else "", c.target, met)
    console.print(table)
    console.print(f"memory: {METHOD}", soft_wrap=True)
    console.print(f"wrote {out / 'bench.csv'}, environment.json, scaling.png and ratios.png", soft_wrap=True)


def _gpu_check(out: Path, dry_run: bool, full: bool) -> None:
    from sffn_lab.bench.gpu_check import describe_plan, plan, run_gpu_check

    def say(line: str) -> None:
        console.print(line, soft_wrap=True, highlight=False, markup=False)

    if dry_run:
        for line in describe_plan(plan("cuda", full=full)):
            say(line)
        return
    if not run_gpu_check(say, full=full, out=out):
        raise typer.Exit(1)


def _print_kernel_resources(out: Path, quick: bool) -> None:
    from sffn_lab.bench.kernel_resources import (
        COLUMNS,
        DTYPES,
        HOPPER_SHARED_BYTES,
        PAPER_LAYER,
        UNALIGNED_LAYER,
        cells,
        markdown,
        resources,
    )
    from sffn_lab.kernels import triton_available, triton_import_error

    if not triton_available():
        raise UserError(f"the Triton kernels cannot be compiled here: {triton_import_error()}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise UserError("--kernel-resources compiles the kernels for a GPU: run it without TRITON_INTERPRET=1.")
    layers = (PAPER_LAYER,) if quick else (PAPER_LAYER, UNALIGNED_LAYER)
    dtypes = ("bf16", "fp16") if quick else tuple(DTYPES)
    rows = []
    table = Table(title="Each launch of a layer's training step, every config, compiled for sm_90a")
    for column in COLUMNS:
        table.add_column(column)
    with console.status("compiling every config…"):
        for r in resources(dtypes, layers):
            rows.append(r)
            scalar = r.tile_bytes > 0 and not r.tiles_vectorised()
            table.add_row(*cells(r), style="red" if scalar or r.spill_bytes or not r.fits() else None)
    console.print(table)
    for layer in layers:
        for dtype in dtypes:
            mine = [r for r in rows if r.layer == layer.name and r.dtype == dtype]
            scalar = sum(r.tile_bytes > 0 and not r.tiles_vectorised() for r in mine)
            spilling = sum(r.spill_bytes > 0 for r in mine)
            console.print(f"{layer.name} {dtype}: {len(mine)} compiled, {scalar} with tile loads narrower than "
                          f"16 bytes, {spilling} spilling, {sum(not r.fits() for r in mine)} over the shared memory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_resources.md").write_text(markdown(rows))
    console.print(f"shared memory limit per program {HOPPER_SHARED_BYTES / 1024:.0f} KB; wrote "
                  f"{out / 'kernel_resources.md'}", soft_wrap=True)


def _print_report(*sweep_dirs: Path, out: Path | None = None, baseline: str | None = None,
                  budget: str = "final") -> None:
    from sffn_lab.analysis.report import COLUMNS, row_cells, write_report

    rows = write_report(*sweep_dirs, out=out, baseline=baseline, budget=budget)
    out = out or sweep_dirs[0]
    table = Table(title=f"Results: {', '.join(map(str, sweep_dirs))}")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in rows:
        table.add_row(*row_cells(row), style="bold" if row.best else None)
    console.print(table)
    suffix = "" if budget == "final" else f"_{budget}"
    console.print(f"wrote {out}/results{suffix}.md, results{suffix}.csv and curves{suffix}.png", soft_wrap=True)


data_app = typer.Typer(no_args_is_help=True, help="The named corpora: fill the download cache ahead of time.")
app.add_typer(data_app, name="data")


@data_app.command("download")
def data_download(
    names: list[str] | None = typer.Argument(None, help="Corpora to download (tinyshakespeare, enwik8, …).",
                                             autocompletion=_complete_corpus, show_default=False),
    all_: bool = typer.Option(False, "--all", help="Every named corpus."),
    cache_dir: Path | None = typer.Option(None, help="The cache to fill (data.cache_dir); default: $SFFN_DATA, "
                                          "else ~/.cache/sffn-lab."),
) -> None:
    """Download and verify corpora into the cache training reads, so that an offline node finds them there."""
    from sffn_lab.config import DataConfig
    from sffn_lab.data.corpora import REGISTRY, cache_root, download_corpus, downloadable

    if bool(names) == all_:
        raise UserError("Name the corpora to download, or give --all (not both).")
    names = list(REGISTRY) if all_ else names
    for name in names:
        downloadable(name)  # every name checked before the first download
    cache = cache_root(DataConfig(cache_dir=str(cache_dir) if cache_dir else ""))
    failed = []
    for name in names:
        try:
            path, was_there = download_corpus(name, cache)
        except UserError as error:
            failed.append(f"{name}: {error}")
            continue
        what = "already in the cache, verified" if was_there else "downloaded and verified"
        console.print(f"{name}: {what}: {path} ({path.stat().st_size:,} bytes)", soft_wrap=True, highlight=False)
    if failed:
        raise UserError(" ".join(failed))
    if cache_dir is not None:
        console.print(f"Training reads them with --set data.cache_dir={cache} (or SFFN_DATA={cache}).",
                      soft_wrap=True, highlight=False)


config_app = typer.Typer(no_args_is_help=True, help="Show the resolved configuration, or every key.")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML experiment file or a shipped name.",
                                       autocompletion=_complete_shipped),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: --set model.d_model=256.",
                                   autocompletion=complete_override),
) -> None:
    """Print the configuration `sffn train` would run with these options, as YAML."""
    import yaml

    from sffn_lab.config import load_config, to_dict

    print(yaml.safe_dump(to_dict(load_config(_experiment_file(config), list(set_))), sort_keys=False), end="")


@config_app.command("keys")
def config_keys() -> None:
    """Every config key with its type, built-in default, value in the default experiment and what it sets."""
    from functools import reduce

    from sffn_lab.config import load_config, to_dict
    from sffn_lab.config_help import key_help

    experiment = to_dict(load_config(DEFAULT_CONFIG))
    table = Table(title="Config keys (set with --set key=value)",
                  caption=f"built-in: the value a config file (or a grid without config:) leaves a key at. sffn train: "
                  f"the value sffn train uses without --config ({DEFAULT_CONFIG.name}; bold where it differs).")
    for column in ("key", "type", "built-in", "sffn train", "what it sets"):
        table.add_column(column)
    for row in key_help():
        value = reduce(dict.__getitem__, row.key.split("."), experiment)
        shown = escape(repr(value))
        table.add_row(row.key, row.type, escape(repr(row.default)), f"[bold]{shown}[/bold]" if value != row.default
                      else shown, escape(row.help))
    console.print(table)


def main() -> None:
    try:
        from sffn_lab.variants.plugins import from_environment, load

        load(",".join(from_environment()))  # $SFFN_PLUGINS: their variants for every command
        app()
    except UserError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(exc.exit_code)
