"""The QoQ quantization recipe (docs/recipe.md): run_qoq(model, tokenizer, texts, group_size, options)."""

from .pipeline import QoQOptions, QuantResult, options_from_dict, run_qoq

__all__ = ["QoQOptions", "QuantResult", "options_from_dict", "run_qoq"]
