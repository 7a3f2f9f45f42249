"""Fused per-token log-prob + entropy: Triton kernels and torch references (`fastarcher.kernels`).

The folder is `kernels/` in the repository but installs as `fastarcher.kernels`, so it never shadows
PyPI's `kernels` package. The trainer calls `fastarcher.logprobs`, which dispatches to:
  logprob_entropy.py         Triton forward/backward kernels from logits + LogprobEntropyFunction
  linear_logprob_entropy.py  LM head fused in token chunks + LinearLogprobEntropyFunction
  chunked.py                 chunked torch path (CPU fallback) + ChunkedLogprobEntropyFunction
  reference.py               naive eager oracle used by the tests
Triton is imported only by logprob_entropy.py, so the torch paths work without it.
"""
