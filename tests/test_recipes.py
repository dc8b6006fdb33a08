"""Every recipe file runs: its tiny CPU variant through the real stages, and its command line is real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kdlib.recipe import load_recipe
from kdlib.train import resolve_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["funmatch", "fkd", "plain"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_tiny(name, teacher_dir, tmp_path):
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.train import train

    recipe_file = REPO / "precompute" / f"{name}.yaml"
    train_file = REPO / "train" / f"{name}.yaml"
    for f in (recipe_file, train_file):
        first = f.read_text().splitlines()[:3]
        assert any("kdlib " in line and f"{name}.yaml" in line for line in first), f"{f} must open with its command"
    recipe = load_recipe(recipe_file)
    store = precompute(
        PrecomputeConfig(
            teacher=teacher_dir,
            data="fashion-mnist",
            out=str(tmp_path / "s"),
            recipe=str(recipe_file),
            epochs=1,
            limit=64,
            workers=0,
            chunk_views=64,
        )
    )
    assert store.meta.recipe == recipe.digest_dict() and store.meta.group_size == recipe.group_size
    cfg = resolve_config(
        {
            "out": str(tmp_path / "r"),
            "shards": str(tmp_path / "s"),
            "epochs": 1,
            "batch_size": 64 // recipe.group_size * recipe.group_size,
            "workers": 0,
            "eval": False,
        },
        {"out", "shards", "epochs", "batch_size", "workers", "eval"},
        str(train_file),
    )
    file_values = yaml.safe_load(train_file.read_text())
    assert cfg.loss == file_values["loss"] and cfg.temperature == file_values["temperature"]
    assert cfg.epochs == 1  # the flag overrides the file
    result = train(cfg)
    assert (tmp_path / "r" / "model.safetensors").is_file() and result["steps"] >= 1


def test_train_config_unknown_key_is_an_error(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("lr: 0.1\nlearning_rate: 0.1\n")
    from kdlib.errors import ConfigError

    with pytest.raises(ConfigError, match="learning_rate"):
        resolve_config({"out": "x"}, {"out"}, str(f))


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    seen = {}
    for f in sorted((REPO / "train" / "accelerate").glob("*.yaml")):
        c = load_config_from_file(str(f))
        seen[f.stem] = (str(c.distributed_type), c.num_processes, c.num_machines)
        assert re.search(r"accelerate launch --config_file train/accelerate/" + f.name, f.read_text())
    assert seen["1gpu"][1:] == (1, 1) and seen["8gpu"][1:] == (8, 1) and seen["2x8gpu"][1:] == (16, 2)
