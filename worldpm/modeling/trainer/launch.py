"""Starting the training recipe the standard way, `accelerate launch`, and supervising it.

* the recipe's one argument (args.TrainerArgs) is written here once (``<work>/launch/args.json``) and read once by
  each training process (recipe.main).
* the launch configuration: CPU (no GPU visible): one process, fp32; or train.num_processes CPU processes joined
  over gloo (how the multi-process path is tested without GPUs); with train.deepspeed.enabled, DeepSpeed's CPU
  accelerator. GPUs: num_processes = visible GPUs (or train.num_processes), bf16; with train.deepspeed.enabled a
  DeepSpeed ZeRO config generated from pipeline.yaml (stage, optimizer/parameter offload) or the named JSON file.
  Several machines: train.nodes (nodes.py) adds accelerate's own ``--num_machines/--machine_rank/
  --main_process_ip/--main_process_port``; train.num_processes is then each machine's share.
* supervision (``run``): the launcher runs in a session of its own, so a timeout (train.timeout_s), Ctrl-C or a
  cancelled flow stops the whole process group (worldpm/procs.py), not just the launcher; and it dies with the
  process that started it, even on a SIGKILL (guard.py). Its stdout lines (progress) go to the stage's log; a failed
  run is one line: the program's root cause (<work>/failure.json, else the last exception line of a worker in
  stderr, past torchrun's ``[rankN]:`` prefixes and the launcher's own report; none for a process killed by a
  signal, which writes none) and the path of the full stderr log. The last stderr lines go to the stage's log as
  detail (the run's log file and the Prefect UI; the terminal with `run --verbose`).
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import yaml
from worldpm.config import TrainConfig
from worldpm.errors import StageError
from worldpm.modeling.trainer import nodes
from worldpm.modeling.trainer.args import FAILURE, TrainerArgs
from worldpm.procs import stop_group

# ---- the launch configuration ------------------------------------------------------------------------------------

def visible_gpus(devices: list[int] | None = None) -> int:
    """GPUs this run uses: train.devices (checked against what is visible), else every visible one."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices is None:
        return n
    bad = [d for d in devices if d < 0 or d >= n]
    if bad:
        raise StageError(f"train.devices {devices}: no CUDA device {bad[0]} here ({n} visible)")
    return len(devices)


def resolve_precision(requested: str, gpus: int) -> Literal["bf16", "fp32"]:
    if requested != "auto":
        return "bf16" if requested == "bf16" else "fp32"
    if gpus:
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


def deepspeed_config(t: TrainConfig, precision: str) -> dict:
    """A DeepSpeed ZeRO config from train.deepspeed (or the named file, used as is)."""
    ds = t.deepspeed
    if ds.config_file:
        return json.loads(Path(ds.config_file).read_text())
    zero: dict = {
        "stage": ds.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if ds.zero_stage == 3:
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                     "stage3_gather_16bit_weights_on_model_save": True})
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        if ds.zero_stage != 3:
            raise StageError("train.deepspeed.offload_params needs zero_stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def accelerate_config(t: TrainConfig, gpus: int, precision: str, launch_dir: Path) -> tuple[dict, int]:
    """(accelerate config file contents, number of processes: over every machine of train.nodes).

    Without a GPU: one process (``num_processes: auto``) or train.num_processes CPU processes, launched like GPU
    processes (torchrun) and joined over gloo (the recipe passes ``cpu=True``: accelerate's MULTI_CPU); with
    train.deepspeed.enabled, DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu, fp32, no offload): slow, but the
    ZeRO code path runs where CI runs."""
    n = max(gpus, 1) if t.num_processes == "auto" else int(t.num_processes)
    machines = t.nodes.count  # several: n processes on each (nodes.py), n x machines in all
    mp = "bf16" if precision == "bf16" else "no"
    ds = t.deepspeed
    if gpus == 0:
        if ds.enabled and (ds.offload_optimizer or ds.offload_params):
            raise StageError("train.deepspeed offload_optimizer/offload_params move state from a GPU to the CPU; "
                             "without a GPU there is nothing to offload: set them to false")
        if n == 1 and machines == 1 and not ds.enabled:
            return {"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "use_cpu": True,
                    "num_processes": 1, "num_machines": 1, "mixed_precision": mp, "dynamo_config": {}}, 1
    acfg: dict = {"compute_environment": "LOCAL_MACHINE", "num_processes": n * machines, "num_machines": machines,
                  "mixed_precision": mp, "use_cpu": False, "machine_rank": t.nodes.rank,
                  "main_training_function": "main"}
    if ds.enabled:
        ds_path = launch_dir / "deepspeed.json"
        ds_path.write_text(json.dumps(deepspeed_config(t, precision), indent=2))
        acfg["distributed_type"] = "DEEPSPEED"
        # with a DeepSpeed JSON, precision is the JSON's bf16 section: accelerate refuses mixed_precision beside it
        acfg.pop("mixed_precision")
        acfg["deepspeed_config"] = {"deepspeed_config_file": str(ds_path), "zero3_init_flag": ds.zero_stage == 3}
    else:
        # several CPU processes launch like several GPUs (torchrun); the recipe makes them MULTI_CPU (gloo)
        acfg["distributed_type"] = "MULTI_GPU" if n * machines > 1 else "NO"
        acfg["gpu_ids"] = "all"
        acfg["use_cpu"] = gpus == 0
    return acfg, n * machines


def launch_command(acfg_path: Path, args_path: Path, extra: list[str]) -> list[str]:
    # imported, not named in a string, so the recipe's code is part of the train stage's code version
    from worldpm.modeling.trainer import recipe

    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(acfg_path), *extra,
            "-m", recipe.__name__, "--args-json", str(args_path)]


