"""Corpus preparation: documents from Debian documentation, archives, text folders or the published FineWeb
shards, a SentencePiece tokenizer with the challenge's settings, and token shards in the official layout.

Command line: `python -m pgolf_kernels.prepare --help`.
"""
from .cli import main

__all__ = ["main"]
