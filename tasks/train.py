"""train: launch the training program (worldpm/modeling/trainer/) the standard way, `accelerate launch`, and stream it.

* CPU (no GPU visible): one process, fp32; or train.num_processes CPU processes joined over gloo (how the
  multi-process path is tested without GPUs); with train.deepspeed.enabled, DeepSpeed's CPU accelerator.
* GPUs: num_processes = visible GPUs (or train.num_processes), bf16; with train.deepspeed.enabled a DeepSpeed
  ZeRO config generated from pipeline.yaml (stage, optimizer/parameter offload) or the named JSON file.
* Several nodes: accelerate's own options through train.accelerate_args, e.g. ``[--num_machines, '2',
  --machine_rank, '0', --main_process_ip, 10.0.0.1, --main_process_port, '29500']`` with train.num_processes set
  to the total number of processes; run the same `worldpm run --only train` on every node, with the artifacts
  folder on storage all nodes share (checkpoints live in the stage's work folder).

The program's stdout lines (progress: step/total, loss, accuracy, tokens/s, ETA) go to the stage's log (Prefect's
logs under the flow). The process runs in its own session: a timeout (train.timeout_s), Ctrl-C or a cancelled
flow kills the whole process group, not just the launcher; and it dies with this process, even on a SIGKILL of
`worldpm run` (worldpm/modeling/trainer/guard.py), while the trainer locks its work folder against a second one.
A failed run raises StageError with one line: the program's root cause (its <work>/failure.json, else the last
exception line of a worker in stderr, past torchrun's ``[rankN]:`` prefixes and the launcher's own report) and
the path of the full stderr log; the last stderr lines go to the stage's log. Its checkpoints stay in the work
folder, so rerunning the same key resumes from the newest.
"""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from worldpm.config import PipelineConfig, minilm_version
from worldpm.errors import StageError
from worldpm.store import ArtifactRef, file_digest

# knobs of other objectives: changing them does not retrain a BT model
_DPO_ONLY = ("beta", "dpo_loss", "rpo_alpha", "logp_average", "reference")
# knobs that change how a run is watched, not what it produces: passed to run() under "runtime", kept out of the key
_RUNTIME = ("timeout_s",)
NOT_IN_KEY = ("runtime",)


def stage_config(cfg: PipelineConfig) -> dict:
    """{"model": ModelConfig dump, "train": TrainConfig dump without the runtime and other objectives' knobs (the
    trainer re-validates both, defaults filling what is left out), "backbone": what else identifies the weights,
    "runtime": ...}."""
    t = cfg.train.model_dump(mode="json")
    runtime = {k: t.pop(k) for k in _RUNTIME}
    if t["objective"] == "bt":
        for k in _DPO_ONLY:
            t.pop(k)
    backbone: dict = {}
    ds = cfg.train.deepspeed
    if ds.config_file:
        p = Path(ds.config_file)
        if not p.is_file():
            raise StageError(f"train.deepspeed.config_file: no such file: {p}")
        backbone["deepspeed_config_digest"] = file_digest(p)
    if cfg.model.name_or_path == "minilm" and not cfg.model.from_config:
        backbone["minilm_package"] = minilm_version()
    # the text path the model is trained on, recorded in model/worldpm.json so that `worldpm score` / `evaluate`
    # (and anyone downstream) feed it text the same way: the normalise stage's setting (clean.normalize_markup,
    # here in the key) and the template + cut (the tokenize artifact's manifest, which its digest already covers)
    text = {"normalize_markup": cfg.clean.normalize_markup}
    return {"model": cfg.model.model_dump(mode="json"), "train": t, "backbone": backbone, "text": text,
            "runtime": runtime}


def record_text_path(model_dir: Path, text: dict | None, render: dict | None) -> None:
    """Add the text path (normalisation + render settings) to the model folder's worldpm.json. (Written here, not
    with worldpm/data/text.py's text_settings: importing it would make every edit of a normalisation rule
    retrain.)"""
    card_path = model_dir / "worldpm.json"
    if text is None or not card_path.is_file():
        return
    card = json.loads(card_path.read_text())
    markup = bool(text["normalize_markup"])
    card["text"] = {"normalize_markup": markup, "normalization": "markup" if markup else "light"}
    if render:
        card["render"] = render
    card_path.write_text(json.dumps(card, indent=2))


