"""sekd: a benchmark harness for selective knowledge distillation of LLMs."""

__version__ = "0.1.0"
