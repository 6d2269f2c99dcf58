"""Shared fixtures for the torch-only unit tests.

Numerical tests draw a fresh random seed on every run (so they keep exploring new data, shapes and bit
widths); the seed is printed, and pytest shows it with a failing test's output. Reproduce a failure with
``MQ_TEST_SEED=<seed> pytest ...``.
"""

from __future__ import annotations

import os
import secrets

import pytest
import torch


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("MQ_TEST_SEED", secrets.randbelow(2**31)))
    torch.manual_seed(value)
    print(f"MQ_TEST_SEED={value}")
    return value


@pytest.fixture(autouse=True)
def _two_threads():
    """The project's machines have 2 cores; keep tests from oversubscribing them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, previous))
    yield
    torch.set_num_threads(previous)
