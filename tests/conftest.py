"""Shared test configuration: 8 simulated CPU devices for sharding tests."""

import os

# Must be set before jax is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
