"""strata: new language-model architectures as first-class Hugging Face citizens.

``import strata`` registers every architecture with ``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM`` and the tokenizer with ``AutoTokenizer``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from strata.configuration.configuration_hmtr import HMTRConfig
from strata.configuration.configuration_mt_hope import MTHopeConfig
from strata.configuration.configuration_retmamba import RetMambaConfig
from strata.configuration.configuration_thl import THLConfig
from strata.configuration.configuration_tiny_onn import TinyONNConfig
from strata.modeling.cache_recurrent import RecurrentCache
from strata.modeling.generation_blocks import BlockGenerationMixin
from strata.modeling.modeling_hmtr import (
    LORA_TARGET_MODULES as HMTR_LORA_TARGET_MODULES,
    HMTRForCausalLM,
    HMTRModel,
)
from strata.modeling.modeling_mt_hope import (
    LORA_TARGET_MODULES as MT_HOPE_LORA_TARGET_MODULES,
    MTHopeForCausalLM,
    MTHopeModel,
)
from strata.modeling.modeling_retmamba import (
    LORA_TARGET_MODULES as RETMAMBA_LORA_TARGET_MODULES,
    RetMambaForCausalLM,
    RetMambaModel,
)
from strata.modeling.modeling_thl import (
    LORA_TARGET_MODULES as THL_LORA_TARGET_MODULES,
    THLForCausalLM,
    THLModel,
)
from strata.modeling.modeling_tiny_onn import (
    LORA_TARGET_MODULES as TINY_ONN_LORA_TARGET_MODULES,
    TinyONNForCausalLM,
    TinyONNModel,
)
from strata.tokenization import CharWordTokenizer, register_tokenizer

__version__ = "0.1.0"

# (config class, base model class, causal LM class, default LoRA target modules)
ARCHITECTURES = {
    RetMambaConfig.model_type: (RetMambaConfig, RetMambaModel, RetMambaForCausalLM, RETMAMBA_LORA_TARGET_MODULES),
    THLConfig.model_type: (THLConfig, THLModel, THLForCausalLM, THL_LORA_TARGET_MODULES),
    HMTRConfig.model_type: (HMTRConfig, HMTRModel, HMTRForCausalLM, HMTR_LORA_TARGET_MODULES),
    TinyONNConfig.model_type: (TinyONNConfig, TinyONNModel, TinyONNForCausalLM, TINY_ONN_LORA_TARGET_MODULES),
    MTHopeConfig.model_type: (MTHopeConfig, MTHopeModel, MTHopeForCausalLM, MT_HOPE_LORA_TARGET_MODULES),
}


def _register() -> None:
    for config_cls, model_cls, lm_cls, _ in ARCHITECTURES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)
    register_tokenizer(*(entry[0] for entry in ARCHITECTURES.values()))


def lora_target_modules(model_type: str) -> list[str]:
    """The documented default PEFT LoRA ``target_modules`` of an architecture."""
    return list(ARCHITECTURES[model_type][3])


_register()

__all__ = [
    "ARCHITECTURES",
    "BlockGenerationMixin",
    "CharWordTokenizer",
    "HMTRConfig",
    "HMTRForCausalLM",
    "HMTRModel",
    "MTHopeConfig",
    "MTHopeForCausalLM",
    "MTHopeModel",
    "RecurrentCache",
    "RetMambaConfig",
    "RetMambaForCausalLM",
    "RetMambaModel",
    "THLConfig",
    "THLForCausalLM",
    "THLModel",
    "TinyONNConfig",
    "TinyONNForCausalLM",
    "TinyONNModel",
    "lora_target_modules",
]
