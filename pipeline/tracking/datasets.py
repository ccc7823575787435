"""The data set a run reads, as MLflow dataset inputs (the run page's "Datasets" box).

Pure (no mlflow import): the engine describes its shard index here, the tracker queues the
description like any other record, and ``backend.py`` turns it into MLflow's ``DatasetInput``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Context = Literal["training", "evaluation"]

# MLflow's input tag that the UI shows as the dataset's context (mlflow.data's constant, kept here
# so this module does not import mlflow).
CONTEXT_TAG = "mlflow.data.context"


@dataclass(frozen=True)
class DatasetInput:
    """One split of a shard index. ``digest`` is the split's fingerprint (its shard names and
    sample counts), so two runs on the same shards show one dataset in the experiment."""

    name: str
    digest: str
    source: str  # the index file (or data directory) on the shared filesystem
    context: Context
    profile: dict[str, Any]  # sample counts and classes, shown by the UI's dataset drawer

    def to_record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "digest": self.digest,
            "source_type": "local",
            "source": json.dumps({"uri": self.source}),
            "profile": json.dumps(self.profile, sort_keys=True),
            "tags": {CONTEXT_TAG: self.context},
        }


def split_inputs(
    *,
    name: str,
    source: str,
    splits: dict[str, tuple[str, int]],
    train_split: str,
    val_split: str | None,
    num_classes: int,
) -> list[DatasetInput]:
    """The train split (context ``training``) and, when the run evaluates, the val split
    (``evaluation``). ``splits`` maps every split of the index to (fingerprint, samples); each
    input's profile carries the counts of all splits, so the train input alone says the sizes."""
    counts = {split: samples for split, (_, samples) in splits.items()}
    wanted: list[tuple[str, Context]] = [(train_split, "training")]
    if val_split and val_split in splits and val_split != train_split:
        wanted.append((val_split, "evaluation"))
    return [
        DatasetInput(
            name=name,
            digest=splits[split][0],
            source=source,
            context=context,
            profile={"split": split, "num_rows": splits[split][1], "num_classes": num_classes, "splits": counts},
        )
        for split, context in wanted
    ]
