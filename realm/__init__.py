"""realm: Triton kernels and a small runtime for research on quantized (GGUF) LLM inference."""

__version__ = "0.1.0"
