"""Plumbing shared by the experiment commands: options, results files, the training loop and
the parallel executors. Private to `nearest_etf.experiments`."""
