"""The LightningModule that trains and evaluates any backbone with any FFN variant.

Training minimises the mean next-token cross-entropy plus the FFN layers' auxiliary losses.
Evaluation sums token losses and token counts with torchmetrics, so the reported loss is exact
over the whole split (every token scored once) and reduced correctly across devices.

A training step reads nothing from the device on the host except on log steps (every
``train.log_every`` and the last): a batch whose loss is not finite (on any rank) has its optimizer
step made a no-op on the device, and is counted, reported and (without ``train.skip_nonfinite``, or
after MAX_CONSECUTIVE_SKIPS in a row) stopped at when its record is next settled: on a log step,
before a checkpoint is saved, at validation, at the end of training.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import SumMetric

from sffn_lab.batch_records import BatchRecord, Unsettled
from sffn_lab.config import Config, from_dict, to_dict
from sffn_lab.data.datamodule import IGNORE_INDEX
from sffn_lab.errors import UserError
from sffn_lab.models import build_model

MAX_CONSECUTIVE_SKIPS = 20  # with train.skip_nonfinite: give up after this many non-finite batches in a row


@dataclass
class CorpusInfo:
    """What the model and the reports need to know about the corpus."""

    vocab_size: int
    unit: str  # "byte", "word" or "token" (synthetic)
    entropy_rate_bits: float | None = None  # bits per token of the true process (synthetic only)
    tokens_per_byte: dict[str, float] | None = None  # split → tokens / UTF-8 bytes of its text (words, subwords)


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite."""


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def token_losses(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy [B, S] in nats (0 where not scored) and the scored mask [B, S].

    logits [B, S, V], targets [B, S] (IGNORE_INDEX where there is no target), mask [S] or None:
    when given, only positions where it is True are scored.
    """
    if mask is not None:
        targets = targets.masked_fill(~mask, IGNORE_INDEX)
    flat = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return flat.view_as(targets), targets != IGNORE_INDEX


class LanguageModelModule(L.LightningModule):
    """Wraps a backbone built from ``config.model`` for a corpus described by ``corpus``."""

    def __init__(self, config: dict, corpus: dict):
        super().__init__()
        self.save_hyperparameters()
        self.config: Config = from_dict(Config, config)
        self.corpus = CorpusInfo(**corpus)
        self.model = build_model(self.config.model, self.corpus.vocab_size, self.config.data.seq_len)
        if self.config.train.compile:  # in place: the state dict keeps its keys, checkpoints stay interchangeable
            self.model.compile()
        self.val_nll = SumMetric()
        self.val_tokens = SumMetric()
        self.usage_counts: dict[str, dict[int, torch.Tensor]] = {}  # stage → layer → [N_E] counts
        self.gate_sums: dict[str, dict[int, torch.Tensor]] = {}  # stage → layer → [Σ gates, number of gates]
        self.last_val_usage: dict[int, torch.Tensor] = {}  # layer → [N_E] counts of the last validation
        self.nonfinite_skips = 0  # batches skipped for a non-finite loss (counted when settled)
        self.consecutive_skips = 0
        self.tokens_seen = 0  # input tokens of the batches trained on (counted when settled)
        self.unsettled = Unsettled()
        self._clock: float | None = None
        self.elapsed_s = 0.0  # training-step time (skipped batches too) over every segment (tok/s: tokens_seen / this)
        self.wall_before_s = 0.0  # wall time of the earlier segments of a resumed run, up to its checkpoint
        self._segment_start = time.perf_counter()
        # Transformer-XL caches per stage ("train", "val", "test"): per layer [b, M, D]; the training cache of a
        # resumed run waits in _restored_memory (the global batch's rows) until the rank's slice is known
        self.memory: dict[str, list[torch.Tensor] | None] = {}
        self._restored_memory: list[torch.Tensor] | None = None

    @classmethod
    def create(cls, config: Config, corpus: CorpusInfo) -> LanguageModelModule:
        return cls(to_dict(config), corpus.__dict__)

    def forward(self, tokens: torch.Tensor):
        return self.model(tokens)

    @property
    def has_memory(self) -> bool:
        return self.config.model.memory_segments > 0

    def _run(self, stage: str, x: torch.Tensor):
        """The model on a batch; a model with memory reads and replaces the stage's cache."""
        if not self.has_memory:
            return self.model(x)
        if stage == "train" and self._restored_memory is not None:
            per_rank = x.shape[0]
            rank = self.trainer.global_rank if self._trainer is not None else 0
            self.memory["train"] = [m[rank * per_rank:(rank + 1) * per_rank].to(x.device)
                                    for m in self._restored_memory]
            self._restored_memory = None
        out = self.model(x, self.memory.get(stage))
        self.memory[stage] = out.memory
        return out

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        x, y = batch
        cache = self.memory.get("train")
        out = self._run("train", x)
        losses, scored = token_losses(out.logits, y, out.loss_mask)
        lm_loss = losses.sum() / scored.sum().clamp(min=1)
        loss = lm_loss + out.aux_loss
        finite = self._finite_on_every_rank(loss)
        self.unsettled.record(BatchRecord(self.global_step, x.numel() * self.trainer.world_size, loss.detach(), finite))
        self._keep_memory_if(finite, cache)
        self._accumulate_usage("train", out.layer_stats, keep=finite)
        now = time.perf_counter()
        if self._clock is not None:
            self.elapsed_s += now - self._clock
        self._clock = now
        if self.is_log_step():  # the steps whose rows Lightning writes, and the last: host reads allowed
            self.settle_batches()
            self.log("train/loss", lm_loss, prog_bar=True, sync_dist=True)
            self.log("train/aux_loss", out.aux_loss)
            self.log("tokens_seen", float(self.tokens_seen))
            if self.nonfinite_skips:
                self.log("train/nonfinite_skips", float(self.nonfinite_skips))
            if self.elapsed_s > 0:
                self.log("tok/s", self.tokens_seen / self.elapsed_s, prog_bar=True)
            self._log_usage("train")
        # a non-finite loss on any rank: NaN gradients everywhere (a GradScaler then skips the step itself)
        return loss * torch.where(finite, 1.0, math.nan)

    def is_log_step(self) -> bool:
        """Whether this training step is one whose row Lightning writes (every train.log_every) or the last."""
        step = self.global_step + 1
        return step % self.config.train.log_every == 0 or step == self.trainer.max_steps

    def _finite_on_every_rank(self, loss: torch.Tensor) -> torch.Tensor:
        """Whether the loss is finite on every device, so that all ranks skip (or stop at) a step together: a
        0-dim bool on the loss's device, not read on the host. Under DDP, one all-reduce of it, which for CUDA
        tensors is enqueued on the device and returns without waiting for it (torch.distributed's synchronous
        collectives); Lightning's own ``reduce`` is not used here because it calls ``barrier`` first."""
        finite = torch.isfinite(loss.detach())
        if self.trainer.world_size > 1:
            flag = finite.to(torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = flag.bool()
        return finite

    def _keep_memory_if(self, finite: torch.Tensor, cache: list[torch.Tensor] | None) -> None:
        """A batch whose loss was not finite leaves the training cache as it was, chosen on the device (in a run's
        first memory_segments steps the cache before it may have had another length: then zeros)."""
        new = self.memory.get("train")
        if new is None:
            return
        before = cache or [None] * len(new)
        self.memory["train"] = [torch.where(finite, n, b if b is not None and b.shape == n.shape else 0.0)
                                for n, b in zip(new, before, strict=True)]

    def on_before_optimizer_step(self, optimizer) -> None:
        """Make this optimizer step a no-op on the device when a batch of it had a non-finite loss: the fused
        AdamW leaves parameters and state untouched where ``optimizer.found_inf`` is 1 (the attribute
        torch.amp.GradScaler sets for optimizers with ``_step_supports_amp_scaling``; torch.optim.adam._fused_adam
        in torch 2.13: the kernel returns early, the step counts are put back). Under a GradScaler (16-mixed,
        AdamW not fused) the poisoned loss's non-finite gradients make the scaler skip the step instead."""
        finite = self.unsettled.take_step_flag()
        if finite is not None and all(group["fused"] for group in optimizer.param_groups):
            optimizer.found_inf = (~finite).float()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's norm clipping (train.grad_clip) over the optimizer's parameters, done here because Lightning's
        MixedPrecision plugin refuses to clip for a fused optimizer (it assumes one that unscales internally, as
        under a GradScaler; bf16-mixed has no scaler, and 16-mixed gets an AdamW that is not fused, whose
        gradients the plugin has unscaled before this hook)."""
        if gradient_clip_val:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def settle_batches(self) -> None:
        """Read the batches recorded since the last time (one host sync) into tokens_seen and the skip counters;
        raise NonFiniteLossError at the first non-finite batch train.skip_nonfinite does not allow to skip."""
        for batch, loss, finite in self.unsettled.read():
            if finite:
                self.consecutive_skips = 0
                self.tokens_seen += batch.tokens
                continue
            self.consecutive_skips += 1
            if not self.config.train.skip_nonfinite or self.consecutive_skips > MAX_CONSECUTIVE_SKIPS:
                raise self._nonfinite_error(batch.step, loss)
            self.nonfinite_skips += 1

    def _nonfinite_error(self, step: int, loss: float) -> NonFiniteLossError:
        saved = [c.last_model_path for c in self.trainer.checkpoint_callbacks if c.last_model_path]
        ckpt = saved[0] if saved else "none saved yet"
        repeated = f" in {self.consecutive_skips} consecutive batches" if self.consecutive_skips > 1 else ""
        return NonFiniteLossError(
            f"The training loss became {loss}{repeated} at step {step + 1} (its update was not applied). The last good "
            f"checkpoint is {ckpt}. Lower train.lr, raise train.warmup_steps, or set train.skip_nonfinite=true "
            "to skip such batches."
        )

    def on_train_end(self):
        self.settle_batches()

    def configure_optimizers(self):
        t = self.config.train
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr,
            betas=(t.beta1, t.beta2),
            fused=self._fused_optimizer(),
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _fused_optimizer(self) -> bool:
        """AdamW's fused implementation (one kernel per dtype and device; whose step ``found_inf`` cancels on the
        device), except under a GradScaler (16-mixed): Lightning refuses gradient clipping with an optimizer that
        unscales internally (MixedPrecision.clip_gradients), and the scaler skips non-finite steps itself."""
        return self._trainer is None or getattr(self.trainer.precision_plugin, "scaler", None) is None

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch)

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch)

    def on_validation_epoch_start(self):
        self.memory.pop("val", None)  # every evaluation walks its split from the start

    def on_test_epoch_start(self):
        self.memory.pop("test", None)

    def _eval_step(self, stage: str, batch) -> None:
        x, y = batch
        out = self._run(stage, x)
        losses, scored = token_losses(out.logits, y, out.loss_mask)
        self.val_nll.update(losses.sum().double())
        self.val_tokens.update(scored.sum().double())
        self._accumulate_usage(stage, out.layer_stats)

    def on_validation_epoch_end(self):
        self._log_eval("val")

    def on_test_epoch_end(self):
        self._log_eval("test")

    def _log_eval(self, split: str) -> None:
        nll, n = self.val_nll.compute(), self.val_tokens.compute()
        self.val_nll.reset()
        self.val_tokens.reset()
        loss = nll / n.clamp(min=1)
        self.log_dict(self.eval_metrics(split, loss.float()), sync_dist=False)
        self.log(f"{split}/tokens", n.float())
        if split == "val":
            self.settle_batches()
            self.log("tokens_seen", float(self.tokens_seen))
            self.log("elapsed_s", self.elapsed_s)
        self._log_usage(split)

    def eval_metrics(self, split: str, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """loss in nats per token (the corpus' unit: byte, word or token) → bits and perplexity per token."""
        bits = loss / math.log(2)
        metrics = {f"{split}/loss": loss, f"{split}/bits": bits, f"{split}/ppl": loss.exp()}
        per_byte = (self.corpus.tokens_per_byte or {}).get("valid" if split == "val" else split)
        if per_byte is not None:  # bits per byte of the original text: comparable across tokenizers
            metrics[f"{split}/bpb"] = bits * per_byte
        if self.corpus.entropy_rate_bits is not None:
            metrics[f"{split}/entropy_gap_bits"] = bits - self.corpus.entropy_rate_bits
        return metrics

    # ------------------------------------------------------------------ expert usage
    def _accumulate_usage(self, stage: str, layer_stats, keep: torch.Tensor | None = None) -> None:
        """Add the batch's expert counts and gate sums to the stage's; ``keep`` (0-dim bool): whether the batch
        counts (False: a skipped training batch, chosen on the device)."""
        counts_of_stage = self.usage_counts.setdefault(stage, {})
        gates_of_stage = self.gate_sums.setdefault(stage, {})
        weight = 1.0 if keep is None else keep.float()
        for i, out in enumerate(layer_stats):
            if out.expert_counts is not None:
                counts_of_stage[i] = counts_of_stage.get(i, 0) + out.expert_counts.detach().float() * weight
            if out.gate_mean is not None:  # weighted by the batch's assignments, so that the mean is over gates
                n = out.expert_counts.sum().float() if out.expert_counts is not None else out.gate_mean.new_ones(())
                sums = torch.stack([out.gate_mean.detach().float() * n, n]) * weight
                gates_of_stage[i] = gates_of_stage.get(i, 0) + sums

    def _log_usage(self, stage: str) -> None:
        """Log usage statistics and the mean gate per layer (summed over all devices, over the batches since
        the last log), a histogram of the expert loads where a logger draws them, and start afresh."""
        counts_of_stage = self.usage_counts.pop(stage, {})
        gates_of_stage = self.gate_sums.pop(stage, {})
        from sffn_lab.analysis.usage import usage_stats
        from sffn_lab.loggers import log_histogram

        for layer, counts in sorted(counts_of_stage.items()):
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
            for key, value in usage_stats(counts).items():
                self.log(f"{stage}_usage/layer{layer}/{key}", float(value))
            log_histogram(self.loggers, f"{stage}_usage/layer{layer}/load", counts / counts.mean().clamp_min(1e-9),
                          self.global_step + (stage == "train"))  # steps completed: a training step counts itself
            if stage == "val":
                self.last_val_usage[layer] = counts.cpu()
        for layer, (total, n) in sorted(gates_of_stage.items()):
            total, n = self.trainer.strategy.reduce(torch.stack([total, n]), reduce_op="sum")
            self.log(f"{stage}_usage/layer{layer}/mean_gate", float(total / n))

    # ------------------------------------------------------------------ checkpoint extras
    def on_save_checkpoint(self, checkpoint):
        self.settle_batches()  # the counts saved are exact; a batch that must stop the run stops it before the save
        checkpoint["sffn"] = {
            "torch_rng": torch.get_rng_state(),
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_s,
            "wall_time_s": self.wall_time_s(),
            "nonfinite_skips": self.nonfinite_skips,
        }
        if self.has_memory and self.memory.get("train") is not None:  # every rank's rows, in global-batch order
            gathered = [self.all_gather(m) for m in self.memory["train"]]
            checkpoint["sffn"]["memory"] = [g.flatten(0, 1).cpu() if g.dim() == 4 else g.cpu() for g in gathered]
        elif self._restored_memory is not None:  # saved again before the first step of a resumed run
            checkpoint["sffn"]["memory"] = self._restored_memory

    def wall_time_s(self) -> float:
        """Wall time of the run so far: the earlier segments up to their checkpoint, plus this process's."""
        return self.wall_before_s + time.perf_counter() - self._segment_start

    def on_load_checkpoint(self, checkpoint):
        extra = checkpoint.get("sffn")
        if extra:
            torch.set_rng_state(extra["torch_rng"])
            self.tokens_seen = extra["tokens_seen"]
            self.elapsed_s = extra["elapsed_s"]
            self.wall_before_s = extra.get("wall_time_s", 0.0)
            self.nonfinite_skips = extra["nonfinite_skips"]
            self._restored_memory = extra.get("memory")
        # the optimizer state loads into this run's AdamW, fused or not (load_state_dict takes "fused" from the
        # saved groups, and a checkpoint from before fused AdamW, or from a 16-mixed run, says otherwise)
        fused = self._fused_optimizer()
        for state in checkpoint.get("optimizer_states", []):
            for group in state["param_groups"]:
                group["fused"] = fused

    def on_train_start(self):
        self._clock = None
