"""realm: Triton kernels and a small runtime for research on quantized (GGUF) LLM inference."""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Load a GGUF model for generation: `realm.runtime.load` (imported on first use, so `import realm` stays light
    for the CLI)."""
    from .runtime import load as _load

    return _load(*args, **kwargs)


def __getattr__(name: str):
    """realm.LLM, the offline batch API (`realm.runtime.llm.LLM`), imported on first use like `load`."""
    if name == "LLM":
        from .runtime.llm import LLM

        return LLM
    raise AttributeError(f"module 'realm' has no attribute {name!r}")
