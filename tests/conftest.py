"""Fixtures shared across test areas live in tests/fixtures/; they are imported here."""

from tests.fixtures.foreign_shards import *  # noqa: F403
from tests.fixtures.mlflow_server import *  # noqa: F403
from tests.fixtures.shards import *  # noqa: F403
