"""The parent run a sweep's runs nest under (pipeline/tracking/groups.py), in a local store."""

from __future__ import annotations

from pathlib import Path

from pipeline.config.schema import TrackingConfig
from pipeline.tracking import end_parent_run, open_parent_run


def test_parent_run_holds_the_definition_in_the_members_store_and_experiment(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    member_dir = tmp_path / "sweep" / "smoke-lr1e-3"
    parent = open_parent_run(
        TrackingConfig(tags={"team": "vision"}), run_dir=member_dir, experiment="smoke", run_name="smoke-sweep",
        params={"sweep.members": "4", "sweep.varying": "optim.lr"}, tags={"sweep.id": "smoke-1234"},
    )  # fmt: skip
    assert parent is not None
    # Where a run in the member's dir logs by default: the store beside it.
    assert parent.uri == f"sqlite:///{(tmp_path / 'sweep' / 'mlflow.db').resolve()}"
    client = MlflowClient(parent.uri)
    run = client.get_run(parent.run_id)
    assert (run.info.run_name, run.info.status) == ("smoke-sweep", "FINISHED")
    assert client.get_experiment(parent.experiment_id).name == "smoke"
    assert run.data.params == {"sweep.members": "4", "sweep.varying": "optim.lr"}
    assert run.data.tags["sweep.id"] == "smoke-1234" and run.data.tags["team"] == "vision"
    end_parent_run(parent, "FAILED")
    assert client.get_run(parent.run_id).info.status == "FAILED"


def test_no_parent_run_when_tracking_is_off(tmp_path: Path) -> None:
    off = TrackingConfig(enabled=False)
    assert open_parent_run(off, run_dir=tmp_path, experiment="x", run_name="y", params={}, tags={}) is None
    assert not (tmp_path.parent / "mlflow.db").exists()
