from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="session")
def fixture_results() -> Path:
    return FIXTURES / "results_fixture.jsonl"


@pytest.fixture(scope="session")
def mismatch_results() -> Path:
    return FIXTURES / "results_mismatch.jsonl"
