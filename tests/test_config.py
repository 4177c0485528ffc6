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


PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_presets_say_what_their_name_says(preset):
    """Each preset validates and is the experiment its file name promises: its backbone, its objective, ZeRO-3 or
    LoRA, a real data source, and a max_length the backbone's positions hold."""
    cfg = load_config(preset)
    name = preset.stem
    assert cfg.name == name
    assert Path(cfg.artifacts_dir) == (ROOT / "artifacts").resolve()  # the presets share the project's store
    for s in cfg.sources:
        if s.kind == "hf":
            assert s.repo_id == "lvwerra/stack-exchange-paired" and (s.data_dir or s.allow_patterns)
        else:
            assert s.kind == "local" and "stack-exchange-paired" in s.path
    m, t = cfg.model, cfg.train
    if name.startswith("qwen2.5-"):
        size = name.split("-")[1].upper()
        assert m.name_or_path.startswith(f"Qwen/Qwen2.5-{size}") and m.from_config is None
        assert cfg.tokenize.system_prompt == "" and cfg.tokenize.max_length == 1024  # WorldPM's empty system turn
        assert t.precision == "bf16"
    if name.endswith("-zero3"):
        assert t.deepspeed.enabled and t.deepspeed.zero_stage == 3 and not m.lora.enabled and t.objective == "bt"
    if name.endswith("-lora"):
        assert m.lora.enabled and not t.deepspeed.enabled and t.objective == "bt"
    if name.endswith("-dpo"):
        assert t.objective == "dpo" and t.reference is None and t.deepspeed.enabled
    if name == "qwen2-0.5b-random":  # Qwen2.5-0.5B's shape, random weights, the real Qwen vocabulary
        fc = m.from_config
        assert fc["model_type"] == "qwen2" and fc["hidden_size"] == 896 and fc["num_hidden_layers"] == 24
        assert fc["vocab_size"] == 151936 and m.tokenizer and cfg.tokenize.max_length <= fc["max_position_embeddings"]
    if name == "stack-exchange-minilm":
        assert m.name_or_path == "minilm" and not t.deepspeed.enabled and cfg.tokenize.max_length <= 512
        # the CPU preset fits a small machine: small micro-batches with activation checkpointing (the 32-pair
        # micro-batch of 512 tokens needed over 21 GB), its measured memory and time written beside it
        assert t.gradient_checkpointing and t.batch_size <= 8 and t.batch_size * t.grad_accum == 32
        text = preset.read_text()
        assert "GB peak RSS" in text and "per 1,000 steps" in text
        assert not any(w in text for w in ("PEAK_RSS", "SECONDS_PER_STEP", "HOURS_PER_1000", "EPOCH_MINUTES"))


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


def test_a_missing_relative_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    """issue 12 case 12: `--source data/train.jsonl` (a typo, or the wrong folder) used to become the hub dataset
    'data/train.jsonl' and cost ~20 s of retries before failing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for text in ("data/train.jsonl", "exports/pairs.parquet", "data/reward", "data/reward@main"):
        with pytest.raises(ConfigError, match=rf"--source '{text}': no such file or directory") as e:
            source_from_cli(text)
        assert "\n" not in str(e.value) and f"hf://{text}" in str(e.value)
    assert source_from_cli("hf://owner/pairs.jsonl") == {"kind": "hf", "repo_id": "owner/pairs.jsonl"}
    assert source_from_cli("owner/name") == {"kind": "hf", "repo_id": "owner/name"}
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    assert source_from_cli("data/train.jsonl") == {"kind": "local", "path": str(tmp_path / "data" / "train.jsonl")}


def test_a_config_that_is_a_directory_or_not_utf8(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; --config takes a YAML file"):
        load_config(tmp_path)
    bad = tmp_path / "p.yaml"
    bad.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"p.yaml: not UTF-8 text \(byte 6"):
        load_config(bad)


@pytest.mark.parametrize("sets, needle", [
    (["train.eval_at={every: 5, log_points: 10}"], "not both"),
    (["evaluate.eval_sets=[{name: eval, path: x.jsonl}]"], "a set named `eval` would mix with the eval split"),
    (["evaluate.regression_watch=rb"], "not `test`, an eval set's name"),
    (["evaluate.eval_sets=[{name: rb, path: x.jsonl, category: adversarial}]",
      "evaluate.regression_watch=category:objective"], "no eval set has that category (categories: adversarial)"),
    (["train.report_to=[wandb]"], "wandb needs a network"),
    (["train.report_to=[tensorbord]"], "unknown tracker 'tensorbord'"),
    (["train.objective=dpo", "model.from_config={model_type: qwen2}", "train.eval_at={every: 5}"],
     "eval_at (evaluation during training) scores reward models"),
])
def test_eval_at_report_to_and_the_guard_watch_are_checked(sets, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, sets)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_eval_at_defaults_and_what_is_allowed():
    cfg = load_config(None, ["evaluate.eval_sets=[{name: rb, path: x.jsonl, category: adversarial}]",
                             "evaluate.regression_watch=category:adversarial", "train.report_to=[tensorboard, none]"])
    assert cfg.train.eval_at.log_points == 10 and cfg.train.evaluates_during_training
    assert cfg.train.report_to == ["tensorboard"] and cfg.evaluate.eval_sets[0].category == "adversarial"
    dpo = load_config(None, ["train.objective=dpo", "model.from_config={model_type: qwen2}"])
    assert not dpo.train.evaluates_during_training  # the default eval_at is bt's: a DPO run does not evaluate
    assert not load_config(None, ["train.eval_at={}"]).train.evaluates_during_training


def test_handing_on_gives_back_the_validated_config_for_the_same_arguments_and_text_only(tmp_path, monkeypatch):
    """config.handing_on (what `worldpm run` does around its flow): the same arguments and file text give a copy
    of the config, not validated again; other arguments, changed text or leaving the block validate as ever."""
    from worldpm.config import PipelineConfig, handing_on

    validate = PipelineConfig.model_validate.__func__
    validated = []
    monkeypatch.setattr(PipelineConfig, "model_validate",
                        classmethod(lambda cls, *a, **k: validated.append(a) or validate(cls, *a, **k)))
    path = tmp_path / "pipeline.yaml"
    path.write_text("artifacts_dir: store\ntrain: {lr: 0.001}\n")
    cfg = load_config(str(path), ["train.max_steps=3"])
    with handing_on(cfg):
        again = load_config(str(path), ["train.max_steps=3"])
        assert again == cfg and again is not cfg and again.artifacts_dir == str(tmp_path / "store")
        assert len(validated) == 1
        again.train.max_steps = 7  # a copy: what the caller holds does not change
        assert load_config(str(path), ["train.max_steps=3"]).train.max_steps == 3 == cfg.train.max_steps
        assert load_config(str(path), ["train.max_steps=4"]).train.max_steps == 4
        assert len(validated) == 2
        path.write_text("artifacts_dir: store\ntrain: {lr: 0.002}\n")
        assert load_config(str(path), ["train.max_steps=3"]).train.lr == 0.002
        assert len(validated) == 3
        path.write_text("artifacts_dir: store\ntrain: {lr: 0.001}\n")
        monkeypatch.chdir(tmp_path)  # the same arguments from another folder: validated (paths may read otherwise)
        load_config(str(path), ["train.max_steps=3"])
        assert len(validated) == 4
    load_config(str(path), ["train.max_steps=3"])
    assert len(validated) == 5