# ---- running and supervising --------------------------------------------------------------------------------------

def run(args: TrainerArgs, gpus: int, log, timeout_s: float | None = None) -> tuple[dict, int]:
    """Launch the recipe over `args` and wait for it: (train_summary.json, number of processes). A failure is a
    StageError with one line: the root cause and where the full log is. On a node other than node 0 of a
    multi-machine run (train.nodes, nodes.py) this launches that node's share and returns ({}, processes): the
    artifact is node 0's."""
    t = args.train
    node = t.nodes.rank
    nodes.check_accelerate_args(t.nodes, t.accelerate_args)
    launch_dir = nodes.launch_dir(args.work, node)
    launch_dir.mkdir(parents=True, exist_ok=True)
    acfg, nproc = accelerate_config(t, gpus, args.precision, launch_dir)
    local = nproc // t.nodes.count  # this machine's processes
    acfg_path = launch_dir / "accelerate.yaml"
    acfg_path.write_text(yaml.safe_dump(acfg, sort_keys=False))
    args_path = launch_dir / "args.json"
    args = args.model_copy(update={"launched_at": time.time()})  # the recipe reports its startup from here
    args_path.write_text(args.model_dump_json(indent=2))
    if node == 0:  # the run's first failure is recorded afresh (a node that joined before may not clear it)
        (args.work / FAILURE).unlink(missing_ok=True)
    extra = nodes.launch_options(t.nodes, t.deepspeed.enabled) + list(t.accelerate_args)
    # CPU: OMP_NUM_THREADS where the user set it, else the cores shared out over the processes
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, len(os.sched_getaffinity(0)) // local))
    if not gpus:  # said explicitly, or accelerate warns that it picked a default
        extra = ["--num_cpu_threads_per_process", threads] + extra
    cmd = launch_command(acfg_path, args_path, extra)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if gpus and t.devices is not None:  # pinned (a sweep point's block of GPUs): the processes see only these
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(max(t.devices) + 1)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[d] for d in t.devices)
    if not gpus:
        env["OMP_NUM_THREADS"] = threads  # torchrun sets 1 for each worker unless told
        if t.deepspeed.enabled:
            env["DS_ACCELERATOR"] = "cpu"
    where = f" on node {node} of {t.nodes.count}" if t.nodes.count > 1 else ""
    log.info("train: %s on %s, %d process(es)%s, precision %s%s", t.objective,
             f"{gpus} GPU(s)" if gpus else "CPU", local, where, args.precision,
             f", DeepSpeed ZeRO-{t.deepspeed.zero_stage}" if t.deepspeed.enabled else "")
    log.info("train: %s", " ".join(cmd), extra={DETAIL: True})  # the log file and the UI keep the command
    err_path = launch_dir / "stderr.log"
    with nodes.presence(args.work, t.nodes, local) as here:
        nodes.announce(args.work, t.nodes)
        rc, tail = stream_process(cmd, log, env, err_path, timeout_s)
        if rc != 0:
            failure = args.work / FAILURE
            try:
                recorded = json.loads(failure.read_text()) if failure.exists() else {}
            except (OSError, ValueError):  # half-written (a full disk): the stderr lines say it
                recorded = {}
            # a cause another node's rank recorded is that node's (here.blame names it), not this node's
            mine = here is None or not isinstance(recorded.get("rank"), int) or recorded["rank"] // local == node
            reason = recorded.get("error") if mine else None
            for line in tail[-25:]:  # detail: in the run's log file and the Prefect UI, on the terminal with --verbose
                log.error("trainer stderr: %s", line, extra={DETAIL: True})
            try:
                lines = err_path.read_text(errors="replace").splitlines()[-400:]
            except OSError:
                lines = []
            if len(lines) < len(tail):  # the file stopped where the disk did: the lines kept in memory go further
                lines = tail
            rc, last = program_failure(rc, [ln for ln in lines if ln.strip()])
            cause = reason or last
            if here is not None and cause:
                cause = nodes.short_error(cause)
            message = (f"the training program {describe_exit(rc)}{f': {cause}' if cause else ''} "
                       f"(full log: {err_path})")
            if here is not None:
                here.failed(cause or describe_exit(rc))
                other = here.blame()
                if other is not None:
                    message = (f"{other}; so {here.describe(node, None)} stopped too: {message}; rerun every node "
                               "to resume from the last checkpoint")
            raise StageError(f"train: {message}")
        if here is not None:
            here.done()
    if node != 0:
        return {}, nproc
    summary_path = args.out / "train_summary.json"
    if not summary_path.is_file() or not (args.out / "model" / "config.json").exists() and \
            not (args.out / "model" / "adapter_config.json").exists():
        raise StageError(f"train: the training program exited 0 but wrote no model/summary into {args.out}")
    return json.loads(summary_path.read_text()), nproc


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
        f = _open_or_none(stderr_path)
        for line in proc.stderr:  # type: ignore[union-attr]
            if f is not None:
                try:
                    f.write(line)
                    f.flush()
                except OSError:  # a full disk: keep draining the pipe (a full pipe would stall the trainer)
                    f = None
            line = line.rstrip()
            if line:
                tail.append(line)
                log.debug("trainer: %s", line)
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()

    def watchdog() -> None:
        timed_out.set()
        stop_group(proc, grace=10.0)

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
        stop_group(proc, grace=10.0)
        raise
    finally:
        if timer:
            timer.cancel()
        reader.join(timeout=10)
    if timed_out.is_set():
        raise StageError(f"train: killed after train.timeout_s={timeout_s:g}s; rerun to resume from the last "
                         "checkpoint")
    return rc, list(tail)


