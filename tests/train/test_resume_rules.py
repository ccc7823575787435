"""plan_resume: each key that differs from the checkpoint's config is honoured (and said) or refused."""

from __future__ import annotations

import pytest

from pipeline.config import config_to_dict, load_config
from pipeline.train.resume import ResumeRefused, plan_resume
from tests.train.conftest import SMOKE


def cfg(*overrides: str):
    return load_config(SMOKE, list(overrides))


SAVED = config_to_dict(cfg())  # the smoke run: 16 per rank x 2 ranks = 32 per step, 30 steps


def plan(*overrides: str, world_size: int = 2, step: int = 20):
    return plan_resume(SAVED, cfg(*overrides), saved_world_size=2, world_size=world_size, step=step)


def test_an_unchanged_config_resumes_with_nothing_to_say() -> None:
    p = plan()
    assert (p.global_batch_size, p.steps, p.safe, p.notes) == (32, (30, 30), [], [])


def test_cadence_and_tracking_changes_are_honoured_and_listed() -> None:
    p = plan("train.log_every=1", "tracking.enabled=false", "checkpoint.keep_last=5", "model.grad_checkpointing=true")
    assert p.safe == [
        "checkpoint.keep_last: 3 -> 5 (honoured)",
        "model.grad_checkpointing: False -> True (honoured)",
        "tracking.enabled: True -> False (honoured)",
        "train.log_every: 5 -> 1 (honoured)",
    ]
    assert p.notes == []


def test_recipe_changes_are_refused_naming_each_key_both_values_and_the_fix() -> None:
    with pytest.raises(ResumeRefused) as e:
        plan("optim.lr=0.001", "data.mixup_alpha=0.8", "model.drop_path_rate=0.1", "train.log_every=1")
    assert str(e.value) == (
        "resuming would change the run's recipe: data.mixup_alpha: checkpoint 0.0, now 0.8; model.drop_path_rate: "
        "checkpoint 0.0, now 0.1; optim.lr: checkpoint 0.002, now 0.001. A resumed run keeps the model, optimizer, "
        "data and augmentation of its checkpoint; set them back (data.mixup_alpha=0.0 model.drop_path_rate=0.0 "
        "optim.lr=0.002) to resume it, or pass another train.run_dir to start a new run "
        "(finetune.init_from=<this run dir> starts from its weights)"
    )


def test_steps_may_change_with_the_schedule_rule_stated() -> None:
    longer = plan("train.steps=50")
    assert longer.steps == (30, 50)
    assert longer.notes == [
        "train.steps: 30 -> 50 (honoured): the run now ends at step 50; the learning rate's remaining decay is "
        "re-stretched from its current value at step 20 to optim.min_lr at step 50 (warmup kept)"
    ]
    shorter = plan("train.steps=10")
    assert shorter.notes == [
        "train.steps: 30 -> 10 (honoured): the checkpoint is already at step 20, so nothing is left to train; the "
        "run ends at step 20 (final evaluation and export)"
    ]


def test_another_world_size_keeps_the_global_batch_and_rederives_the_accumulation() -> None:
    p = plan(world_size=1)
    assert p.global_batch_size == 32
    assert p.notes == [
        "global batch kept at the checkpoint's 32 = 16 x accumulation 2 x 1 ranks (saved as 16 x 1 x 2 ranks)"
    ]
    assert plan("train.micro_batch_size=8", world_size=4).global_batch_size == 32  # 8 x 1 x 4
    assert plan("train.global_batch_size=32", world_size=1).global_batch_size == 32  # pinned to the same: fine


def test_a_global_batch_that_cannot_be_kept_is_refused_with_the_fix() -> None:
    refusals = {
        (3, ""): r"^the checkpoint's global batch 32 \(saved by 2 ranks\) is not a multiple of "
        r"train.micro_batch_size=16 x 3 ranks \(= 48\), so it cannot be kept; resume on 1 or 2 ranks, or pass "
        r"another train.run_dir to start a new run$",
        (4, ""): r"not a multiple of train.micro_batch_size=16 x 4 ranks \(= 64\).*; resume on 1 or 2 ranks, or set "
        r"train.micro_batch_size=8, or pass another",
        (2, "train.global_batch_size=64"): r"^train.global_batch_size=64 but the checkpoint trained with a global "
        r"batch of 32; .* set train.global_batch_size=32 \(or 0 to keep the checkpoint's\)",
        (2, "train.grad_accum=2"): r"^train.grad_accum=2 x train.micro_batch_size=16 x 2 ranks \(= 32\) gives a "
        r"global batch of 64, but the checkpoint trained with 32; set train.grad_accum=0",
    }
    for (world_size, override), message in refusals.items():
        with pytest.raises(ResumeRefused, match=message):
            plan(*filter(None, [override]), world_size=world_size)


