"""genvl: generative vision-language models (CLIP core, unCLIP, autoregressive, interleaved)."""

__version__ = "0.1.0"
