"""Tiers: tests/unit -> `unit`, tests/integration -> `integration`, tests/e2e -> `e2e`;
`gpu` tests are skipped without a CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.procs import BrokerProc, RedisProc

_TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpus = None
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in _TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
        if item.get_closest_marker("gpu"):
            if gpus is None:
                try:
                    import torch

                    gpus = torch.cuda.device_count()
                except ImportError:
                    gpus = 0
            if gpus == 0:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture
def redis_proc(tmp_path: Path):
    r = RedisProc(tmp_path / "redis")
    yield r
    r.stop()


@pytest.fixture
def broker_factory(tmp_path: Path, redis_proc: RedisProc):
    started: list[BrokerProc] = []

    def make(*extra: str, auth: bool = True) -> BrokerProc:
        b = BrokerProc(redis_proc.url, tmp_path, *extra, auth=auth)
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def broker(broker_factory):
    return broker_factory()