def _saved_run(run_dir, *, zero_stage: int):
    """A committed checkpoint of 2 ranks at step 10 (bookkeeping files only: nothing is loaded here)."""
    import json

    from pipeline.artifacts.checkpoints import tag_for
    from pipeline.train.checkpoint import commit

    tag_dir = run_dir / "checkpoints" / tag_for(10)
    tag_dir.mkdir(parents=True)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    saved = config_to_dict(cfg(f"train.zero_stage={zero_stage}"))
    (tag_dir / "trainer_state.json").write_text(json.dumps({"step": 10, "config": saved}))
    commit(tag_dir, {"step": 10, "samples_seen": 320, "world_size": 2, "zero_stage": zero_stage,
                     "model": saved["model"]})  # fmt: skip


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_the_launcher_announces_what_the_ranks_do_at_another_world_size(
    tmp_path, caplog: pytest.LogCaptureFixture, zero_stage: int
) -> None:
    """Resuming 2 ranks' checkpoint on 1: the launcher used to announce a universal conversion for ZeRO
    stage 0 too, where the ranks load the checkpoint as saved."""
    from launch.checks import check_resume
    from pipeline.train.dist_env import DistEnv
    from pipeline.train.lifecycle import _resume_info
    from pipeline.train.resume import needs_universal

    _saved_run(tmp_path, zero_stage=zero_stage)
    one_rank = cfg(
        f"train.zero_stage={zero_stage}", "launch.nodes=1", "launch.ranks_per_node=1", f"train.run_dir={tmp_path}"
    )
    announced = check_resume(one_rank, tmp_path)
    info = _resume_info(one_rank, DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single"), tmp_path)
    said = [r.getMessage() for r in caplog.records if "resuming on 1" in r.getMessage()]
    does = "converting to a universal checkpoint" if zero_stage else "loaded as saved (ZeRO stage 0 keeps whole copies"
    assert len(said) == 1 and said[0].startswith(f"step_00000010 was saved by 2 ranks, resuming on 1: {does}")
    assert said[0] in announced  # the launcher says the very sentence the ranks log
    assert ("universal" in announced) is bool(zero_stage) is needs_universal(info, 1)


def test_resume_require_without_a_checkpoint_names_the_fix_in_the_callers_terms(tmp_path) -> None:
    from launch.checks import Refused, check_resume
    from pipeline.artifacts.checkpoints import CheckpointError
    from pipeline.train.dist_env import DistEnv
    from pipeline.train.lifecycle import _resume_info

    required = cfg("checkpoint.resume=require", f"train.run_dir={tmp_path}")
    with pytest.raises(Refused, match=r"checkpoint\.resume=require but .* has no checkpoints; pass --run-dir of"):
        check_resume(required, tmp_path)
    with pytest.raises(CheckpointError, match=r"has no checkpoints; point train\.run_dir at the run to resume"):
        _resume_info(required, DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single"), tmp_path)


def test_a_recipe_change_allowed_on_purpose_is_said_and_gives_the_new_learning_rates() -> None:
    p = plan("optim.lr=0.001", "checkpoint.allow_recipe_change=true")
    assert p.notes == [
        "optim.lr: 0.002 -> 0.001 (recipe changed on purpose (checkpoint.allow_recipe_change): the run goes on from "
        "the checkpoint's weights and optimizer state under this config; the learning rate follows this config's "
        "optim.lr, optim.min_lr and optim.schedule from here)"
    ]
    assert p.optim is not None and p.optim.lr == 0.001
    assert plan("checkpoint.allow_recipe_change=true").optim is None  # nothing changed: the checkpoint's curve


def test_a_run_dirs_saved_config_refuses_another_recipe() -> None:
    from pipeline.train.resume import RecipeChanged, check_recipe

    with pytest.raises(RecipeChanged, match=r"recipe: optim\.lr: saved 0\.002, now 0\.001\. A resumed run keeps"):
        check_recipe(SAVED, cfg("optim.lr=0.001", "train.steps=50"), source="config.yaml")
    assert check_recipe(SAVED, cfg("train.steps=50", "train.log_every=1"), source="config.yaml") == []


def test_an_allowed_learning_rate_change_reaches_the_resumed_schedule() -> None:
    from pipeline.train.batch import plan_batch
    from pipeline.train.lifecycle import TrainerState, _resumed_schedule
    from pipeline.train.recipe import make_schedule

    old = cfg()
    state = TrainerState(step=20, samples_seen=640, skipped_steps=0,
                         schedule=make_schedule(old.optim, steps=30, global_batch_size=32))  # fmt: skip
    new = cfg("optim.lr=0.001", "optim.min_lr=0.0001", "checkpoint.allow_recipe_change=true")
    s = _resumed_schedule(state, plan("optim.lr=0.001", "optim.min_lr=0.0001", "checkpoint.allow_recipe_change=true"),
                          plan_batch(new.train, 2))  # fmt: skip
    assert (s.peak_lr, s.min_lr, s.total_samples) == (0.001, 0.0001, 960)
    assert _resumed_schedule(state, plan(), plan_batch(old.train, 2)).peak_lr == 0.002