# ---- launch configuration -------------------------------------------------------------------------------------

def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_precision(requested: str, gpus: int) -> str:
    if requested != "auto":
        return requested
    if gpus:
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def deepspeed_config(t: dict, precision: str) -> dict:
    """A DeepSpeed ZeRO config from train.deepspeed (or the named file, used as is)."""
    ds = t["deepspeed"]
    if ds.get("config_file"):
        return json.loads(Path(ds["config_file"]).read_text())
    zero: dict = {
        "stage": ds["zero_stage"],
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if ds["zero_stage"] == 3:
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                     "stage3_gather_16bit_weights_on_model_save": True})
    if ds["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds["offload_params"]:
        if ds["zero_stage"] != 3:
            raise StageError("train.deepspeed.offload_params needs zero_stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": t["batch_size"],
        "gradient_accumulation_steps": t["grad_accum"],
        "gradient_clipping": t["max_grad_norm"],
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def accelerate_config(t: dict, gpus: int, precision: str, launch_dir: Path) -> tuple[dict, int]:
    """(accelerate config file contents, number of processes).

    Without a GPU: one process (``num_processes: auto``) or train.num_processes CPU processes, launched like GPU
    processes (torchrun) and joined over gloo (the trainer passes ``cpu=True``: accelerate's MULTI_CPU); with
    train.deepspeed.enabled, DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, fp32, no offload): slow, but the
    ZeRO code path runs where CI runs."""
    n = t["num_processes"]
    if n == "auto":
        n = max(gpus, 1)
    n = int(n)
    mp = "bf16" if precision == "bf16" else "no"
    ds = t["deepspeed"]["enabled"]
    if gpus == 0:
        if ds and (t["deepspeed"]["offload_optimizer"] or t["deepspeed"]["offload_params"]):
            raise StageError("train.deepspeed offload_optimizer/offload_params move state from a GPU to the CPU; "
                             "without a GPU there is nothing to offload: set them to false")
        if n == 1 and not ds:
            return {"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "use_cpu": True,
                    "num_processes": 1, "num_machines": 1, "mixed_precision": mp, "dynamo_config": {}}, 1
    acfg: dict = {"compute_environment": "LOCAL_MACHINE", "num_processes": n, "num_machines": 1,
                  "mixed_precision": mp, "use_cpu": False, "machine_rank": 0, "main_training_function": "main"}
    if ds:
        ds_path = launch_dir / "deepspeed.json"
        ds_path.write_text(json.dumps(deepspeed_config(t, precision), indent=2))
        acfg["distributed_type"] = "DEEPSPEED"
        # with a DeepSpeed JSON, precision is the JSON's bf16 section: accelerate refuses mixed_precision beside it
        acfg.pop("mixed_precision")
        acfg["deepspeed_config"] = {"deepspeed_config_file": str(ds_path),
                                    "zero3_init_flag": t["deepspeed"]["zero_stage"] == 3}
    else:
        # several CPU processes launch like several GPUs (torchrun); the trainer makes them MULTI_CPU (gloo)
        acfg["distributed_type"] = "MULTI_GPU" if n > 1 else "NO"
        acfg["gpu_ids"] = "all"
        acfg["use_cpu"] = gpus == 0
    return acfg, n


def launch_command(acfg_path: Path, args_path: Path, extra: list[str]) -> list[str]:
    # imported, not named in a string, so the trainer's code is part of this stage's code version (engine.py)
    from worldpm.modeling.trainer import main as program

    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acfg_path), *extra,
            "-m", program.__name__, "--args-json", str(args_path)]


# ---- running ----------------------------------------------------------------------------------------------------

