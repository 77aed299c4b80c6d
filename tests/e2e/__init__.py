"""End-to-end runs: real model families, PEFT on PyTorch, multi-process jobs, two-mesh compiles, the larger
zoo models, the GCS emulator, benchmarks, notebooks and the README. All marked slow (`conftest.py` here), and
nothing outside this folder is (`tests/test_architecture.py`); CI runs them."""
