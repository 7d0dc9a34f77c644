"""Micro-benchmarks of the C hot paths. With pytest-benchmark installed (`pip install -e
'.[test]'`) they are timed and reported; without it a stand-in fixture runs each function a
few times, so the sanity checks still run everywhere."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import pytest

HAVE_PYTEST_BENCHMARK = importlib.util.find_spec("pytest_benchmark") is not None

if not HAVE_PYTEST_BENCHMARK:
    def pytest_configure(config: pytest.Config) -> None:
        config.addinivalue_line("markers", "benchmark: a micro-benchmark (pytest-benchmark)")

    class _Runner:
        """The part of pytest-benchmark's fixture these tests use."""

        def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return self.pedantic(fn, args=args, kwargs=kwargs)

        def pedantic(self, fn: Callable[..., Any], args: tuple = (), kwargs: dict | None = None,
                     rounds: int = 3, iterations: int = 1, warmup_rounds: int = 0) -> Any:
            result = None
            for _ in range(max(1, rounds) * max(1, iterations)):
                result = fn(*args, **(kwargs or {}))
            return result

    @pytest.fixture
    def benchmark() -> _Runner:
        return _Runner()
