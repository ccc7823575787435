"""What a resumed run may change: every key that differs from the checkpoint's config is honoured
(and said) or refused (naming the key, both values and the fix). Nothing is ignored silently.

One rule, :func:`plan_resume`, called by the launcher before anything is queued
(launch/checks.py) and by every rank before its first step (pipeline/train/lifecycle.py). It reads
only configs: no torch, so the launcher stays light. The same two callers share
:func:`require_checkpoint` (``checkpoint.resume=require`` with nothing to resume) and
:func:`needs_universal` / :func:`world_size_change` (what a resume at another world size does), so
what the launcher announces is what the ranks do.

- Honoured, logged: where and how the run executes (tracking, launch, logging/eval/checkpoint
  cadence, device, threads, loader workers, gradient checkpointing, offload, torch.compile).
- Honoured with a stated rule: ``train.steps`` (the remaining learning-rate decay is re-stretched
  from the current learning rate to the new end, see recipe.Schedule.stretch); the global batch at
  another world size or micro batch (kept at the checkpoint's, the accumulation re-derived).
- Refused: everything else, the recipe (pipeline/config/recipe.py: the model, the optimizer, the data
  and augmentation, precision, seed), because a run that changes its recipe mid-way is no longer the
  run it claims to be; unless ``checkpoint.allow_recipe_change`` (the launcher's
  ``--allow-recipe-change``) says the change is on purpose, then each change is a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts.checkpoints import CheckpointError, ResumeInfo
from pipeline.config import Config, OptimConfig, config_from_dict, flatten
from pipeline.config.recipe import changes_recipe
from pipeline.train.batch import plan_batch

# Launch and model keys the comparison judges by what they give: the world size by the global batch
# (kept, see _keep_global_batch), model.preset by the model.* keys it expands to.
_SAFE_ON_RESUME = frozenset({"launch.nodes", "model.preset"})
# Honoured, with what it does to the run said in the log.
_NOTED = {
    "data.num_workers": "the rest of the current epoch is re-split over the new loader slots (another order, "
    "exact again from the next epoch)",
    "data.shuffle_buffer": "the rest of the current epoch is re-split (another order, exact from the next epoch)",
    "finetune.init_from": "not used: a resumed run takes its weights from the checkpoint",
    "finetune.head_init": "not used: a resumed run takes its weights from the checkpoint",
}
# Judged by what they give (the global batch, see _keep_global_batch; the end step), not key by key.
_PLANNED_KEYS = frozenset({"train.micro_batch_size", "train.grad_accum", "train.global_batch_size", "train.steps"})


_ALLOWED = (
    "recipe changed on purpose (checkpoint.allow_recipe_change): the run goes on from the checkpoint's weights and "
    "optimizer state under this config; the learning rate follows this config's optim.lr, optim.min_lr and "
    "optim.schedule from here"
)


class ResumeRefused(CheckpointError):
    """The config asks for a change a resumed run cannot honour."""


class RecipeChanged(ResumeRefused):
    """The config changes the run's recipe; ``checkpoint.allow_recipe_change`` would allow it."""

    ALLOW = (
        "to go on with the change on purpose, set checkpoint.allow_recipe_change=true (launcher: --allow-recipe-change)"
    )


@dataclass(frozen=True)
class ResumePlan:
    global_batch_size: int  # the checkpoint's, kept
    steps: tuple[int, int]  # (checkpoint's train.steps, this config's)
    safe: list[str]  # honoured changes that alter nothing computed (logged as info)
    notes: list[str]  # honoured changes that alter the run, with their rule (logged as warnings)
    optim: OptimConfig | None = None  # the learning rates to go on with: a recipe changed on purpose

    @property
    def steps_changed(self) -> bool:
        return self.steps[0] != self.steps[1]


def require_checkpoint(
    info: ResumeInfo | None, cfg: Config, run_dir: Path, *, fix: str = "point train.run_dir at the run to resume"
) -> None:
    """Raise CheckpointError when ``checkpoint.resume=require`` finds nothing to resume; ``fix`` says how,
    in the caller's terms (the launcher's ``--run-dir``, the ranks' ``train.run_dir``)."""
    if info is None and cfg.checkpoint.resume == "require":
        raise CheckpointError(f"checkpoint.resume=require but {run_dir} has no checkpoints; {fix}")


