"""What several test modules share that is not a fixture (the fixtures are conftest.py's): small configs, the shared
StackExchange sample through the real stages, a logger that keeps its lines, and trainer callbacks that inject
faults or trace what each process ran (train.callbacks names them by import path: `support:CrashAfter3`)."""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import polars as pl
import torch

from tasks import PIPELINE
from worldpm.config import load_config
from worldpm.data.sources import read_source_file
from worldpm.modeling.trainer.recipe import Callback
from worldpm.store import ArtifactStore

LOG = logging.getLogger("test")
RB = Path(__file__).resolve().parent / "fixtures" / "rewardbench_small.jsonl"  # 32 RewardBench-format pairs
RB_SET = f"evaluate.eval_sets=[{{name: rb, path: {RB}, category: adversarial}}]"  # RB as an eval set
TINY_BERT = "{model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}"
TINY_QWEN = ("{model_type: qwen2, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
             "num_key_value_heads: 2, intermediate_size: 128}")


class ListLog(logging.Logger):
    """A logger that keeps every formatted line."""

    def __init__(self):
        super().__init__("capture", logging.DEBUG)
        self.lines: list[str] = []

    def _log(self, level, msg, args, *a, **k):  # noqa: D401 - capture every formatted line
        self.lines.append(msg % args if args else msg)


# ---- real data through the real stages ---------------------------------------------------------------------------

def se_pairs(se_paired: Path) -> pl.DataFrame:
    """The shared lvwerra/stack-exchange-paired sample through the real source adapter (canonical schema)."""
    frames = [read_source_file(p, "stack_exchange_paired").pairs.collect()
              for p in sorted(se_paired.rglob("*.parquet"))]
    return pl.concat(frames)


def se_shard(store: ArtifactStore, se_paired: Path, cfg, head: int | None = None):
    """A committed clean artifact (the canonical pairs) and the real shard stage over it."""
    pairs = se_pairs(se_paired)
    if head:
        pairs = pairs.head(head)
    tmp = store.new_tmp("clean", "fixture")
    pairs.write_parquet(tmp / "pairs.parquet")
    clean = store.commit("clean", "fixture", tmp, {"rows_out": pairs.height})
    return PIPELINE.execute("shard", cfg, {"clean": clean}, store, log=LOG).ref


def train_inputs(store, tok_ref) -> dict:
    """train's inputs: the tokenize artifact and ref_logps (for bt a constant marker, computed in no time)."""
    rl = PIPELINE.execute("ref_logps", load_config(None, []), {"tokenize": tok_ref}, store, log=LOG)
    return {"tokenize": tok_ref, "ref_logps": rl.ref}


def tiny_cfg(*extra: str):
    """A tiny random BERT trained a few steps of 4 pairs, a line and a checkpoint often, on the `tokenized`
    fixture's split (max_length 64: the text path the trainer records is that of its tokenize artifact)."""
    return load_config(None, [f"model.from_config={TINY_BERT}", "tokenize.max_length=64", "train.batch_size=4",
                              "train.max_steps=6",
                              "train.log_every=1", "train.checkpoint_every=2", "train.lr=1e-3",
                              "train.eval_max_pairs=16", *extra])


# Qwen's ChatML: each turn <|im_start|>role\n content <|im_end|>\n (no default system turn: worldpm adds its own)
CHATML = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{%- endif %}")


def tiny_qwen_tokenizer(d: Path) -> Path:
    """A Qwen2 tokenizer made here (no hub): byte-level BPE with no merges (a token a byte), Qwen's specials
    (pad <|endoftext|>, eos <|im_end|>) and ChatML: a tiny Qwen2 reward model's tokenizer as Qwen's instruct
    models have it (a chat template, no special tokens added around a text)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(d)
    return d


def curve(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def eval_records(out: Path) -> list[dict]:
    """A train artifact's eval_curve.jsonl (train.eval_at)."""
    return [json.loads(x) for x in (out / "eval_curve.jsonl").read_text().splitlines()]


# ---- trainer callbacks: faults and a trace ----------------------------------------------------------------------

class SimulatedCrash(BaseException):
    """What CrashAfter raises in process: the run stops where a killed one would (its checkpoints stay)."""


class CrashAfter(Callback):
    """Stops the run right after step `step` as a killed process would: in process it raises SimulatedCrash; in a
    launched run (`launched = True`) the process exits hard with code 17, writing nothing more."""

    step = 3
    launched = False

    def on_step_end(self, recipe, step):
        if step == self.step:
            if self.launched:
                os._exit(17)
            raise SimulatedCrash(f"crash after step {step} (test fault)")


class CrashAfter12Launched(CrashAfter):
    step, launched = 12, True


class SigkillAfter1(Callback):
    """A launched trainer SIGKILLs itself after step 1: killed as the OOM killer (or a user) kills it, writing nothing
    more (issue 19 case 19)."""

    def on_step_end(self, recipe, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGKILL)


class DiskFullAt1(Callback):
    """Step 1 writes to /dev/full: the kernel's ENOSPC, as a checkpoint on a full disk gets it (issue 19 case 8)."""

    def on_step_end(self, recipe, step):
        if step == 1:
            with open("/dev/full", "w") as f:
                f.write("x" * 65536)
                f.flush()


class NanAt(Callback):
    """Step `step`'s loss becomes nan (the run must stop, naming the step and the pairs)."""

    step = 2

    def on_loss(self, recipe, step, loss):
        return loss * float("nan") if step == self.step else loss


class OomAt(Callback):
    """torch's out-of-memory error in step `step`'s first micro-batch (the run must stop naming the memory knob)."""

    step = 2

    def on_micro_batch(self, recipe, step, micro, pair_ids):
        if step == self.step and micro == 0:
            raise torch.OutOfMemoryError("CUDA out of memory (test fault)")


TRACE_ENV = "WORLDPM_TEST_TRACE_DIR"  # read by this test callback, never by worldpm


class Trace(Callback):
    """Each process appends the pair ids of every micro-batch it runs to <$WORLDPM_TEST_TRACE_DIR>/rank<r>.jsonl."""

    def on_micro_batch(self, recipe, step, micro, pair_ids):
        d = Path(os.environ[TRACE_ENV])
        d.mkdir(parents=True, exist_ok=True)
        rank = recipe.accelerator.process_index
        with open(d / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "rank": rank, "micro": micro, "pair_ids": pair_ids}) + "\n")


def traced(trace_dir: Path) -> dict[tuple[int, int, int], list[str]]:
    """(step, rank, micro) -> pair ids, the last run of each (a resumed run redoes the steps after its checkpoint)."""
    seen: dict = {}
    for f in sorted(trace_dir.glob("rank*.jsonl")):
        for ln in f.read_text().splitlines():
            e = json.loads(ln)
            seen[(e["step"], e["rank"], e["micro"])] = e["pair_ids"]
    return seen


HOLD_ENV = "WORLDPM_TEST_HOLD_DIR"  # read by this test callback, never by worldpm


class HoldAfter4(Callback):
    """Every process of the node that names it (train.callbacks) stops after step 4, its checkpoint written, and
    hangs there as a stuck machine would; <$WORLDPM_TEST_HOLD_DIR>/held-<rank> says it got there (a test then kills
    that node)."""

    step = 4

    def on_step_end(self, recipe, step):
        if step == self.step:
            d = Path(os.environ[HOLD_ENV])
            d.mkdir(parents=True, exist_ok=True)
            (d / f"held-{recipe.accelerator.process_index}").touch()
            time.sleep(3600)
