"""Host snapshots for background saves: unchanged by training, written as the original would be."""

from __future__ import annotations

import io
from collections import OrderedDict

import torch

from pipeline.train.staging import HostStaging
from tests.train.conftest import assert_same_state


def _state() -> dict:
    flat = torch.arange(12, dtype=torch.float32)  # a DeepSpeed-style flat buffer and views into it
    master = torch.nn.Parameter(torch.linspace(0, 1, 6))
    return {
        "module": OrderedDict(w=flat[:8].view(2, 4), b=flat[8:]),
        "optimizer": {"state": {0: {"exp_avg": torch.ones(3), "step": 7}}, "param_groups": [{"lr": 0.1}]},
        "fp32": [master],
        "shapes": OrderedDict(w=torch.Size([2, 4])),
        "strided": flat[::3],
    }


def _saved(obj: object) -> object:
    """``obj`` written as DeepSpeed writes it (legacy serialization) and read back."""
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _shared(state: dict) -> bool:
    return state["module"]["w"].untyped_storage().data_ptr() == state["strided"].untyped_storage().data_ptr()


def test_snapshot_writes_the_same_bytes_and_ignores_later_training() -> None:
    state, staging = _state(), HostStaging()
    before = _saved(state)
    snap = staging.snapshot(state, "mp_rank_00_model_states.pt")
    assert_same_state(_saved(snap), before)  # same types, values, storages, offsets and strides
    assert type(snap["module"]) is OrderedDict and isinstance(snap["fp32"][0], torch.nn.Parameter)
    assert _shared(snap) and _shared(_saved(snap))  # views of one buffer stay views of one buffer
    # The next step changes weights, moments and the learning rate in place.
    state["module"]["w"].add_(100)
    state["optimizer"]["state"][0]["exp_avg"].mul_(3)
    state["optimizer"]["param_groups"][0]["lr"] = 0.5
    with torch.no_grad():
        state["fp32"][0].zero_()
    assert_same_state(_saved(snap), before)
    assert staging.nbytes == (12 + 3 + 6) * 4


def test_buffers_are_reused_from_one_save_to_the_next() -> None:
    staging = HostStaging()
    first = staging.snapshot(_state(), "optim.pt")
    ptr = first["module"]["w"].untyped_storage().data_ptr()
    second_state = _state()
    second_state["module"]["w"].add_(1)
    second = staging.snapshot(second_state, "optim.pt")
    assert second["module"]["w"].untyped_storage().data_ptr() == ptr  # no new allocation, no page faults
    assert torch.equal(second["module"]["w"], second_state["module"]["w"])
    assert staging.nbytes == (12 + 3 + 6) * 4
    staging.snapshot(_state(), "another_file.pt")
    assert staging.nbytes == 2 * (12 + 3 + 6) * 4
