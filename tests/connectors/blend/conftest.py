from __future__ import annotations

import json

import pytest

from connectors.blend import llama2c


@pytest.fixture(scope="session")
def tiny():
    root = llama2c.shared_dir()
    assert root is not None, "the llama2.c model ships in tests/assets/models"
    return llama2c.load(root)


@pytest.fixture(scope="session")
def musique():
    root = llama2c.shared_dir()
    assert root is not None, "MuSiQue ships in tests/assets/data"
    return json.loads((root / "data" / "musique_s.json").read_text())
