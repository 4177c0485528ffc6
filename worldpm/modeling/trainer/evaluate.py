"""The held-out (eval) split scored at the end of training, sharded over the processes, for train_summary.json."""
from __future__ import annotations

import math

import numpy as np
import torch

from worldpm.modeling.trainer.data import collate_pairs, cut_micro_batches
from worldpm.modeling.trainer.step import to_device


@torch.no_grad()
def evaluate_split(model, objective, data, accelerator, pad_id: int, bs: int, max_pairs: int,
                   layout=None, max_tokens: int | None = None) -> dict | None:
    """{pairs, loss, accuracy} of the first max_pairs pairs of `data` (0: all), or None without pairs.

    Every pair once: contiguous length-sorted batches of ``bs`` pairs, or of ``max_tokens`` tokens as in training
    (train.max_tokens_per_batch: the memory limit holds here too), batch i on process i % P (no wrap-around
    duplicates). Works under ZeRO-3: every process runs every forward (a process with fewer batches reruns its
    first, uncounted)."""
    if data is None:
        return None
    n = len(data) if not max_pairs else min(len(data), max_pairs)
    if n == 0:
        return None
    pad_multiple = 8 if accelerator.device.type == "cuda" else None
    order = np.argsort(-data.pair_len[:n], kind="stable")
    packed = layout is not None and layout.packed
    cost = data.packed_len[:n] if packed else None
    batches = cut_micro_batches(order, data.pair_len[:n], bs, max_tokens, cost)
    P, r = accelerator.num_processes, accelerator.process_index
    mine = batches[r::P]
    rounds = math.ceil(len(batches) / P)
    was = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, correct, pairs
    for i in range(rounds):
        real = i < len(mine)
        idx = (mine[i] if real else batches[0]).tolist()
        batch = (layout.collate(data, idx, pad_id) if layout is not None
                 else collate_pairs(data, idx, pad_id, pad_to_multiple_of=pad_multiple))
        batch.pop("pair_ids")
        batch = to_device(batch, accelerator.device)
        with accelerator.autocast():
            loss, stats = objective.compute(model, batch)
        if real:
            sums += torch.stack([loss.detach().double() * len(idx), stats["accuracy"].double() * len(idx),
                                 torch.tensor(float(len(idx)), dtype=torch.float64, device=sums.device)])
    sums = accelerator.reduce(sums, reduction="sum")
    if was:
        model.train()
    return {"pairs": int(sums[2]), "loss": float(sums[0] / sums[2]), "accuracy": float(sums[1] / sums[2])}
