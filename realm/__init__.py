"""realm: Triton kernels and a small runtime for research on quantized (GGUF) LLM inference."""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Load a GGUF model for generation: `realm.runtime.load` (imported on first use, so `import realm` stays light
    for the CLI)."""
    from .runtime import load as _load

    return _load(*args, **kwargs)
