"""realm: Triton kernels and a small runtime for research on quantized (GGUF) LLM inference."""

__version__ = "0.1.0"


def load(model="smollm2", device=None, backend="torch", **kwargs):
    """Load a GGUF model for generation: see `realm.runtime.load` (imported on first use: `import realm` stays
    light for the CLI)."""
    from .runtime import load as _load

    return _load(model, device=device, backend=backend, **kwargs)
