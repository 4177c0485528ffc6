"""The sweep's config model and grid (worldpm/sweep.py) and its report (worldpm/report/sweep.py): figure, alpha by
model and set, failed points named. The flow that runs the points is phase 2 of issue 21."""
from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from worldpm.config import load_config
from worldpm.errors import ConfigError
from worldpm.modeling.eval_curve import EvalPoint
from worldpm.report.figures import plot_eval_curves, plot_grad_norm
from worldpm.report.markdown import image_links
from worldpm.report.sweep import PointOutcome, alpha_table, sweep_fits, write_sweep_report
from worldpm.report.trainlog import grad_norm_spikes
from worldpm.sweep import SweepConfig, expand, point_configs

SETS = {"rb-chat-hard": "adversarial", "offset-bias": "adversarial", "math": "objective", "mt-bench": "subjective"}
# per model: alpha of each category (the paper: adversarial falls, objective only for the larger model, subjective
# flat)
ALPHA = {"tiny-a": {"adversarial": 0.06, "objective": 0.0, "subjective": 0.0},
         "tiny-b": {"adversarial": 0.1, "objective": 0.05, "subjective": 0.0}}


def curve_points(model: str, seed: int, steps=(4, 8, 16, 32, 64, 128, 256, 512)) -> tuple[EvalPoint, ...]:
    rng = np.random.default_rng(seed)
    out = []
    for s in steps:
        d = 16 * s
        for name, cat in SETS.items():
            loss = (30.0 / d) ** ALPHA[model][cat] * 0.69 / (30.0 / 64) ** ALPHA[model][cat]
            out.append(EvalPoint(step=s, pairs_seen=d, tokens_seen=3000 * s, set=name, subset=None, category=cat,
                                 n=200, bt_loss=float(loss * np.exp(rng.normal(0, 0.004))), accuracy=0.6,
                                 lc_accuracy=0.55))
    return tuple(out)


# ---- config and grid ------------------------------------------------------------------------------------------------
def test_grid_of_bundles_and_keys_expands_to_points_with_overrides():
    sweep = SweepConfig.model_validate({"axes": {
        "model": [{"label": "tiny-a", "set": {"model.name_or_path": "minilm", "train.batch_size": 8}},
                  {"label": "tiny-b", "set": {"model.name_or_path": "minilm", "train.batch_size": 4}}],
        "train.lr": [1.0e-5, 3.0e-5]}})
    points = expand(sweep)
    assert [p.label for p in points] == ["tiny-a, train.lr=1e-05", "tiny-a, train.lr=3e-05",
                                         "tiny-b, train.lr=1e-05", "tiny-b, train.lr=3e-05"]
    assert points[1].overrides == ("model.name_or_path=minilm", "train.batch_size=8", "train.lr=3.0e-05")
    assert points[1].coords == {"model": "tiny-a", "train.lr": "3e-05"}
    pcs = point_configs(sweep, lambda ov: load_config(None, ov), "worldpm")
    cfg = pcs[1][1]
    assert (cfg.train.lr, cfg.train.batch_size, cfg.name) == (3e-5, 8, "worldpm-tiny-a_train.lr-3e-05")
    assert len({c.name for _, c in pcs}) == 4  # history and the regression guard stay per point


def test_bad_sweeps_are_one_line_errors():
    with pytest.raises(ValidationError, match="a sweep cannot vary artifacts_dir"):
        SweepConfig.model_validate({"axes": {"artifacts_dir": ["a", "b"]}})
    with pytest.raises(ValidationError, match="has no values"):
        SweepConfig.model_validate({"axes": {"train.lr": []}})
    with pytest.raises(ValidationError, match="mixes"):
        SweepConfig.model_validate({"axes": {"m": [{"label": "a", "set": {"train.lr": 1}}, 3]}})
    with pytest.raises(ValidationError, match="unknown|Extra inputs"):
        SweepConfig.model_validate({"axes": {"train.lr": [1]}, "grid": {}})
    clash = SweepConfig.model_validate({"axes": {"m": [{"label": "a", "set": {"train.lr": 1.0}}],
                                                 "train.lr": [2.0]}})
    with pytest.raises(ConfigError, match="two axes set train.lr"):
        expand(clash)
    bad = SweepConfig.model_validate({"axes": {"train.epochs": [1, -3]}})
    with pytest.raises(ConfigError, match=r"sweep point 'train.epochs=-3': .*train.epochs"):
        point_configs(bad, lambda ov: load_config(None, ov), "worldpm")