def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def stream_process(cmd: list[str], log, env: dict, stderr_path: Path, timeout_s: float | None) -> tuple[int, list[str]]:
    """Run cmd in its own session; stdout lines -> log.info, stderr kept (file + last lines). (rc, stderr tail).

    The command is killed when this process dies, even by SIGKILL (guard.parent_death_command: its own session
    keeps it out of the run's process group, so nothing else would), and the trainer it launches dies with it."""
    from worldpm.modeling.trainer import guard

    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(guard.parent_death_command(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1, env=env, start_new_session=True)
    timed_out = threading.Event()

    def read_stderr() -> None:
        with open(stderr_path, "w") as f:
            for line in proc.stderr:  # type: ignore[union-attr]
                f.write(line)
                f.flush()
                line = line.rstrip()
                if line:
                    tail.append(line)
                    log.debug("trainer: %s", line)

    def watchdog() -> None:
        timed_out.set()
        _kill_group(proc)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    timer = threading.Timer(timeout_s, watchdog) if timeout_s else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            line = line.rstrip()
            if line:
                log.info("%s", line)
        rc = proc.wait()
    except BaseException:  # KeyboardInterrupt, a cancelled flow: never leave the trainer running
        _kill_group(proc)
        raise
    finally:
        if timer:
            timer.cancel()
        reader.join(timeout=10)
    if timed_out.is_set():
        raise StageError(f"train: killed after train.timeout_s={timeout_s:g}s; rerun to resume from the last "
                         "checkpoint")
    return rc, list(tail)


_EXIT = re.compile(r"returned non-zero exit status (-?\d+)|^\s*exitcode\s*:\s*(-?\d+)")
_RANK = re.compile(r"^\[(?:rank|default)\d*\]:\s?")  # torchrun's prefix of a worker's lines
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(Error|Exception|Exit|Interrupt|Failure)\b(:.*)?$")
_LAUNCHER_ERRORS = ("subprocess.CalledProcessError", "torch.distributed.elastic", "ChildFailedError")


def program_failure(rc: int, tail: list[str]) -> tuple[int, str]:
    """(the program's own exit status, its exception line): `accelerate launch` and torchrun wrap both in their
    own tracebacks (CalledProcessError, ChildFailedError) and prefix a worker's lines with ``[rankN]:``; the root
    cause is the last exception line of a worker, not the launcher's."""
    for ln in reversed(tail):
        if m := _EXIT.search(ln):
            rc = int(m.group(1) or m.group(2))
            break
    lines = [_RANK.sub("", ln).rstrip() for ln in tail]
    errors = [ln for ln in lines if _ERROR_LINE.match(ln) and not ln.startswith(_LAUNCHER_ERRORS)]
    if errors:
        return rc, errors[-1]
    plain = [ln for ln in lines if ln.strip() and not ln.startswith((" ", "Traceback", "W1", "E1", "I1"))
             and not ln.startswith(_LAUNCHER_ERRORS)]
    return rc, (plain[-1] if plain else "no error line in stderr")


def describe_exit(rc: int) -> str:
    if rc < 0 or rc in (137, 139):  # killed by a signal (torchrun reports -9, a shell 128 + 9)
        sig = -rc if rc < 0 else rc - 128
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        hint = " (the OOM killer? lower train.max_tokens_per_batch or train.batch_size)" if sig == 9 else ""
        return f"was killed by {name}{hint}"
    return f"exited with {rc}"


def run(scfg: dict, inputs: dict[str, ArtifactRef], out: Path, log, work: Path) -> dict:
    t, m = scfg["train"], scfg["model"]
    data_dir = Path(inputs["tokenize"].path)
    if not (data_dir / "train.parquet").is_file():
        raise StageError(f"train: the tokenize artifact has no train.parquet ({data_dir})")
    gpus = visible_gpus()
    if m.get("lora", {}).get("enabled") and m["lora"].get("quantize_4bit") and not gpus:
        raise StageError("train: model.lora.quantize_4bit (QLoRA, 4-bit NF4 through bitsandbytes) needs a CUDA GPU "
                         "and none is visible; set model.lora.quantize_4bit=false to train LoRA in full precision")
    precision = resolve_precision(t["precision"], gpus)
    launch_dir = work / "launch"
    launch_dir.mkdir(parents=True, exist_ok=True)
    acfg, nproc = accelerate_config(t, gpus, precision, launch_dir)
    acfg_path = launch_dir / "accelerate.yaml"
    acfg_path.write_text(yaml.safe_dump(acfg, sort_keys=False))
    ref_dir = Path(inputs["ref_logps"].path)
    if t["objective"] == "dpo" and inputs["ref_logps"].manifest().get("objective") != "dpo":
        raise StageError(f"train: objective dpo needs the reference log-probs of a dpo config; {ref_dir} has none")
    # the trainer re-validates model and train as ModelConfig / TrainConfig
    args = {"model": m, "train": t, "data_dir": str(data_dir), "tokenizer_dir": str(data_dir / "tokenizer"),
            "ref_dir": str(ref_dir), "out": str(out), "work": str(work), "precision": precision, "cpu": not gpus}
    args_path = launch_dir / "args.json"
    args["launched_at"] = time.time()  # the trainer reports its startup from here (launch -> first step)
    args_path.write_text(json.dumps(args, indent=2))
    (work / "failure.json").unlink(missing_ok=True)
    extra = list(t.get("accelerate_args") or [])
    threads = str(max(1, len(os.sched_getaffinity(0)) // nproc))  # CPU: the cores shared out over the processes
    if not gpus:  # said explicitly, or accelerate warns that it picked a default
        extra = ["--num_cpu_threads_per_process", threads] + extra
    cmd = launch_command(acfg_path, args_path, extra)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if not gpus:
        # torchrun sets OMP_NUM_THREADS=1 for each worker unless told
        env.setdefault("OMP_NUM_THREADS", threads)
        if t["deepspeed"]["enabled"]:
            env["DS_ACCELERATOR"] = "cpu"
    log.info("train: %s on %s, %d process(es), precision %s%s", t["objective"],
             f"{gpus} GPU(s)" if gpus else "CPU", nproc, precision,
             f", DeepSpeed ZeRO-{t['deepspeed']['zero_stage']}" if t["deepspeed"]["enabled"] else "")
    log.info("train: %s", " ".join(cmd))
    t0 = time.perf_counter()
    rc, tail = stream_process(cmd, log, env, launch_dir / "stderr.log", (scfg.get("runtime") or {}).get("timeout_s"))
    if rc != 0:
        failure = work / "failure.json"
        reason = json.loads(failure.read_text())["error"] if failure.exists() else None
        for line in tail[-25:]:
            log.error("trainer stderr: %s", line)
        err_path = launch_dir / "stderr.log"
        lines = err_path.read_text(errors="replace").splitlines()[-400:] if err_path.exists() else tail
        rc, last = program_failure(rc, [ln for ln in lines if ln.strip()])
        raise StageError(f"train: the training program {describe_exit(rc)}: {reason or last} "
                         f"(full log: {launch_dir / 'stderr.log'})")
    summary_path = out / "train_summary.json"
    if not summary_path.is_file() or not (out / "model" / "config.json").exists() and \
            not (out / "model" / "adapter_config.json").exists():
        raise StageError(f"train: the training program exited 0 but wrote no model/summary into {out}")
    record_text_path(out / "model", scfg.get("text"), inputs["tokenize"].manifest().get("render"))
    s = json.loads(summary_path.read_text())
    final = s.get("final") or {}
    return {
        **({"length_control": s["length_control"]} if s.get("length_control") else {}),
        "steps": s["steps"], "resumed_from_step": s["resumed_from_step"], "train_pairs": s["train_pairs"],
        "final_loss": final.get("loss"), "train_accuracy": final.get("accuracy"),
        "eval_accuracy": (s.get("eval") or {}).get("accuracy"), "tokens_per_s": s["tokens_per_s"],
        "pairs_per_s": s["pairs_per_s"], "num_processes": nproc, "precision": precision,
        "device": f"{gpus} GPU" if gpus else "cpu", "launch_seconds": round(time.perf_counter() - t0, 2),
        "launch_to_first_step_s": (s.get("startup") or {}).get("launch_to_first_step_s"),
    }