def _open_or_none(path: Path):
    try:
        return open(path, "w")
    except OSError:
        return None


# what the trainer wrote to stderr, besides its exception: logged as detail (worldpm/cli.py shows it with --verbose)
DETAIL = "worldpm_detail"
_EXIT = re.compile(r"returned non-zero exit status (-?\d+)|^\s*exitcode\s*:\s*(-?\d+)"
                   r"|died with <Signals\.\w+: (\d+)>")  # the launcher's report (a signal: its number)
_RANK = re.compile(r"^\[(?:rank|default)\d*\]:\s?")  # torchrun's prefix of a worker's lines
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(Error|Exception|Exit|Interrupt|Failure)\b(:.*)?$")
_LAUNCHER_ERRORS = ("subprocess.CalledProcessError", "torch.distributed.elastic", "ChildFailedError")


def program_failure(rc: int, tail: list[str]) -> tuple[int, str]:
    """(the program's own exit status, its exception line): `accelerate launch` and torchrun wrap both in their
    own tracebacks (CalledProcessError, ChildFailedError) and prefix a worker's lines with ``[rankN]:``; the root
    cause is the last exception line of a worker, not the launcher's."""
    for ln in reversed(tail):
        if m := _EXIT.search(ln):
            rc = int(m.group(1) or m.group(2)) if m.group(3) is None else -int(m.group(3))
            break
    if rc < 0 or rc in (137, 139):  # killed by a signal: it wrote no error of its own; its last lines are not why
        return rc, ""
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
