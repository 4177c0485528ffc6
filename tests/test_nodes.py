"""Training across machines (train.nodes, worldpm/modeling/trainer/nodes.py): what is in the key, the launch
options, which node a failure names; and (launched) two "nodes" on this host, two gloo processes each, node 0 the
train stage and node 1 `worldpm train-node`: the loss curve of one node with the same global batch, a killed node
ends the other with one line, and a rerun of both resumes from the checkpoint."""
from __future__ import annotations

import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from support import HOLD_ENV, LOG, ListLog, curve
from tasks import PIPELINE as pipeline
from tasks import train as train_stage
from worldpm.config import key_dict, load_config
from worldpm.errors import ConfigError, StageError
from worldpm.modeling.trainer import launch, nodes
from worldpm.procs import free_port
from worldpm.store import ArtifactStore

HANG_GUARD = 600  # seconds: a guard against a hang, never a performance bound

TWO = ["train.nodes.count=2", "train.nodes.main_address=10.0.0.1"]


def test_the_key_holds_the_node_count_not_where_a_node_stands():
    key = lambda *o: key_dict(train_stage.stage_config(load_config(None, list(o))))  # noqa: E731
    node0 = key(*TWO)
    assert node0 == key(*TWO, "train.nodes.rank=1", "train.nodes.main_address=node-a", "train.nodes.main_port=1234",
                        "train.nodes.timeout_s=30")
    assert node0 != key() and node0["train"]["nodes"] == {"count": 2}
    for bad, needle in ((["train.nodes.count=2"], "needs main_address"),
                        ([*TWO, "train.nodes.rank=2"], "rank 2 is not below count 2")):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, bad)


def test_launch_options_are_accelerates_own(tmp_path):
    t = load_config(None, [*TWO, "train.nodes.rank=1", "train.num_processes=2"]).train
    assert nodes.launch_options(t.nodes) == [
        "--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.0.0.1", "--main_process_port",
        "29500", "--rdzv_backend", "static", "--rdzv_conf", "timeout=600"]
    assert nodes.launch_options(t.nodes, deepspeed=True)[-2:] == ["--deepspeed_multinode_launcher", "standard"]
    acfg, n = launch.accelerate_config(t, 0, "fp32", tmp_path)
    assert (n, acfg["num_processes"], acfg["num_machines"], acfg["machine_rank"]) == (4, 4, 2, 1)
    # one CPU process on each of two machines is a distributed run too
    acfg, n = launch.accelerate_config(load_config(None, TWO).train, 0, "fp32", tmp_path)
    assert (n, acfg["distributed_type"]) == (2, "MULTI_GPU")
    assert nodes.launch_options(load_config(None).train.nodes) == []
    with pytest.raises(StageError, match="train.accelerate_args has --machine_rank"):
        nodes.check_accelerate_args(t.nodes, ["--machine_rank=1"])


def test_a_failure_names_the_node_that_caused_it(tmp_path):
    """Node 0's view after its processes failed: the rank that recorded a cause of its own names its node; one that
    only saw the others go is no cause; a node whose lock is free without an outcome died; one never came."""
    cfg = load_config(None, TWO).train.nodes
    here = nodes.Presence(tmp_path, cfg, local_processes=2)
    with here:
        assert "never joined" in here.blame(settle=0) and "worldpm train-node --rank 1" in here.blame(settle=0)
        other = nodes.Presence(tmp_path, cfg.model_copy(update={"rank": 1}), local_processes=2)
        with other:  # node 1 runs (holds its lock): no blame yet, it may still report
            (tmp_path / "failure.json").write_text(json.dumps({"error": "ValueError: bad batch", "rank": 3}))
            assert here.blame(settle=0).endswith("failed first, at rank 3: ValueError: bad batch")
            assert here.blame(settle=0).startswith("node 1 of 2 (ranks 2-3, pid ")
            (tmp_path / "failure.json").write_text(json.dumps({"error": "ValueError: mine", "rank": 1}))
            assert here.blame(settle=0) is None
            peer = "RuntimeError: [pair.cc:553] Connection closed by peer [127.0.0.1]:5006. This is typically..."
            (tmp_path / "failure.json").write_text(json.dumps({"error": peer, "rank": 0}))
            other.failed("TrainingStop: out of memory at step 3")
            assert here.blame(settle=0).endswith("failed: TrainingStop: out of memory at step 3")
            other._write(state="running")
        assert re.match(r"node 1 of 2 \(ranks 2-3, pid \d+ on .+\) died: its processes ended without a word",
                        here.blame(settle=0))
        with pytest.raises(StageError, match="node 0 of 2 .* is already running"):
            nodes.Presence(tmp_path, cfg, local_processes=2).__enter__()
    assert nodes.short_error(peer) == "RuntimeError: Connection closed by peer [127.0.0.1]:5006"
    assert nodes.Presence(tmp_path, cfg, local_processes=1).describe(1, None) == "node 1 of 2 (rank 1)"


def test_node_0_announces_its_key_while_it_trains(tmp_path):
    """A node that resolved another key (another config) hears of it at once, and an announcement of a run that
    ended says nothing."""
    cfg = load_config(None, TWO).train.nodes
    work = tmp_path / "train" / ".work-abc"
    with nodes.Presence(work, cfg, local_processes=1):
        nodes.announce(work, cfg)
        assert nodes.announced(tmp_path / "train", cfg) == ".work-abc"
        assert nodes.announced(tmp_path / "train", cfg.model_copy(update={"main_port": 1})) is None
    assert nodes.announced(tmp_path / "train", cfg) is None


