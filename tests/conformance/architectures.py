"""The one list the conformance suite runs over: add an architecture here.

Each entry is (model_type, preset). Every preset of an architecture whose mixers
differ gets its own entry; the slower whole-model checks (Trainer, PEFT, remote
code, pipeline) run on the first entry of each architecture.
"""

import strata

CASES = [
    ("retmamba", "transformer-tiny"),
    ("retmamba", "retnet-tiny"),
    ("retmamba", "mamba-tiny"),
    ("retmamba", "hybrid-tiny"),
    ("retmamba", "fusion-tiny"),
    ("retmamba", "fusion-selective-tiny"),
    ("thl", "tiny"),
    ("thl", "tiny-stale"),
    ("hmtr", "tiny"),
    ("hmtr", "tiny-lstm"),
    ("tiny_onn", "tiny"),
    ("mt_hope", "tiny"),
    ("mt_hope", "tiny-attn"),
]

# One representative per architecture for the slower checks.
MAIN_CASES = [("retmamba", "tiny"), ("thl", "tiny"), ("hmtr", "tiny"), ("mt_hope", "tiny"), ("tiny_onn", "tiny")]


def case_id(case) -> str:
    return f"{case[0]}:{case[1]}"


def classes(model_type):
    config_cls, model_cls, lm_cls, lora_targets = strata.ARCHITECTURES[model_type]
    return config_cls, model_cls, lm_cls, lora_targets
