"""Research harness: ``strata experiment CONFIG.yaml`` (docs/experiments.md).

    config.py      the YAML schema, validation, --quick and the grid of runs
    tasks.py       language modelling, MQAR, selective copying, induction heads, ListOps
    models.py      models from strata.ARCHITECTURES by model_type + preset; parameter matching
    runner.py      resumable results.jsonl keyed by run id; Trainer-based training
    efficiency.py  training tokens/s, decoding latency and memory against context, FLOPs/token
    report.py      report.md, tables, findings and figures
"""

from strata.experiment.config import ExperimentConfig, load_config, parse_config
from strata.experiment.runner import read_results, run_experiment

__all__ = ["ExperimentConfig", "load_config", "parse_config", "read_results", "run_experiment"]
