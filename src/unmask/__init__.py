"""unmask: masked diffusion language models, with an autoregressive baseline from the same code."""

__version__ = "0.1.0"
