"""Fixtures shared by the tests (helpers to import live in helpers.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One tokenized corpus for the whole session."""
    return str(tmp_path_factory.mktemp("data_cache"))
