"""hpipe: plan, predict and run long-context LLM prefill over mismatched devices."""

__version__ = "0.1.0"
