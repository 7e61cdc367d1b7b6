"""Embedding analysis (``uae-dist analyze``): what a per-element table learned, and how it
compares with the tables people already use.

Modules: ``frame`` (which rows enter, the shared standardised space), ``periodic`` (groups,
periods, blocks, reference properties), ``maps`` (PCA, UMAP), ``clusters`` (k-means scan),
``similarity`` (cosine similarity, nearest elements, Mantel agreement), ``reverse`` (reverse
prediction of properties), ``report``/``summary`` (Markdown and self-contained HTML), and
``pipeline.analyze``, which runs them all.
"""
from uae_dist.analysis.pipeline import DEFAULT_COMPARE, analyze, parse_compare

__all__ = ["DEFAULT_COMPARE", "analyze", "parse_compare"]