def needs_universal(info: ResumeInfo, world_size: int) -> bool:
    """Whether the checkpoint must be converted to a universal one before loading.

    ZeRO stages 1-3 cut the optimizer state (stage 3 the weights too) into one file per rank, which
    another world size cannot load as saved; stage 0 keeps whole copies, which load on any world size.
    """
    return info.world_size != world_size and info.zero_stage > 0


def world_size_change(info: ResumeInfo, world_size: int) -> str | None:
    """What resuming ``info`` on ``world_size`` ranks does, said the same by the launcher and the ranks."""
    if info.world_size == world_size:
        return None
    head = f"{info.tag} was saved by {info.world_size} ranks, resuming on {world_size}"
    if needs_universal(info, world_size):
        return f"{head}: converting to a universal checkpoint"
    return f"{head}: loaded as saved (ZeRO stage 0 keeps whole copies, no conversion needed)"


def plan_resume(
    saved: dict[str, Any] | None, cfg: Config, *, saved_world_size: int, world_size: int, step: int
) -> ResumePlan:
    """Compare ``cfg`` with the checkpoint's resolved config ``saved`` (trainer_state.json's "config").

    Raises ResumeRefused naming every refused key; otherwise returns the global batch to keep and a
    note per honoured change. ``step`` is the checkpoint's step (for the train.steps rule).
    """
    if not isinstance(saved, dict):
        return _unchecked(cfg, world_size)
    old_cfg = config_from_dict(saved, source="the checkpoint's trainer_state.json")
    safe, notes, refused = _sort_changes(old_cfg, cfg)
    allowed = _allowed(refused, cfg)
    notes += allowed
    was = plan_batch(old_cfg.train, saved_world_size)
    gb = _keep_global_batch(was.global_batch_size, cfg, saved_world_size, world_size)
    steps = (old_cfg.train.steps, cfg.train.steps)
    if steps[0] != steps[1]:
        notes.append(_steps_note(steps, step))
    accum = gb // (cfg.train.micro_batch_size * world_size)
    if (was.micro_batch_size, was.grad_accum, saved_world_size) != (cfg.train.micro_batch_size, accum, world_size):
        notes.append(
            f"global batch kept at the checkpoint's {gb} = {cfg.train.micro_batch_size} x accumulation {accum} x "
            f"{world_size} ranks (saved as {was.micro_batch_size} x {was.grad_accum} x {saved_world_size} ranks)"
        )
    return ResumePlan(global_batch_size=gb, steps=steps, safe=safe, notes=notes, optim=cfg.optim if allowed else None)


def check_recipe(saved: dict[str, Any], cfg: Config, *, source: str) -> list[str]:
    """A run dir's saved config (``source``, its config.yaml) against ``cfg``, before a job starts in it
    without a checkpoint: the same refusal as a resume's, so a run dir never holds two recipes.
    Returns a note per change allowed by ``checkpoint.allow_recipe_change``."""
    _, _, refused = _sort_changes(config_from_dict(saved, source=source), cfg)
    return _allowed(refused, cfg, was="saved")


