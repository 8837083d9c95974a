"""GPU benchmarks of the INT4 paged KV-cache kernels: decode, prefill, cache write, roofline and tuning.

Entry point: ``python benchmarks/run.py --out DIR [--quick|--smoke|--tune]``; see benchmarks/README.md.
"""
