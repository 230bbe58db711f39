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

# Exports resolve lazily (PEP 562) so that `import mmadapters` (and `mmadapters --help`) does not pay
# for importing torch until something is used.
_EXPORTS = {
    "ALLOWED_NESTINGS": "composition", "Average": "composition", "Stack": "composition",
    "AdapterConfig": "config", "get_method": "config", "register_method": "config",
    "registered_methods": "config",
    "load_adapter": "io", "read_adapter_config": "io", "save_adapter": "io",
    "BottleneckConfig": "methods", "CompacterConfig": "methods", "HyperAdapterConfig": "methods",
    "LoRAConfig": "methods", "PromptConfig": "methods", "MoSAConfig": "methods", "SORSAConfig": "methods",
    "SparseFTConfig": "methods", "LlamaAdapterConfig": "methods",
    "adapter_names": "model", "adapter_parameters": "model", "add_adapter": "model",
    "delete_adapter": "model", "freeze_base": "model", "get_active": "model", "get_config": "model",
    "merge": "model", "set_active": "model", "unmerge": "model",
    "AdapterPoint": "points", "declare_adapter_points": "points", "declared_points": "points",
    "ParameterReport": "report", "parameter_report": "report",
    "AdapterUnit": "units", "NotMergeable": "units", "AdaptedModule": "wrapper",
    # many adapters at once
    "route": "routing", "AdapterCache": "routing",
    "Mixture": "composition", "add_mixture_gate": "mixture", "MixtureGateConfig": "methods",
    "offload": "routing",
    "storage_report": "io", "StorageReport": "io", "save_adapters": "io", "load_adapters": "io",
    "average_adapters": "combine", "select_from_checkpoints": "combine",
    "export_peft": "peft_interop", "import_peft": "peft_interop",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmadapters' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = [
    "ALLOWED_NESTINGS", "AdaptedModule", "AdapterConfig", "AdapterPoint", "AdapterUnit", "Average",
    "BottleneckConfig", "CompacterConfig", "HyperAdapterConfig", "LoRAConfig", "NotMergeable",
    "LlamaAdapterConfig", "MoSAConfig", "ParameterReport", "PromptConfig", "SORSAConfig",
    "SparseFTConfig", "Stack", "__version__", "adapter_names", "adapter_parameters",
    "add_adapter", "declare_adapter_points", "declared_points", "delete_adapter", "freeze_base",
    "get_active", "get_config", "get_method", "load_adapter", "merge", "parameter_report",
    "read_adapter_config", "register_method", "registered_methods", "save_adapter", "set_active", "unmerge",
    "AdapterCache", "Mixture", "MixtureGateConfig", "offload", "StorageReport", "add_mixture_gate", "average_adapters", "export_peft",
    "import_peft", "load_adapters", "route", "save_adapters", "select_from_checkpoints", "storage_report",
]
