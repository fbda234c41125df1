"""Trained weights others can load: ``sffn export`` writes a folder without pickles, which ``sffn eval`` and
``sffn sample`` read like a checkpoint.

An export folder holds

- ``model.safetensors``: the backbone's state dict (``safetensors.torch.save_model``: tied weights stored once),
  with the corpus description (``CorpusInfo`` as JSON) in its metadata;
- ``config.yaml``: the resolved config the model is built from;
- ``tokenizer.json``: the corpus' tokenizer (``sffn_lab.data.tokenizers.tokenizer_to_dict``);
- ``README.md``: a model card (variant, sizes, corpus, tokenizer, validation metrics, how it was trained).

Reading it runs no code: YAML, JSON and safetensors are data formats.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import safetensors
import safetensors.torch

from sffn_lab.analysis.model_cost import count_model
from sffn_lab.checkpoints import checkpoint_file, load_checkpoint, module_from_checkpoint, read_checkpoint
from sffn_lab.config import load_config, save_config, to_dict
from sffn_lab.data.datamodule import LMDataModule
from sffn_lab.data.tokenizers import Tokenizer, tokenizer_from_dict, tokenizer_to_dict
from sffn_lab.errors import UserError
from sffn_lab.lm_module import LanguageModelModule
from sffn_lab.markdown import markdown_table
from sffn_lab.run_dir import CONFIG_FILE, TOKENIZER_FILE, RunDir
from sffn_lab.variants import variant

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
CORPUS_KEY = "sffn_lab.corpus"  # safetensors metadata: the CorpusInfo the model was built for, as JSON


def is_export(path: Path) -> bool:
    return (Path(path) / WEIGHTS_FILE).is_file()


def load_trained(path: Path) -> LanguageModelModule:
    """A trained module from an export folder, a checkpoint file or a run directory."""
    return read_export(path) if is_export(path) else load_checkpoint(path)


def saved_tokenizer(path: Path, module: LanguageModelModule) -> Tokenizer:
    """The tokenizer of the model ``path`` holds: ``tokenizer.json`` of the export folder or run directory (a
    checkpoint file: its run's), else (runs older than that file) rebuilt from the corpus."""
    saved = (RunDir(path) if Path(path).is_dir() else RunDir.of_checkpoint(path)).tokenizer  # an export: the same name
    if saved.is_file():
        return tokenizer_from_dict(json.loads(saved.read_text()))
    return LMDataModule(module.config.data, seed=module.config.train.seed).corpus.tokenizer


def read_export(folder: Path) -> LanguageModelModule:
    """The module an export folder describes, its weights loaded from ``model.safetensors``."""
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    config = load_config(folder / CONFIG_FILE)
    try:
        with safetensors.safe_open(weights, framework="pt") as f:
            corpus = json.loads((f.metadata() or {})[CORPUS_KEY])
        module = LanguageModelModule(config=to_dict(config), corpus=corpus)
        safetensors.torch.load_model(module.model, weights, strict=True, device="cpu")
    except (safetensors.SafetensorError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise UserError(f"'{weights}' is not an sffn-lab export ({type(exc).__name__}: {exc}).") from None
    except RuntimeError as exc:  # missing, unexpected or mis-shaped tensors
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"'{weights}' does not match the model {folder / CONFIG_FILE} describes: {first}") from None
    return module


def export_model(source: Path, out: Path) -> Path:
    """Write the export folder ``out`` for a checkpoint file or a run directory (its best, else last,
    checkpoint); ``out`` must not exist or be empty. Written into a temporary folder renamed into place."""
    source, out = Path(source), Path(out)
    ckpt = checkpoint_file(source)
    checkpoint = read_checkpoint(ckpt)
    module = module_from_checkpoint(checkpoint, ckpt)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"'{out}' already exists and is not an empty folder; choose a new --out (nothing was written).")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        safetensors.torch.save_model(module.model, str(tmp / WEIGHTS_FILE),
                                     metadata={CORPUS_KEY: json.dumps(module.corpus.__dict__)})
        save_config(module.config, tmp / CONFIG_FILE)
        tokenizer = tokenizer_to_dict(saved_tokenizer(ckpt, module))
        (tmp / TOKENIZER_FILE).write_text(json.dumps(tokenizer))
        (tmp / CARD_FILE).write_text(model_card(module, tokenizer["kind"], ckpt, checkpoint["global_step"]))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"Could not write the export folder '{out}': {exc.strerror or exc}.") from None
    return out


def model_card(module: LanguageModelModule, tokenizer_kind: str, ckpt: Path, step: int) -> str:
    """README.md of an export: what the model is, what it was trained on, how well it did and how it was made;
    ``step`` is the training step of the exported weights."""
    config, corpus = module.config, module.corpus
    m, f = config.model, config.model.ffn
    cost = count_model(m, corpus.vocab_size, config.data.seq_len)
    run = RunDir.of_checkpoint(ckpt)
    summary = run.read_summary()
    ffn = f"{f.kind}: {variant(f.kind).describe(f)}"
    rows = [
        ("variant", ffn),
        ("backbone", f"{m.backbone}: d_model {m.d_model}, n_layers {m.n_layers}, n_heads {m.n_heads}, "
                     f"seq_len {config.data.seq_len}"),
        ("parameters", f"{cost.total_params:,} total, {cost.active_params:,} active per token; "
                       f"{cost.flops_per_token:,} forward FLOPs per token"),
        ("corpus", f"{config.data.corpus} ({corpus.unit}s, vocabulary {corpus.vocab_size})"),
        ("tokenizer", tokenizer_kind),
        ("weights", f"step {step} ({ckpt.name} of {run.path.name})"),
    ]
    return "\n".join([
        f"# {config.name}", "", "A language model trained with sffn-lab.", "",
        *markdown_table(("", ""), rows), "",
        "## Final validation", "", validation_line(summary, step), "",
        "## How it was trained", "",
        f"- command: `{summary['command']}`" if summary.get("command") else "- command: not recorded",
        "- the same run again: `sffn train --config config.yaml` (the resolved config in this folder)", "",
        "## Use", "", "```bash", "sffn eval THIS_FOLDER", "sffn sample THIS_FOLDER --prompt TEXT --tokens 200", "```",
        "", f"`{WEIGHTS_FILE}` holds the weights (safetensors), `{CONFIG_FILE}` the config, `{TOKENIZER_FILE}` the "
        "tokenizer.", "",
    ])


def validation_line(summary: dict, step: int) -> str:
    """The run's final validation metrics (its summary.json), and whether they are those of the weights of ``step``."""
    if summary.get("val_loss") is None:
        return "Not recorded (the run has not finished): `sffn eval THIS_FOLDER` measures it."
    names = {"val_loss": "loss {:.4f} nats/token", "val_bits": "{:.4f} bits/" + summary.get("unit", "token"),
             "val_ppl": "perplexity {:.2f}", "val_bpb": "{:.4f} bits per byte of text"}
    values = ", ".join(text.format(summary[key]) for key, text in names.items() if summary.get(key) is not None)
    scored = f"; tokens scored: {summary['scored']}" if summary.get("scored") else ""
    same = "these weights" if summary["step"] == step else f"the run's last model, not these weights of step {step}"
    return f"At step {summary['step']} ({same}): {values}{scored}."