def _sort_changes(old_cfg: Config, cfg: Config) -> tuple[list[str], list[str], list[tuple[str, Any, Any]]]:
    """Each key that differs: honoured (safe), honoured by a stated rule (notes) or refused (the recipe)."""
    old, new = flatten(old_cfg), flatten(cfg)
    safe, notes, refused = [], [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b or key in _PLANNED_KEYS:
            continue
        change = f"{key}: {a!r} -> {b!r}"
        if key in _NOTED:
            notes.append(f"{change} ({_NOTED[key]})")
        elif not changes_recipe(key) or key in _SAFE_ON_RESUME:
            safe.append(f"{change} (honoured)")
        else:
            refused.append((key, a, b))
    return safe, notes, refused


def _allowed(refused: list[tuple[str, Any, Any]], cfg: Config, was: str = "checkpoint") -> list[str]:
    """Refuse recipe changes, or (checkpoint.allow_recipe_change) say each one."""
    if refused and not cfg.checkpoint.allow_recipe_change:
        raise RecipeChanged(_refusal(refused, was))
    return [f"{k}: {a!r} -> {b!r} ({_ALLOWED})" for k, a, b in refused]


def _unchecked(cfg: Config, world_size: int) -> ResumePlan:
    """A checkpoint whose trainer_state.json records no config (written by hand or by a foreign tool)."""
    note = (
        "the checkpoint's trainer_state.json records no config: changed keys cannot be checked, and the "
        "global batch is this config's"
    )
    steps = (cfg.train.steps, cfg.train.steps)
    return ResumePlan(
        global_batch_size=plan_batch(cfg.train, world_size).global_batch_size, steps=steps, safe=[], notes=[note]
    )


def _refusal(refused: list[tuple[str, Any, Any]], was: str = "checkpoint") -> str:
    listed = "; ".join(f"{k}: {was} {a!r}, now {b!r}" for k, a, b in refused)
    back = " ".join(f"{k}={_cli(a)}" for k, a, _ in refused)
    return (
        f"resuming would change the run's recipe: {listed}. A resumed run keeps the model, optimizer, data and "
        f"augmentation of its checkpoint; set them back ({back}) to resume it, or pass another train.run_dir to "
        f"start a new run (finetune.init_from=<this run dir> starts from its weights)"
    )


def _cli(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_cli(v) for v in value) + "]"
    return str(value)


def _steps_note(steps: tuple[int, int], step: int) -> str:
    old, new = steps
    if new <= step:
        return (
            f"train.steps: {old} -> {new} (honoured): the checkpoint is already at step {step}, so nothing is left "
            f"to train; the run ends at step {step} (final evaluation and export)"
        )
    return (
        f"train.steps: {old} -> {new} (honoured): the run now ends at step {new}; the learning rate's remaining "
        f"decay is re-stretched from its current value at step {step} to optim.min_lr at step {new} (warmup kept)"
    )


def _keep_global_batch(saved_gb: int, cfg: Config, saved_world_size: int, world_size: int) -> int:
    """The checkpoint's global batch, with the accumulation re-derived; refuse when it cannot be kept."""
    t = cfg.train
    per_pass = t.micro_batch_size * world_size
    where = f"train.micro_batch_size={t.micro_batch_size} x {world_size} ranks (= {per_pass})"
    if t.global_batch_size and t.global_batch_size != saved_gb:
        raise ResumeRefused(
            f"train.global_batch_size={t.global_batch_size} but the checkpoint trained with a global batch of "
            f"{saved_gb}; the global batch is part of the recipe: set train.global_batch_size={saved_gb} (or 0 to "
            f"keep the checkpoint's), or pass another train.run_dir to start a new run"
        )
    if t.grad_accum and t.grad_accum * per_pass != saved_gb:
        raise ResumeRefused(
            f"train.grad_accum={t.grad_accum} x {where} gives a global batch of {t.grad_accum * per_pass}, but the "
            f"checkpoint trained with {saved_gb}; set train.grad_accum=0 to re-derive the accumulation"
        )
    if saved_gb % per_pass:
        ranks = [n for n in range(1, saved_gb // t.micro_batch_size + 1) if saved_gb % (t.micro_batch_size * n) == 0]
        fixes = [f"resume on {' or '.join(map(str, ranks[-3:]))} ranks"] if ranks else []
        micro = [m for m in range(t.micro_batch_size, 0, -1) if saved_gb % (m * world_size) == 0]
        fixes += [f"set train.micro_batch_size={micro[0]}"] if micro else []
        raise ResumeRefused(
            f"the checkpoint's global batch {saved_gb} (saved by {saved_world_size} ranks) is not a multiple of "
            f"{where}, so it cannot be kept; {', or '.join(fixes + ['pass another train.run_dir to start a new run'])}"
        )
    return saved_gb
