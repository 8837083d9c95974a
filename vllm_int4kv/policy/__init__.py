"""Which precision keys and values get: the layout of one layer (``layout``), the decision for a model
(``decide``: explicit, cached, or calibrated at start-up), and the process's resolved policy
(``current``). Pure Python and torch; the calibration loads models with HF transformers, never vLLM."""
from .layout import PRESETS, UNQUANTIZED, KVPolicy, parse_policy

__all__ = ["PRESETS", "UNQUANTIZED", "KVPolicy", "parse_policy"]
