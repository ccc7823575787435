"""Fixtures shared across test areas live in tests/fixtures/; they are imported here."""

import os

import pytest

from tests.fixtures.foreign_shards import *  # noqa: F403
from tests.fixtures.mlflow_server import *  # noqa: F403
from tests.fixtures.shards import *  # noqa: F403

# Variables every job a test starts inherits that decide where it tracks and what it reports: a test
# that leaves one behind changes the next tests' jobs, far from the cause. (The MLflow HTTP timeouts a
# tracker sets in its own process are left out: every tracker and launcher sets its own.)
_INHERITED = ("PIPELINE_", "MLFLOW_TRACKING_", "MLFLOW_EXPERIMENT_", "MLFLOW_RUN_ID")


@pytest.fixture(autouse=True)
def _no_leaked_job_variables() -> object:
    before = {k: v for k, v in os.environ.items() if k.startswith(_INHERITED)}
    yield
    after = {k: v for k, v in os.environ.items() if k.startswith(_INHERITED)}
    assert after == before, f"the test left job variables changed: {set(after.items()) ^ set(before.items())}"
