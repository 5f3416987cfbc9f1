"""Tests for jaxckpt.runner.config_diff: what changed between a saved config and a live one."""


import ml_collections

from jaxckpt.runner import config_diff


def test_config_changes_compares_a_saved_config_with_a_live_one():
    live = ml_collections.ConfigDict({"model": {"fusion_dims": (64,)}, "train": {"num_steps": 600}, "seed": 0})
    saved = {"model": {"fusion_dims": [64]}, "train": {"num_steps": 400}, "data": {"target": "digit"}}
    # A tuple and the list JSON gives it back as are equal; a field one side lacks is "(absent)".
    assert config_diff.config_changes(saved, live) == [
        ("data.target", "digit", "(absent)"), ("seed", "(absent)", 0), ("train.num_steps", 400, 600)]
    assert config_diff.config_changes(live, live) == []
    assert config_diff.config_changes(None, {"a": {"b": 1}}) == [("a.b", "(absent)", 1)]