# ---- report ---------------------------------------------------------------------------------------------------------
def test_sweep_report_fits_every_model_and_names_the_failed_point(tmp_path):
    outcomes = [PointOutcome("tiny-a", "ok", curve_points("tiny-a", 0), keys={"train": "a" * 20}),
                PointOutcome("tiny-b", "ok", curve_points("tiny-b", 1), keys={"train": "b" * 20}),
                PointOutcome("tiny-c", "failed", error="train: CUDA out of memory at step 3 (log: /x/train.log)")]
    fits = sweep_fits(outcomes)
    assert fits.by_category
    for model, per in ALPHA.items():
        for (m, cat), (fit, _) in fits.panels.items():
            if m == model:
                assert abs(fit.alpha - per[cat]) < 0.02, (m, cat, fit)
                assert fit.flat == (per[cat] == 0.0), (m, cat, fit)
    table = alpha_table(outcomes, fits)
    assert table[0] == ["set", "category", "tiny-a", "tiny-b", "tiny-c"]
    assert [r[:2] for r in table[1:]] == [["offset-bias", "adversarial"], ["rb-chat-hard", "adversarial"],
                                          ["math", "objective"], ["mt-bench", "subjective"]]
    assert all(r[4] == "failed" for r in table[1:])
    math_row = table[3]
    assert math_row[2].endswith("flat") and not math_row[3].endswith("flat")  # objective: only the larger falls

    res = write_sweep_report("sizes", outcomes, tmp_path, ["png"])
    assert res["failed"] == ["tiny-c"]
    png = tmp_path / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    md = (tmp_path / "report.md").read_text()
    assert "3 points, 2 finished, **1 failed: tiny-c**" in md
    assert "- **tiny-c**: train: CUDA out of memory at step 3" in md
    assert image_links(md) == ["sweep.png"]
    assert "| category | tiny-a | tiny-b |" in md and "\n| objective | " in md  # a row per category
    saved = json.loads((tmp_path / "fits.json").read_text())
    assert saved["panels_are"] == "categories" and len(saved["sets"]) == 8


def test_eval_curve_and_grad_norm_figures(tmp_path):
    pts = list(curve_points("tiny-b", 2))
    rows = [{"step": s, "loss": 0.69 - 0.0005 * s, "pairs": 16, "grad_norm": 1.0 + (4.0 if s == 300 else 0.0)}
            for s in range(2, 513, 2)]
    assert plot_eval_curves(rows, pts, tmp_path, ["png"]) == ["eval_curves.png"]
    spikes = grad_norm_spikes([r["step"] for r in rows], [r["grad_norm"] for r in rows])
    assert [s.step for s in spikes] == [300]
    assert plot_grad_norm(rows, spikes, tmp_path, ["png"]) == ["grad_norm.png"]
    assert plot_eval_curves(rows, [], tmp_path, ["png"]) == []  # no records: no figure
    for f in ("eval_curves.png", "grad_norm.png"):
        assert (tmp_path / f).stat().st_size > 10000


def test_slot_plan_pins_points_to_disjoint_devices_and_runs_cpu_points_one_at_a_time():
    from worldpm.sweep import plan_slots

    plan = plan_slots([4, 4, 2, 2, 1], [0, 1, 2, 3, 4, 5, 6, 7], host="node-a")
    assert plan.devices == [(0, 1, 2, 3), (4, 5, 6, 7), (0, 1), (2, 3), (4,)]
    assert plan.limits == {f"worldpm-node-a-gpu-{d}": 1 for d in range(8)}
    assert plan.per_point[2] == ("worldpm-node-a-gpu-0", "worldpm-node-a-gpu-1")
    cpu = plan_slots([1, 1, 2], None, host="laptop")
    assert cpu.limits == {"worldpm-laptop-cpu": 1} and cpu.per_point == [("worldpm-laptop-cpu",)] * 3
    assert cpu.devices == [None] * 3
    with pytest.raises(ConfigError, match="sweep point 2 runs 4 GPU processes; this host has 2 GPU"):
        plan_slots([1, 4], [0, 1])