# ---- launched: two nodes on this host ------------------------------------------------------------------------------

def _project(tmp_path: Path, se_paired: Path) -> Path:
    """The coffee pairs, a tiny BERT without dropout (processes and accumulation give the same curve) and with
    large initial weights (a curve far from flat at ln 2 from step 1), steps of 8 pairs: 2 nodes x 2 processes x 2
    pairs, a checkpoint at step 4."""
    coffee = se_paired / "reward" / "coffee.stackexchange.com-00000-of-00001.parquet"
    data = {
        "name": "two-nodes", "artifacts_dir": "artifacts",
        "sources": [{"kind": "local", "path": str(coffee), "format": "stack_exchange_paired"}],
        "shard": {"train": 0.8, "eval": 0.1, "test": 0.1, "min_split_pairs": 0},
        "tokenize": {"max_length": 64, "num_proc": 1, "batch_size": 64},
        "model": {"from_config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "intermediate_size": 64, "hidden_dropout_prob": 0.0,
                                  "attention_probs_dropout_prob": 0.0, "initializer_range": 0.5}},
        "train": {"batch_size": 2, "num_processes": 2, "max_steps": 8, "log_every": 1, "checkpoint_every": 4,
                  "warmup_ratio": 0.0, "lr": 1.0e-3, "eval_max_pairs": 8,
                  "nodes": {"count": 2, "main_address": "127.0.0.1", "main_port": free_port(), "timeout_s": 120}},
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return tmp_path / "pipeline.yaml"


def _node1(cfg_path: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    exe = shutil.which("worldpm") or str(Path(sys.executable).parent / "worldpm")
    return subprocess.Popen([exe, "train-node", "--config", str(cfg_path), "--rank", "1", "--poll", "0.5", *extra],
                            cwd=cfg_path.parent, env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _trainers_in(work: Path) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        with_work = any(str(work) in a for a in (p.info["cmdline"] or []))
        if with_work:
            out.append(p.info["pid"])
    return out


@pytest.mark.slow
@pytest.mark.launch
def test_two_nodes_train_as_one_end_together_and_resume(tmp_path, se_paired, monkeypatch, in_process_trainer):
    cfg_path = _project(tmp_path, se_paired)
    two = load_config(cfg_path)
    store = ArtifactStore(two.artifacts_dir)
    refs = {r["stage"]: r for r in pipeline.run(two, store, until="ref_logps")}
    inputs = {s: store.get(s, refs[s]["key"]) for s in ("tokenize", "ref_logps")}

    # the reference: one node, one process, the same 8 pairs a step as 4 accumulated micro-batches (in process)
    one = load_config(cfg_path, ["train.nodes.count=1", "train.num_processes=1", "train.grad_accum=4"])
    with monkeypatch.context() as m:
        m.setattr(launch, "run", in_process_trainer)
        ref = pipeline.execute("train", one, inputs, store, log=LOG)

    # 1. node 1 hangs after its step-4 checkpoint and is killed outright (its supervisor, hence all its processes):
    # node 0 ends at once with one line that names node 1
    hold = tmp_path / "hold"
    node1 = _node1(cfg_path, "--set", "train.callbacks=[support:HoldAfter4]", env={HOLD_ENV: str(hold)})
    with ThreadPoolExecutor(1) as pool:
        node0 = pool.submit(pipeline.execute, "train", two, inputs, store, log=ListLog())
        deadline = time.monotonic() + HANG_GUARD
        while not ((hold / "held-2").exists() and (hold / "held-3").exists()):
            assert node1.poll() is None and not node0.done(), (node1.poll(), node0.done() and node0.exception())
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.killpg(node1.pid, signal.SIGKILL)
        node1.wait()
        with pytest.raises(StageError) as failed:
            node0.result(timeout=HANG_GUARD)
    line = str(failed.value)
    assert "\n" not in line, line
    assert re.match(r"train: node 1 of 2 \(ranks 2-3, pid \d+ on [^)]+\) died: its processes ended without a word",
                    line), line
    assert "so node 0 of 2 (ranks 0-1) stopped too" in line and "rerun every node to resume" in line, line
    work = store.work_dir("train", pipeline.resolve("train", two, inputs)[0])
    deadline = time.monotonic() + 60
    while _trainers_in(work):  # every process of both nodes is gone (the parent-death chain, guard.py)
        assert time.monotonic() < deadline, _trainers_in(work)
        time.sleep(0.5)

    # 2. both nodes again: they resume from the step-4 checkpoint and finish; the curve is the one-node curve
    node1 = _node1(cfg_path)
    log = ListLog()
    res = pipeline.execute("train", two, inputs, store, log=log)
    out, _ = node1.communicate(timeout=HANG_GUARD)
    assert node1.returncode == 0, out
    assert "train-node 1/2: joining train" in out and "train-node 1/2: done" in out
    assert res.manifest["num_processes"] == 4 and res.manifest["resumed_from_step"] == 4
    assert any("2 process(es) on node 0 of 2" in ln for ln in log.lines)
    assert any("--num_machines 2 --machine_rank 0 --main_process_ip 127.0.0.1" in ln for ln in log.lines)
    a, b = curve(Path(ref.ref.path)), curve(Path(res.ref.path))
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 9))
    assert [m["pairs"] for m in b] == [m["pairs"] for m in a] and b[0]["pairs"] == 8
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], atol=2e-4, rtol=0)
    assert max(abs(m["loss"] - np.log(2)) for m in a) > 0.05  # not flat
