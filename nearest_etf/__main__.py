"""`python -m nearest_etf ...` runs the `nearest-etf` command line."""

from nearest_etf.experiments.cli import main

main()
