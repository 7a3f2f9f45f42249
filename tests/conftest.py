"""Shared pytest configuration.

Triton reads TRITON_INTERPRET when it is first imported, so the flag is set here, before any test
module imports triton, whenever no CUDA device exists: the kernels then run in the interpreter.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
