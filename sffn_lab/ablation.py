"""Ablation sweeps: a grid file → matched run configs → one run directory each, resumable.

A grid file (YAML) holds::

    name: my_sweep
    config: default.yaml                 # base experiment: a path (absolute or relative to the grid file) or
                                         # a shipped name; without it, the built-in defaults
    set: ["train.max_steps=300"]         # overrides applied to every run
    match: param_equal                   # param_equal | compute_equal | none
    baseline: dense                      # the run every other run is matched against
    seeds: [0, 1, 2]
    runs:                                # explicit runs ...
      - {name: dense, set: ["model.ffn.kind=dense"]}
      - {name: sigma_moe, set: ["model.ffn.kind=sigma_moe", "model.ffn.expert_size=64"]}
    grid:                                # ... plus one run per combination, named "top_k=1" etc.
      model.ffn.kind: [sigma_moe]
      model.ffn.top_k: [1, 2, 4]
    lrs: [1.0e-3, 2.0e-3, 4.0e-3]        # optional: every run at each rate ("dense@lr=0.001" …), each
                                         # scored on the test split; the report picks each variant's best

Under ``param_equal`` the sizes a run does not set are derived from the baseline's FFN (N_E·G =
d_ff, PKM's n_keys and key_dim), then every run's total parameters must be within 1% of the
baseline's; under ``compute_equal`` its FLOPs per token within 2%. A grid that breaks its rule is
refused before anything trains.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sffn_lab.analysis.accounting import compute_equal, param_equal
from sffn_lab.analysis.model_cost import count_model
from sffn_lab.analysis.report import LR_MARK, SWEEP_FILE, TEST_FILE
from sffn_lab.config import Config, read_yaml
from sffn_lab.errors import UserError
from sffn_lab.experiments import resolve, shipped_names
from sffn_lab.kernels.precision import fp32_matmul_precision

# Vocabulary sizes of the word-level corpora as published (Merity et al. 2016), used to plan a grid
# before the corpus is downloaded.
PUBLISHED_WORD_VOCAB = {"wikitext2": 33_278, "wikitext103": 267_735}
GPT2_VOCAB_SIZE = 50_257  # the published GPT-2 BPE, <|endoftext|> included
RULES = {"param_equal": ("total_params", 0.01), "compute_equal": ("flops_per_token", 0.02), "none": (None, None)}


@dataclass
class PlannedRun:
    name: str  # run name without the seed
    seed: int
    config: Config
    total_params: int
    active_params: int
    flops_per_token: int
    estimated_s: float = 0.0
    evaluate_test: bool = False  # learning-rate search: also score the best checkpoint on the test split

    @property
    def dir_name(self) -> str:
        return f"{self.name}-s{self.seed}"

    @property
    def variant(self) -> str:
        """The FFN kind; for the sMLP backbone also its sMoE routing, or ``gmlp`` without sparse blocks."""
        m = self.config.model
        if m.backbone != "smlp":
            return m.ffn.kind
        return f"smlp {m.smlp.routing} + {m.ffn.kind}" if m.smlp.n_sparse_blocks else "gmlp"


@dataclass
class Sweep:
    name: str
    match: str
    baseline: str
    base_config: Path | None = None  # the grid's ``config:`` resolved; None: the built-in defaults
    runs: list[PlannedRun] = field(default_factory=list)


def is_grid(path: Path) -> bool:
    """Whether a YAML file is a grid (it lists runs or a grid) rather than one experiment."""
    return bool({"runs", "grid"} & set(read_yaml(path)))


def load_grid(path: Path, extra_overrides: list[str] | None = None, seeds: list[int] | None = None) -> Sweep:
    """Read a grid file and plan its runs (sizes derived and checked under the matching rule)."""
    from sffn_lab.config import load_config, validate

    path = Path(path)
    spec = read_yaml(path, "Grid file")
    if not {"runs", "grid"} & set(spec) and {"model", "data", "train", "eval"} & set(spec):
        raise UserError(f"'{path}' is an experiment, not a grid: train it with  sffn train -c {path}")
    allowed = {"name", "config", "set", "match", "baseline", "seeds", "runs", "grid", "lrs"}
    unknown = set(spec) - allowed
    if unknown:
        raise UserError(f"Grid file '{path}' has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}.")
    match = spec.get("match", "param_equal")
    if match not in RULES:
        raise UserError(f"Grid 'match' must be one of {list(RULES)}, got '{match}'.")
    base_path = _base_config(path, spec.get("config"))
    common = list(spec.get("set", [])) + list(extra_overrides or [])
    variants = _variants(spec)
    if not variants:
        raise UserError(f"Grid file '{path}' defines no runs (give 'runs' and/or 'grid').")
    baseline = spec.get("baseline", variants[0][0])
    if baseline not in dict(variants):
        raise UserError(f"Grid baseline '{baseline}' is not one of the runs: {[n for n, _ in variants]}.")
    lrs = [float(lr) for lr in spec.get("lrs", []) or []]
    if lrs:  # every run at every learning rate; the report compares each variant at its best
        variants = [(with_lr(name, lr), [*overrides, f"train.lr={lr}"]) for name, overrides in variants for lr in lrs]
        baseline = with_lr(baseline, lrs[0])
    # Sizes a run leaves open are derived before the cross-field checks (a run may set K above the default N_E).
    configs = {name: load_config(base_path, common + overrides, check=False) for name, overrides in variants}
    validate(configs[baseline])
    configs = {name: _derive_sizes(cfg, configs[baseline], match, overrides)
               for (name, overrides), cfg in zip(variants, configs.values(), strict=True)}
    for name, cfg in configs.items():
        try:
            validate(cfg)
        except UserError as error:
            raise UserError(f"Grid run '{name}': {error}") from None
    sweep = Sweep(spec.get("name", path.stem), match, baseline, base_path)
    seed_list = seeds or spec.get("seeds", [0])
    for name, cfg in configs.items():
        for seed in seed_list:
            config = dataclasses.replace(cfg, name=name, train=dataclasses.replace(cfg.train, seed=int(seed)))
            cost = count_model(config.model, planned_vocab_size(config), config.data.seq_len)
            sweep.runs.append(PlannedRun(name, int(seed), config, cost.total_params, cost.active_params,
                                         cost.flops_per_token, evaluate_test=bool(lrs)))
    check_matching(sweep)
    return sweep


def _base_config(grid: Path, name: str | None) -> Path | None:
    """The experiment a grid's ``config:`` names, resolved as ``sffn train -c`` resolves it but relative to
    the grid file: a path (absolute, or relative to the grid's folder), else a shipped name. None: no
    ``config:``, the runs start from the built-in defaults (``sffn config keys``, column "built-in")."""
    if name is None:
        return None
    base = resolve(Path(str(name)), relative_to=grid.parent)
    if not base.is_file():
        raise UserError(f"Grid file '{grid}': its config '{name}' is neither a file (looked for '{base}') nor a "
                        f"shipped experiment ({', '.join(n for n in shipped_names() if not n.startswith('paper/'))}, "
                        "paper/…).")
    return base


def with_lr(name: str, lr: float) -> str:
    """The run name of ``name`` trained at learning rate ``lr`` (see ``analysis.report.LR_MARK``)."""
    return f"{name}{LR_MARK}{lr:g}"


def _variants(spec: dict[str, Any]) -> list[tuple[str, list[str]]]:
    runs = []
    for run in spec.get("runs", []) or []:
        if not isinstance(run, dict) or "name" not in run:
            raise UserError(f"Each grid run needs a 'name' and a 'set' list, got {run!r}.")
        runs.append((str(run["name"]), [str(s) for s in run.get("set", [])]))
    grid = spec.get("grid") or {}
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)) if keys else []:
        label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values, strict=True))
        runs.append((label, [f"{k}={v}" for k, v in zip(keys, values, strict=True)]))
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):
        raise UserError(f"Grid run names must be unique, got {names}.")
    return runs


def _derive_sizes(cfg: Config, baseline: Config, match: str, overrides: list[str]) -> Config:
    """Fill in the FFN sizes a run leaves open so that it matches the baseline under ``match``.

    param_equal derives N_E from G (or G from N_E when only N_E is given) and PKM's n_keys and
    key_dim; compute_equal derives G (PKM: the number of heads). Everything else is the run's own.
    """
    ffn = cfg.model.ffn
    if match == "none" or ffn.kind == baseline.model.ffn.kind:
        return cfg
    given = {o.split("=", 1)[0].strip() for o in overrides}
    options = {f.name: getattr(ffn, f.name) for f in dataclasses.fields(ffn) if f.name not in ("kind", "d_ff")}
    if match == "param_equal":
        options.pop("expert_size" if "model.ffn.n_experts" in given and "model.ffn.expert_size" not in given
                    else "n_experts")
    derive = param_equal if match == "param_equal" else compute_equal
    derived = derive(baseline.model.ffn, ffn.kind, cfg.model.d_model, **options)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ffn=derived))


def planned_vocab_size(config: Config) -> int:
    """Vocabulary size without loading the whole corpus where it is known from the config."""
    if config.data.corpus == "synthetic":
        return config.data.synthetic.vocab_size
    from sffn_lab.config import parse_tokenizer
    from sffn_lab.data.corpora import REGISTRY, cache_root, load_corpus

    kind, size = parse_tokenizer(config.data.tokenizer)
    if kind in ("sentencepiece", "bpe"):  # trained to this size (a byte-level BPE may stop short of it)
        return size
    if kind == "gpt2":
        return GPT2_VOCAB_SIZE
    spec = REGISTRY.get(config.data.corpus)
    unit = kind or (spec.unit if spec else "byte")
    if unit == "byte":
        return 256
    if spec is not None and spec.unit == "word" and not (cache_root(config.data) / spec.name / spec.remote.filename
                                                         ).is_file():
        return PUBLISHED_WORD_VOCAB[spec.name]  # plan without downloading the corpus
    return load_corpus(config.data).vocab_size


def check_matching(sweep: Sweep) -> None:
    metric, tolerance = RULES[sweep.match]
    if metric is None:
        return
    reference = next(r for r in sweep.runs if r.name == sweep.baseline)
    target = getattr(reference, metric)
    off = [(r.name, getattr(r, metric)) for r in sweep.runs if abs(getattr(r, metric) / target - 1) > tolerance]
    if off:
        listing = ", ".join(f"{name}: {value:,}" for name, value in dict(off).items())
        raise UserError(
            f"This grid breaks its matching rule '{sweep.match}': the baseline '{sweep.baseline}' has "
            f"{target:,} {metric.replace('_', ' ')}, but {listing} (more than {tolerance:.0%} off). Change those "
            "runs' sizes, or set 'match: none' to compare them unmatched."
        )


ESTIMATE_METHOD = (
    "a finished run: the time it took; a run with finished seeds: their median time per trained token (validation "
    "and start-up included), scaled to its tokens; else measured here: the fastest of 3 training steps (forward, "
    "backward, AdamW) of each distinct model, on up to 16 windows and at most 20 GFLOP a step (a model too large "
    "for that: the cheapest model's time scaled by FLOPs per token), scaled to the run's steps and batch; "
    "validation at 1/3 of a training token's time over the validation tokens of every validation; 3 s of start-up "
    "per run; data loading not counted"
)
CHEAP_STEP_FLOPS = 2e10  # a step of this size takes about a second on a laptop core
MEASURED_WINDOWS = 16  # at most this many batch rows per measured step (small batches run below the real rate)


def measured_windows(config: Config, flops_per_token: int) -> int:
    """Batch rows of a measured step: the run's batch, capped by MEASURED_WINDOWS and CHEAP_STEP_FLOPS (≥ 1)."""
    affordable = int(CHEAP_STEP_FLOPS // (3 * flops_per_token * config.data.seq_len))
    return max(1, min(config.data.batch_size, MEASURED_WINDOWS, affordable))


def estimate_seconds(sweep: Sweep, sweep_dir: Path | None = None) -> None:
    """Set each run's ``estimated_s``: from the runs of ``sweep_dir`` that finished, else from step times measured
    on this machine (see ESTIMATE_METHOD)."""

    def model_key(run: PlannedRun) -> str:  # runs that differ only in seed or steps time alike
        c = run.config
        return repr((c.model, c.data.seq_len, c.data.batch_size, c.train.precision, c.train.matmul_precision))

    took, per_token_finished = {}, {}  # dir name → seconds; model key → seconds per trained token of each
    for run in sweep.runs:
        summary = finished_run_timing(sweep_dir / run.dir_name) if sweep_dir is not None else None
        if summary:
            took[run.dir_name] = summary["wall_time_s"]
            per_token_finished.setdefault(model_key(run), []).append(summary["wall_time_s"] / summary["tokens_seen"])
    models = {}
    for run in sweep.runs:
        models.setdefault(model_key(run), run)

    def affordable(run: PlannedRun) -> bool:
        return 3 * run.flops_per_token * run.config.data.seq_len <= CHEAP_STEP_FLOPS  # one window fits

    unmeasured = {key: run for key, run in models.items() if key not in per_token_finished}
    per_token = {}
    if unmeasured:
        cheapest = min(unmeasured.values(), key=lambda run: run.flops_per_token * run.config.data.seq_len)
        cheapest_s = measured_seconds_per_token(cheapest.config, cheapest.flops_per_token)
        for key, run in unmeasured.items():
            if run is cheapest:
                per_token[key] = cheapest_s
            elif affordable(run):
                per_token[key] = measured_seconds_per_token(run.config, run.flops_per_token)
            else:
                per_token[key] = cheapest_s * run.flops_per_token / cheapest.flops_per_token
    for run in sweep.runs:
        c = run.config
        train_tokens = c.train.max_steps * c.data.batch_size * c.data.seq_len
        key = model_key(run)
        if run.dir_name in took:
            run.estimated_s = took[run.dir_name]
        elif key in per_token_finished:
            run.estimated_s = statistics.median(per_token_finished[key]) * train_tokens
        else:
            validations = c.train.max_steps // c.train.val_every + 1
            run.estimated_s = per_token[key] * (train_tokens + validations * _validation_tokens(c) / 3) + 3.0


def finished_run_timing(run_dir: Path) -> dict | None:
    """The summary of a finished run that says how long it took for how many tokens (``wall_time_s``,
    ``tokens_seen``), else None."""
    from sffn_lab.run_dir import RunDir

    run = RunDir(run_dir)
    if not run.finished():
        return None
    summary = run.read_summary()
    return summary if summary.get("wall_time_s") and summary.get("tokens_seen") else None


def measured_seconds_per_token(config: Config, flops_per_token: int, steps: int = 3) -> float:
    """Seconds per trained token of one optimizer step of ``config``'s model on random tokens (after a warm-up)."""
    from sffn_lab.models import build_model
    from sffn_lab.models.plain_step import plain_training_step

    device = "cuda" if torch.cuda.is_available() and config.train.accelerator != "cpu" else "cpu"
    torch.manual_seed(0)
    vocab = planned_vocab_size(config)
    model = build_model(config.model, vocab, config.data.seq_len).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    windows = measured_windows(config, flops_per_token)
    tokens = torch.randint(0, vocab, (windows, config.data.seq_len + 1), device=device)
    dtype = torch.bfloat16 if "bf16" in config.train.precision else None

    times = []
    with fp32_matmul_precision(config.train.matmul_precision):
        plain_training_step(model, optimizer, tokens, dtype)  # warm-up
        for _ in range(steps):
            start = time.perf_counter()
            plain_training_step(model, optimizer, tokens, dtype).item()  # .item() waits for the device
            times.append(time.perf_counter() - start)
    return min(times) / tokens[:, 1:].numel()  # the fastest step: the least disturbed by other work


def _validation_tokens(config: Config) -> int:
    """Tokens of one validation: val_batches windows, else the whole split (the synthetic corpus' size or 5%
    of a local file; 0 for a named corpus not yet downloaded)."""
    d = config.data
    if config.train.val_batches:
        return config.train.val_batches * d.eval_batch_size * d.seq_len
    if d.corpus == "synthetic":
        return d.synthetic.valid_tokens
    path = Path(d.corpus)
    return path.stat().st_size // 20 if path.is_file() else 0


def run_state(run_dir: Path) -> str:
    """'finished', 'resumable' (a checkpoint to continue from) or 'new'."""
    from sffn_lab.run_dir import RunDir

    run = RunDir(run_dir)
    if not run_dir.exists():
        return "new"
    if run.finished():
        return "finished"
    if run.last_checkpoint.is_file():
        return "resumable"
    return "new"


def execute(run: PlannedRun, sweep_dir: Path, threads: int | None = None) -> str:
    """Train one planned run (new, or resumed from its checkpoint); returns what was done."""
    from sffn_lab import training

    if threads:
        torch.set_num_threads(threads)
    run_dir = sweep_dir / run.dir_name
    state = run_state(run_dir)
    if state == "finished":
        what = "skipped"
    elif state == "resumable":
        training.train(run.config, progress=False, resume_dir=run_dir)
        what = "resumed"
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # started but never checkpointed: nothing worth keeping
        training.train(run.config, progress=False, run_dir=run_dir)
        what = "trained"
    if run.evaluate_test and not (run_dir / TEST_FILE).is_file():
        from sffn_lab.run_dir import RunDir

        best = RunDir(run_dir).read_summary()["best_checkpoint"]
        (run_dir / TEST_FILE).write_text(json.dumps(training.evaluate(Path(best), "test"), indent=1) + "\n")
        what += ", scored on test"
    return what


def claim_gpu(gpu_ids) -> None:
    """Worker initializer: make one GPU from the queue the only one this process sees."""
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_ids.get())


def write_sweep_spec(sweep: Sweep, sweep_dir: Path) -> None:
    """The sweep's name, baseline and matching rule, for ``sffn report``."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    spec = {"name": sweep.name, "baseline": sweep.baseline, "match": sweep.match}
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(spec, indent=1) + "\n")


def run_sweep(sweep: Sweep, sweep_dir: Path, jobs: int = 1, on_done=None) -> dict[str, str]:
    """Execute every run of the sweep (``jobs`` at a time); returns run dir name → what was done."""
    write_sweep_spec(sweep, sweep_dir)
    outcome = {}
    if jobs <= 1:
        for run in sweep.runs:
            outcome[run.dir_name] = execute(run, sweep_dir)
            if on_done:
                on_done(run, outcome[run.dir_name])
        return outcome
    threads = max(1, (os.cpu_count() or 1) // jobs)
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    gpu_ids = None
    if torch.cuda.is_available() and torch.cuda.device_count() >= jobs:  # each worker process gets its own GPU
        gpu_ids = context.Queue()
        for gpu in range(jobs):
            gpu_ids.put(gpu)
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=claim_gpu if gpu_ids else None,
                             initargs=(gpu_ids,) if gpu_ids else ()) as pool:
        futures = {run.dir_name: (run, pool.submit(execute, run, sweep_dir, threads)) for run in sweep.runs}
        for name, (run, future) in futures.items():
            outcome[name] = future.result()
            if on_done:
                on_done(run, outcome[name])
    return outcome
