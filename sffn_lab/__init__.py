"""sffn-lab: an experiment toolkit for sparse feed-forward layers in language models."""

__version__ = "0.1.0"
