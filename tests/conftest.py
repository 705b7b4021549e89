"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture()
def shared_dir() -> Iterator[str]:
    """A 0755 directory outside pytest's 0700 tmp tree, so an unprivileged user can reach it."""
    path = tempfile.mkdtemp(prefix="gua-test-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


