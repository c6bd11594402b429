"""Experiments and the `nearest-etf` command line, built on the library layers.

One sub-package or module per experiment (`ufm`, `dufm`, `bounds`, `train`, `adaptive_etf`,
`etf_transformer`, `demo`); shared building blocks in `data`, `models` and `layer_stack`; private
plumbing (command-line options, results files, the training loop, the executors) in `_common`.
Nothing outside this package imports from it.
"""
