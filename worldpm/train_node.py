"""`worldpm train-node`: node R (1 .. train.nodes.count-1) of a training run that spans several machines joins the
run node 0's train stage launched (worldpm/modeling/trainer/nodes.py has the how). A command module of its own, so
that the train stage, which imports nodes.py, does not import the CLI: its code version follows what it imports."""
from __future__ import annotations

import argparse
import logging
import os
import time

from worldpm.errors import ConfigError, StageError
from worldpm.modeling.trainer.nodes import announced


def node_rank(arg: int | None) -> int:
    if arg is not None:
        return arg
    slurm = os.environ.get("SLURM_NODEID")
    if slurm is not None and slurm.isdigit():
        return int(slurm)
    raise ConfigError("train-node needs --rank R (1 .. train.nodes.count-1), or SLURM_NODEID (srun sets it)")


def cmd_train_node(args) -> int:
    """Join node 0's training run: resolve the train stage's inputs and key from the shared store (waiting while
    node 0 makes them), then launch this node's processes (tasks/train.py's join)."""
    from worldpm.cli import _config_path
    from worldpm.config import load_config
    from worldpm.engine import cached_only, resolve
    from worldpm.store import ArtifactStore

    rank = node_rank(args.rank)
    path = _config_path(args.config)
    cfg = load_config(path, list(args.set or []) + [f"train.nodes.rank={rank}"])
    nodes = cfg.train.nodes
    if nodes.count == 1:
        raise ConfigError("train.nodes.count is 1: there is no other node to join; set train.nodes.count (and "
                          "main_address) in the config every node uses")
    if rank == 0:
        raise ConfigError("node 0 runs the pipeline (`worldpm run`, or a deployment): its train stage launches node "
                          "0's share; `worldpm train-node` is for ranks 1 .. count-1")
    pipeline, stage = args.pipeline, args.pipeline["train"]
    if stage.spec.join is None:
        raise ConfigError("the train stage cannot be joined from another node")
    store = ArtifactStore(cfg.artifacts_dir)
    me = f"train-node {rank}/{nodes.count}"
    deadline = time.monotonic() + args.wait if args.wait else None
    said = None
    while True:
        refs, missing = {}, None
        for name in pipeline.ancestors("train"):
            st = pipeline[name]
            try:
                refs[name] = cached_only(st, cfg, {u: refs[u] for u in st.upstream}, store).ref
            except StageError:
                missing = name
                break
        if missing is None:
            inputs = {u: refs[u] for u in stage.upstream}
            key, scfg = resolve(stage, cfg, inputs)
            if store.get("train", key) is not None:
                print(f"{me}: train {key} is already committed ({store.path('train', key)}): nothing to join",
                      flush=True)
                return 0
            theirs = announced(store.root / "train", nodes)
            if theirs is None or theirs == f".work-{key}":
                break
            msg = (f"node 0 trains {theirs[len('.work-'):]} at {nodes.main_address}:{nodes.main_port}, this node's "
                   f"config gives {key}: run every node with the same config and --set values")
            raise StageError(f"{me}: {msg}")
        if said != missing:
            print(f"{me}: waiting for stage {missing} of this config in {store.root} (node 0's run makes it)",
                  flush=True)
            said = missing
        if deadline is not None and time.monotonic() > deadline:
            raise StageError(f"{me}: stage {missing} of this config is still not in {store.root} after --wait "
                             f"{args.wait:g}s: is node 0 running the same config on the same shared artifacts_dir?")
        time.sleep(args.poll)
    work = store.work_dir("train", key)
    print(f"{me}: joining train {key} at {nodes.main_address}:{nodes.main_port} (work folder {work})", flush=True)
    log = logging.getLogger("worldpm.train-node")
    # the trainer's stderr lines (marked as detail) are in the log file the failure line names: the terminal gets
    # the line, not 25 lines before it
    log.addFilter(lambda record: not getattr(record, "worldpm_detail", False))
    stage.spec.join(scfg, inputs, log, work)
    print(f"{me}: done; node 0 commits the model", flush=True)
    return 0


def register(sub) -> None:
    """`worldpm train-node` (a subparsers object of the worldpm CLI, whose parser carries the pipeline)."""
    p = sub.add_parser(
        "train-node", help="join a training run that spans several machines, on a node other than node 0",
        description="Node R (1 .. train.nodes.count-1) of a multi-machine training run: with the same config and "
                    "--set values as node 0 (which runs `worldpm run` or a deployment), on the same shared "
                    "artifacts_dir, wait for the train stage's inputs, then launch this node's processes (`accelerate "
                    "launch --machine_rank R`) into node 0's run. Under Slurm, `srun` starts one per node and the "
                    "rank is SLURM_NODEID. Exit 1 with one line naming the node that failed or died.")
    p.add_argument("--config", "-c", metavar="FILE", help="pipeline.yaml (default: ./pipeline.yaml if present)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="the same overrides as node 0's (repeatable); train.nodes.rank is --rank's")
    p.add_argument("--rank", type=int, default=None, help="this node's rank (default: $SLURM_NODEID)")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="give up if node 0 has not made the train stage's inputs after this long (default: wait)")
    p.add_argument("--poll", type=float, default=5.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train_node)
