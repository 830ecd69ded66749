from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.observer.scene import Scene


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    """Tenants' slots under tmp_path and the observer's state over them."""
    s = Scene.create(tmp_path, idle_window_ms=100, throttled_min_pct=2)
    yield s
    s.close()
