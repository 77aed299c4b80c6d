"""End-to-end runs: real model families, PEFT on PyTorch, multi-process jobs, the GCS emulator,
benchmarks, notebooks and the README. All marked slow (`conftest.py` here); CI runs them."""
