"""One training run across several machines, started the standard way (docs/training.md, "Several nodes").

``train.nodes: {count, rank, main_address, main_port, timeout_s}`` in pipeline.yaml. Node 0 runs the pipeline;
its train stage launches its share of the processes with accelerate's own multi-machine options
(``launch_options``: ``--num_machines/--machine_rank/--main_process_ip/--main_process_port``, torchrun's static
rendezvous). Every other node runs ``worldpm train-node --rank R`` (this module's CLI; under Slurm ``srun`` starts
one per node and the rank is ``SLURM_NODEID``) on the same config: it resolves the same stage key from the shared
artifact store (only ``count`` of train.nodes is in the key), so every node works in the same work folder, and
launches the same recipe with its own machine rank. Only global rank 0 holds the trainer's lock (guard.py),
writes checkpoints' shared files, the metrics and the model, and only node 0 commits the artifact.

A node that dies ends the run on every node with one line. Its processes' sockets close, so the others' next
collective fails at once (one that drops off the network is seen after ``timeout_s``, torch's process-group
timeout), and each node's supervisor (``Presence``: an flock on ``<work>/launch/nodes/node-<k>.lock`` for its life,
a record ``node-<k>.json`` of its host, pid, ranks and outcome) names the node to blame: the one whose rank wrote
the run's failure.json first, else one whose lock was released without a recorded outcome (killed, or the machine
went down), else one that recorded its own failure. A rerun of every node resumes from the newest checkpoint
(save.resume: rank 0 picks it, every rank loads that one).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import IO, Iterator

from worldpm.config import NodesConfig
from worldpm.errors import ConfigError, StageError
from worldpm.modeling.trainer.args import FAILURE

SETTLE_S = 20.0        # after a failure: how long to wait for the other nodes' outcome before naming one
MULTI_MACHINE_FLAGS = ("--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port",
                       "--rdzv_backend", "--rdzv_conf", "--same_network")
# what a process sees when another one of the run is gone: not a cause of its own
_PEER = re.compile(r"closed by peer|reset by peer|broken pipe|connection (?:refused|reset|closed)|ECONNRESET|"
                   r"DistNetworkError|DistStoreError|DistBackendError|timed? ?out|Socket Timeout|NCCL.*(?:abort|"
                   r"timeout|remote)|recvBytes|sendBytes|Read error|Write error", re.IGNORECASE)


# ---- the launch ----------------------------------------------------------------------------------------------------

def launch_options(nodes: NodesConfig, deepspeed: bool = False) -> list[str]:
    """accelerate launch's own multi-machine options for this node ([] on one machine): torchrun's static
    rendezvous on node 0's address; each node starts its own processes (DeepSpeed's `standard` launcher: no pdsh,
    no ssh), and waits ``timeout_s`` for the others to join."""
    if nodes.count == 1:
        return []
    opts = ["--num_machines", str(nodes.count), "--machine_rank", str(nodes.rank),
            "--main_process_ip", str(nodes.main_address), "--main_process_port", str(nodes.main_port),
            "--rdzv_backend", "static", "--rdzv_conf", f"timeout={int(nodes.timeout_s)}"]
    if deepspeed:
        opts += ["--deepspeed_multinode_launcher", "standard"]
    return opts


def check_accelerate_args(nodes: NodesConfig, accelerate_args: list[str]) -> None:
    if nodes.count > 1:
        clash = [a for a in accelerate_args if a.split("=", 1)[0] in MULTI_MACHINE_FLAGS]
        if clash:
            raise StageError(f"train.accelerate_args has {clash[0]}: with train.nodes.count > 1 the machines are "
                             "train.nodes' (count, rank, main_address, main_port); remove accelerate's multi-machine "
                             "options from train.accelerate_args")


def launch_dir(work: Path, rank: int) -> Path:
    """Where a node's launch files go (accelerate.yaml, args.json, stderr.log): node 0's at <work>/launch, every
    other node's beside them, so that no node overwrites another's."""
    return work / "launch" if rank == 0 else work / "launch" / f"node-{rank}"


# ---- presence: who runs, who died -----------------------------------------------------------------------------------

def _records(work: Path) -> Path:
    return work / "launch" / "nodes"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    """Written whole or not at all (another node may read it at any time): a temporary file renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _lock_free(path: Path) -> bool:
    """Whether nobody holds the flock on `path` (its holder's process is gone: the kernel, or the NFS server once
    the client is gone, released it). Taken and released at once when free."""
    try:
        fh = open(path, "a+")
    except OSError:
        return True
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return True


def short_error(message: str) -> str:
    """An error line without the C++ source location and the advice torch's communication libraries append
    (``RuntimeError: [.../gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:50068. This is
    typically caused by ...`` -> ``RuntimeError: Connection closed by peer [10.0.0.2]:50068``)."""
    message = re.sub(r"\[[^\]\s]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", message)
    return re.split(r"\.\s+(?=This is typically|Check the logs|Please |To debug)", message, maxsplit=1)[0]


def peer_error(message: str | None) -> bool:
    """Whether an error line is what a process sees when another process of the run is gone (a closed socket, a
    store or collective timeout) rather than a cause of its own."""
    return bool(message) and bool(_PEER.search(message))


