"""Which keys are the recipe (pipeline/config/recipe.py), and the default run dir they name."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_config
from pipeline.config.recipe import changes_recipe, run_label
from pipeline.tracking import run_name_for

REPO = Path(__file__).resolve().parents[2]
VIT_B16 = REPO / "configs" / "pretrain" / "vit_b16.yaml"


def test_recipe_keys_and_execution_keys() -> None:
    recipe = ["optim.lr", "model.dim", "model.preset", "data.mixup_alpha", "train.seed", "train.steps", "launch.nodes"]
    assert [k for k in recipe if not changes_recipe(k)] == []
    execution = ["train.log_every", "tracking.uri", "launch.partition", "checkpoint.keep_last", "data.num_workers",
                 "train.run_dir", "name", "model.recompute", "checkpoint.allow_recipe_change"]  # fmt: skip
    assert [k for k in execution if changes_recipe(k)] == []


def test_two_submits_that_differ_in_a_recipe_override_get_two_run_dirs() -> None:
    a = load_config(VIT_B16, ["optim.lr=1e-3", "train.zero_stage=2"])
    b = load_config(VIT_B16, ["optim.lr=3e-4", "train.zero_stage=2"])
    assert (a.train.run_dir, b.train.run_dir) == ("runs/vit_b16-lr1e-3-zero2", "runs/vit_b16-lr3e-4-zero2")
    # ... and their MLflow runs carry the names of their dirs.
    assert run_name_for(b, ["optim.lr=3e-4", "train.zero_stage=2"]) == "vit_b16-lr3e-4-zero2"
    # The same command again: the same dir (it resumes); execution keys do not name the dir.
    again = load_config(
        VIT_B16, ["optim.lr=3e-4", "train.zero_stage=2", "train.log_every=1", "tracking.uri=http://h:1"]
    )
    assert again.train.run_dir == b.train.run_dir
    assert load_config(VIT_B16).train.run_dir == "runs/vit_b16"


def test_an_explicit_run_dir_wins_and_the_launcher_names_by_its_dotted_overrides_only() -> None:
    assert load_config(VIT_B16, ["optim.lr=3e-4", "train.run_dir=/scratch/x"]).train.run_dir == "/scratch/x"
    # launch/submit.py passes its flags (--nodes 4 -> launch.nodes=4) as overrides that do not name the run.
    cfg = load_config(VIT_B16, ["optim.lr=3e-4", "launch.nodes=4"], run_overrides=["optim.lr=3e-4"])
    assert (cfg.train.run_dir, cfg.launch.nodes) == ("runs/vit_b16-lr3e-4", 4)


def test_path_overrides_name_the_run_by_their_last_part() -> None:
    label = run_label("ft", ["finetune.init_from=/scratch/runs/vit_b16-lr3e-4/", "data.path='/data/in1k'"])
    assert label == "ft-from_vit_b16-lr3e-4-data_in1k"
