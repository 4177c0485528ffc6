"""One training run across several machines, started the standard way (docs/training.md, "Several nodes").

``train.nodes: {count, rank, main_address, main_port, timeout_s}`` in pipeline.yaml. Node 0 runs the pipeline;
its train stage launches its share of the processes with accelerate's own multi-machine options
(``launch_options``: ``--num_machines/--machine_rank/--main_process_ip/--main_process_port``, torchrun's static
rendezvous). Every other node runs ``worldpm train-node --rank R`` (worldpm/train_node.py; under Slurm ``srun`` starts
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

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import IO, Iterator

from worldpm.config import NodesConfig
from worldpm.errors import StageError
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
