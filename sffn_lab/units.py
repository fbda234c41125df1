"""What a run's numbers are per: the corpus' unit (``byte``; ``word``; ``token`` for the synthetic symbols and
subword tokenizers) and the labels that name it. Perplexity is per unit too: exp(loss in nats per unit)."""

from __future__ import annotations

METRIC_NAMES = {"val/bits": "bits", "val/ppl": "perplexity"}


def per(unit: str | None) -> str:
    """'per byte', 'per word', 'per token' (also when the unit is not known)."""
    return f"per {unit or 'token'}"


def metric_label(metric: str, unit: str | None) -> str:
    """An axis label: ``val/bits`` of a byte corpus → 'validation bits per byte'."""
    return f"validation {METRIC_NAMES[metric]} {per(unit)}"
