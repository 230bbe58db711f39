"""Built-in adapter methods; importing this package registers them."""

from . import bottleneck, compacter, hyper, lora, mixture_gate, prompt  # noqa: F401
from .bottleneck import BottleneckConfig
from .compacter import CompacterConfig
from .hyper import HyperAdapterConfig
from .lora import LoRAConfig
from .mixture_gate import MixtureGateConfig
from .prompt import PromptConfig

__all__ = ["BottleneckConfig", "CompacterConfig", "HyperAdapterConfig", "LoRAConfig", "MixtureGateConfig", "PromptConfig"]