class Presence:
    """This node's presence in a multi-node run: an flock held for the life of the supervisor, and a record of its
    host, pid, global ranks and outcome that the other nodes read when the run fails."""

    def __init__(self, work: Path, nodes: NodesConfig, local_processes: int):
        self.work, self.nodes = Path(work), nodes
        self.dir = _records(self.work)
        self.rank, self.count, self.local = nodes.rank, nodes.count, local_processes
        self._lock: IO[str] | None = None

    def ranks(self, node: int) -> tuple[int, int]:
        return node * self.local, (node + 1) * self.local - 1

    def describe(self, node: int, rec: dict | None) -> str:
        first, last = self.ranks(node)
        where = f", pid {rec['pid']} on {rec['host']}" if rec else ""
        ranks = f"ranks {first}-{last}" if last > first else f"rank {first}"
        return f"node {node} of {self.count} ({ranks}{where})"

    def record(self, node: int) -> dict | None:
        return _read_json(self.dir / f"node-{node}.json")

    def alive(self, node: int) -> bool:
        return not _lock_free(self.dir / f"node-{node}.lock")

    def _write(self, **state) -> None:
        with contextlib.suppress(OSError):  # node 0 may have committed and removed the work folder already
            _write_json(self.dir / f"node-{self.rank}.json", {
                "node": self.rank, "count": self.count, "host": socket.gethostname(), "pid": os.getpid(),
                "ranks": list(self.ranks(self.rank)), **state})

    def __enter__(self) -> "Presence":
        self.dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.dir / f"node-{self.rank}.lock", "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            rec = self.record(self.rank)
            raise StageError(f"train: {self.describe(self.rank, rec)} is already running in {self.work}: one process "
                             "per node rank (is --rank right on every node?)") from None
        self._lock = fh
        if self.rank == 0:  # records of an earlier attempt whose node is not running now say nothing about this one
            for k in range(1, self.count):
                if self.record(k) is not None and not self.alive(k):
                    (self.dir / f"node-{k}.json").unlink(missing_ok=True)
        self._write(state="running", started=time.time())
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def done(self) -> None:
        self._write(state="done")

    def failed(self, error: str) -> None:
        self._write(state="failed", error=error)

    # ---- which node to blame ------------------------------------------------------------------------------------
    def _settle(self, timeout: float) -> None:
        """Wait (up to `timeout`) until every other node has an outcome, or is gone, or never came."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [k for k in range(self.count) if k != self.rank
                       and (rec := self.record(k)) is not None and rec.get("state") == "running" and self.alive(k)]
            if not pending:
                return
            time.sleep(0.25)

    def blame(self, settle: float = SETTLE_S) -> str | None:
        """What ended the run, when another node did: one phrase, e.g. ``node 1 of 2 (ranks 2-3, pid 812 on gpu7)
        died: its processes ended without a word (killed, or the machine went down)``; None when the cause is this
        node's own (or none is known).

        The run's failure.json is written by the first process that fails (O_EXCL): a cause of its own (an
        exception, a nan, out of memory) names its rank, hence its node. A process that merely saw another go (a
        closed socket, a timeout) is no cause; then the node whose lock was released without an outcome died, and
        one that recorded a failure of its own failed."""
        if self.count == 1:
            return None
        cause = _read_json(self.work / FAILURE) or {}
        first, error = cause.get("rank"), cause.get("error")
        if isinstance(first, int) and error and not peer_error(error):
            node = first // self.local
            if node == self.rank:
                return None
            return f"{self.describe(node, self.record(node))} failed first, at rank {first}: {error}"
        self._settle(settle)
        others = [k for k in range(self.count) if k != self.rank]
        records = {k: self.record(k) for k in others}
        for k in others:
            rec = records[k]
            if rec is None:
                return (f"{self.describe(k, None)} never joined (no `worldpm train-node --rank {k}` reached "
                        f"{self.work}: the same config and --set values on every node?)")
            if rec.get("state") == "running" and not self.alive(k):
                return (f"{self.describe(k, rec)} died: its processes ended without a word (killed, or the machine "
                        "went down)")
        for k in others:
            rec = records[k] or {}
            if rec.get("state") == "failed" and not peer_error(rec.get("error")):
                return f"{self.describe(k, rec)} failed: {rec.get('error')}"
        return None


@contextlib.contextmanager
def presence(work: Path, nodes: NodesConfig, local_processes: int) -> Iterator[Presence | None]:
    """This node's Presence for a multi-node run; None (nothing written) on one machine."""
    if nodes.count == 1:
        yield None
        return
    with Presence(work, nodes, local_processes) as p:
        yield p


# ---- node 0's announcement: which key it trains at which address ----------------------------------------------------

def _announcement(stage_dir: Path, nodes: NodesConfig) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{nodes.main_address}-{nodes.main_port}")
    return stage_dir / f".nodes-{safe}.json"


def announce(work: Path, nodes: NodesConfig) -> None:
    """Node 0 says which work folder (key) it trains at its rendezvous address, so that a node that resolved
    another key (another config) says so at once rather than wait for stages that never come."""
    if nodes.count > 1 and nodes.rank == 0:
        with contextlib.suppress(OSError):
            _write_json(_announcement(work.parent, nodes), {"work": work.name, "host": socket.gethostname(),
                                                            "pid": os.getpid(), "at": time.time()})


def announced(stage_dir: Path, nodes: NodesConfig) -> str | None:
    """The work folder name node 0 announced for this rendezvous address, while node 0 trains there (its node lock
    is held: an announcement of a run that ended, however it ended, says nothing)."""
    rec = _read_json(_announcement(stage_dir, nodes))
    if not rec or not rec.get("work"):
        return None
    return rec["work"] if not _lock_free(stage_dir / rec["work"] / "launch" / "nodes" / "node-0.lock") else None


# ---- `worldpm train-node` ------------------------------------------------------------------------------------------

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
    import logging

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
