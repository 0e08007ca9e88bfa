"""Deterministic tiny models, tokenizers and LoRA adapters, built locally (nothing downloaded).

Used by the test suites (tiny random models of each supported architecture) and by
`lorafleet up` (the built-in demo model and demo adapters, see assets.py).
"""
