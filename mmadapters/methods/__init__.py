"""Built-in adapter methods; importing this package registers them."""

from . import bottleneck, compacter, hyper, llama_adapter, lora, mixture_gate, mosa, prompt, sorsa, sparse_ft  # noqa: F401
from .bottleneck import BottleneckConfig
from .compacter import CompacterConfig
from .hyper import HyperAdapterConfig
from .llama_adapter import LlamaAdapterConfig
from .lora import LoRAConfig
from .mixture_gate import MixtureGateConfig
from .mosa import MoSAConfig
from .prompt import PromptConfig
from .sorsa import SORSAConfig
from .sparse_ft import SparseFTConfig

__all__ = [
    "BottleneckConfig", "CompacterConfig", "HyperAdapterConfig", "LlamaAdapterConfig", "LoRAConfig", "MixtureGateConfig",
    "MoSAConfig", "PromptConfig", "SORSAConfig", "SparseFTConfig",
]
