"""hpipe: plan, predict and run long-context LLM inference (prefill, then generation) over mismatched devices."""

__version__ = "0.1.0"
