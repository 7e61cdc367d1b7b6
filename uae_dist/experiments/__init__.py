"""Experiments: the fine-tuning matrix and its results (docs/experiments.md).

``schema``    the matrix YAML, one typed schema          ``cells``    cell order, overrides, hash
``datasets``  data sets built once under a lock          ``runner``   cell subprocesses, resume
``record``    cell.json / metrics.json                   ``matrix``   list / prepare / run
``overrides`` config overrides in the file and on the command line
``results``   table over seeds, % vs default             ``plots``    parity plots, learning curves
"""
