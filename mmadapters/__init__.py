"""mmadapters: parameter-efficient adapters for vision-language and speech models.

The adapter core. It knows no backbone: backbones declare adapter points, configs name targets,
and one wrapper mechanism serves every method::

    import mmadapters as mma
    mma.add_adapter(model, "task", mma.LoRAConfig(r=8, target_modules=["qkv", "fc1"]))
    mma.freeze_base(model)
    print(mma.parameter_report(model))
    mma.save_adapter(model, "task", "out/task")
"""

__version__ = "0.1.0"

from .composition import ALLOWED_NESTINGS, Average, Stack
from .config import AdapterConfig, get_method, register_method, registered_methods
from .io import load_adapter, read_adapter_config, save_adapter
from .methods import BottleneckConfig, CompacterConfig, HyperAdapterConfig, LoRAConfig, PromptConfig
from .model import (
    adapter_names,
    adapter_parameters,
    add_adapter,
    delete_adapter,
    freeze_base,
    get_active,
    get_config,
    merge,
    set_active,
    unmerge,
)
from .points import AdapterPoint, declare_adapter_points, declared_points
from .report import ParameterReport, parameter_report
from .units import AdapterUnit, NotMergeable
from .wrapper import AdaptedModule

__all__ = [
    "ALLOWED_NESTINGS", "AdaptedModule", "AdapterConfig", "AdapterPoint", "AdapterUnit", "Average",
    "BottleneckConfig", "CompacterConfig", "HyperAdapterConfig", "LoRAConfig", "NotMergeable",
    "ParameterReport", "PromptConfig", "Stack", "__version__", "adapter_names", "adapter_parameters",
    "add_adapter", "declare_adapter_points", "declared_points", "delete_adapter", "freeze_base",
    "get_active", "get_config", "get_method", "load_adapter", "merge", "parameter_report",
    "read_adapter_config", "register_method", "registered_methods", "save_adapter", "set_active", "unmerge",
]
