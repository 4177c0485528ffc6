"""pipeline.yaml is typed: unknown keys and bad values are errors that name the key; --set overrides."""
from __future__ import annotations

from pathlib import Path

import pytest

from worldpm.config import ConfigError, load_config, source_from_cli

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_pipeline_yaml_is_the_offline_demo():
    cfg = load_config(ROOT / "pipeline.yaml")
    assert [s.kind for s in cfg.sources] == ["demo"]
    assert cfg.model.name_or_path == "minilm"
    assert Path(cfg.artifacts_dir).is_absolute()


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_validate(preset):
    load_config(preset)


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("clean:\n  min_chars: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key `clean.min_chars`"):
        load_config(f)


def test_bad_value_is_named(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("shard:\n  train: 0.5\n")
    with pytest.raises(ConfigError, match=r"train \+ eval \+ test must be 1"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"`train.batch_size`"):
        load_config(None, ["train.batch_size=zero"])


def test_set_overrides_and_relative_paths(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("sources:\n  - kind: local\n    path: data/x.jsonl\nclean:\n  min_margin: 1\n")
    cfg = load_config(f, ["clean.min_margin=2.5", "clean.chosen.max_chars=100", "sources.0.name=mine"])
    assert cfg.clean.min_margin == 2.5 and cfg.clean.chosen.max_chars == 100
    assert cfg.sources[0].path == str(tmp_path / "data/x.jsonl") and cfg.sources[0].tag() == "mine"
    assert cfg.artifacts_dir == str(tmp_path / "artifacts")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(f, ["clean.min_margin"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_source_from_cli(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("{}\n")
    assert source_from_cli(str(f)) == {"kind": "local", "path": str(f)}
    assert source_from_cli("lvwerra/stack-exchange-paired@main") == {
        "kind": "hf", "repo_id": "lvwerra/stack-exchange-paired", "revision": "main"}
    with pytest.raises(ConfigError, match="no such file"):
        source_from_cli("./nope.jsonl")