def test_slot_plan_on_a_real_prefect_server_holds_devices_all_or_nothing(prefect_api_url):
    """What the sweep flow will do with the plan: upsert the limits, then each point holds its devices through
    prefect.concurrency.sync.concurrency. Points on disjoint devices hold them at once; a point whose devices are
    held is refused (here: a timeout) and takes none of its slots meanwhile."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    from worldpm.sweep import plan_slots

    plan = plan_slots([2, 2, 1], [0, 1, 2, 3], host=f"test-{uuid.uuid4().hex[:8]}")
    assert plan.devices == [(0, 1), (2, 3), (0,)]
    with get_client(sync_client=True) as client:
        for name, slots in plan.limits.items():
            client.upsert_global_concurrency_limit_by_name(name, slots)

        def active() -> dict[str, int]:
            return {n[-5:]: client.read_global_concurrency_limit_by_name(n).active_slots for n in plan.limits}

        with concurrency(list(plan.per_point[0]), occupy=1, strict=True):
            with concurrency(list(plan.per_point[1]), occupy=1, strict=True):
                assert active() == {"gpu-0": 1, "gpu-1": 1, "gpu-2": 1, "gpu-3": 1}
                with pytest.raises(TimeoutError):
                    with concurrency(list(plan.per_point[2]), occupy=1, strict=True, timeout_seconds=2):
                        pass
        assert active() == {"gpu-0": 0, "gpu-1": 0, "gpu-2": 0, "gpu-3": 0}
        with concurrency(list(plan.per_point[2]), occupy=1, strict=True):
            assert active()["gpu-0"] == 1


# ---- the sweep flow end to end through a real Prefect server --------------------------------------------------
def _qwen(hidden: int) -> dict:
    return {"model_type": "qwen2", "hidden_size": hidden, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 2 * hidden}


def _sweep_config(tmp_path, models: list[dict]):
    """The demo data, two tiny random Qwen2 sizes (the MiniLM tokenizer: one tokenize for both), a few steps with
    evaluation at 4 log-spaced points over the eval split and a RewardBench-format set of category adversarial."""
    import yaml
    from pathlib import Path

    rb = Path(__file__).resolve().parent / "fixtures" / "rewardbench_small.jsonl"
    cfg = {"name": "sw", "artifacts_dir": "artifacts", "sources": [{"kind": "demo", "rows": 120}],
           "shard": {"min_split_pairs": 0}, "tokenize": {"max_length": 64, "num_proc": 1},
           "train": {"batch_size": 4, "max_steps": 6, "log_every": 1, "checkpoint_every": 100, "lr": 1e-3,
                     "eval_at": {"log_points": 4}},
           "evaluate": {"batch_size": 16, "eval_sets": [{"name": "rb", "path": str(rb), "category": "adversarial"}]},
           "plot": {"formats": ["png"]},
           "sweep": {"axes": {"model": models}}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.slow
def test_sweep_of_two_tiny_qwen2_sizes_through_a_real_prefect_server(tmp_path, prefect_api_url):
    """`worldpm_sweep` on a real Prefect server: both points train with evaluation during training and the report
    fits and draws them; the second run is all cache hits; a third point made to fail (a nan loss) leaves the other
    two's results and a report that names it."""
    from pathlib import Path

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.sweep import worldpm_sweep

    two = [{"label": "q32", "set": {"model.from_config": _qwen(32)}},
           {"label": "q64", "set": {"model.from_config": _qwen(64)}}]
    path = _sweep_config(tmp_path, two)
    first = worldpm_sweep(config_path=str(path))
    assert first["failed"] == [] and [p["label"] for p in first["points"]] == ["q32", "q64"]
    assert all(p["eval_points"] == 4 and p["stages"]["train"] == "ran" for p in first["points"])
    tokenize = {p["stages"]["tokenize"] for p in first["points"]}
    assert tokenize == {"ran", "cached"}  # one tokenize for both sizes: the second point found it cached
    report = Path(first["report"]).read_text()
    assert "2 points, 2 finished" in report and "![Sweep" in report and "| rb | adversarial |" in report
    assert (Path(first["report"]).parent / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    second = worldpm_sweep(config_path=str(path))
    assert all(set(p["stages"].values()) == {"cached"} for p in second["points"]), second["points"]
    assert [p["keys"] for p in second["points"]] == [p["keys"] for p in first["points"]]

    broken = two + [{"label": "q48-nan", "set": {"model.from_config": _qwen(48), "train.callbacks": ["support:NanAt"]}}]
    third = worldpm_sweep(config_path=str(_sweep_config(tmp_path, broken)))
    assert third["failed"] == ["q48-nan"]
    ok = {p["label"]: p for p in third["points"] if p["status"] == "ok"}
    assert sorted(ok) == ["q32", "q64"] and all(set(p["stages"].values()) == {"cached"} for p in ok.values())
    failed = next(p for p in third["points"] if p["status"] == "failed")
    assert "non-finite loss" in failed["error"] and "\n" not in failed["error"]
    report = Path(third["report"]).read_text()
    assert "3 points, 2 finished, **1 failed: q48-nan**" in report and "## Failed points" in report
    assert "- **q48-nan**: " in report and "non-finite loss" in report
    with get_client(sync_client=True) as client:  # the report is the run's Prefect artifact too
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sw-sweep"])),
                                     sort=ArtifactSort.CREATED_DESC, limit=1)
    assert arts and "q48-nan" in arts[0].data and "data:image/png;base64," in arts[0].data


def test_worldpm_sweep_without_a_sweep_section_is_one_line(tmp_path, capsys):
    from flows.cli import main

    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("name: plain\n")
    assert main(["sweep", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("worldpm: config error:") and "no `sweep:` section" in err and "\n" not in err
    cfg.write_text("name: plain\nsweep: {axes: {train.lr: [1.0e-5, 1.0e-5]}}\n")
    assert main(["sweep", "--config", str(cfg)]) == 2
    assert "repeated value" in capsys.readouterr().err
