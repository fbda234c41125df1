"""sffn-lab: an experiment toolkit for sparse feed-forward layers in language models."""

__version__ = "0.1.0"

from sffn_lab import variants  # noqa: F401  registers the built-in FFN variants before any config is read
