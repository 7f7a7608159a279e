"""Training: data preparation with `datasets`, Trainer runs, Hub-ready export, the demo.

Import the submodules (`strata.training.data`, `.train`, `.export`) directly; this package
imports nothing heavy itself so that `strata --help` stays fast.
"""
