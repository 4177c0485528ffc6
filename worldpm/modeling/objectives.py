"""Training objectives. One trainer, pluggable losses: an objective builds its model and turns a batch into a loss.

``bt`` (Bradley-Terry reward model) is here; ``dpo`` (dpo.py) plugs in the same way: a causal-LM ``build_model``
and a ``compute`` over the same chosen+rejected batch (log-probs of the response tokens against cached reference
log-probs), sharing batching, checkpoints, resume, logging and the launch.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from worldpm.config import TrainConfig
from worldpm.modeling import models, packing
from worldpm.modeling.length import decorrelation_penalty


class Objective(Protocol):
    name: str

    def build_model(self, mcfg: dict, tokenizer, dtype: torch.dtype | None = None,
                    quantization_config: Any = None, device_map: Any = None, device: Any = None) -> torch.nn.Module:
        ...

    def compute(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar fp32 loss: the mean over the batch's pairs, per-batch statistics as detached 0-d tensors).

        The trainer weights each micro-batch by its pair count, so a step's loss is the mean over all its pairs."""
        ...


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
            center_rewards_coef: float = 0.0, weight: torch.Tensor | None = None,
            offset: torch.Tensor | None = None) -> torch.Tensor:
    """mean(weight * -logsigmoid(r_c - r_r [- margin] [+ offset])) in fp32, plus coef * mean((r_c + r_r)^2).

    The margin term (Llama-2 style) asks the gap to exceed the pair's preference strength; pairs without a margin
    (nan) get 0. Reward centering (Eisenstein et al. 2023, TRL's center_rewards_coefficient) keeps rewards near 0.
    ``weight`` (per pair, mean 1 over the split: length_balance reweight) and ``offset`` (per pair, a fixed expert's
    logit added to the margin: length_debias poe) come from worldpm/modeling/length.py; both are per pair, so the
    loss does not depend on how pairs are batched."""
    rc, rr = r_chosen.float(), r_rejected.float()
    diff = rc - rr
    if margin is not None:
        diff = diff - torch.nan_to_num(margin.float(), nan=0.0)
    if offset is not None:
        diff = diff + offset.to(diff.device).float()
    per_pair = -F.logsigmoid(diff)
    if weight is not None:
        per_pair = per_pair * weight.to(diff.device).float()
    loss = per_pair.mean()
    if center_rewards_coef:
        loss = loss + center_rewards_coef * ((rc + rr) ** 2).mean()
    return loss


class BradleyTerry:
    """Reward model r(x, y): one forward pass over [chosen; rejected], the BT loss on r_c - r_r."""

    name = "bt"

    def __init__(self, t: TrainConfig):
        self.margin_in_loss = t.margin_in_loss
        self.center_rewards_coef = t.center_rewards_coef
        # length_debias decorrelate: a penalty on the margin variance the length difference explains, per
        # micro-batch (length.py); logged as length_penalty
        self.decorrelate = t.length_debias_coef if t.length_debias == "decorrelate" else 0.0
        self.extra_metrics = ("length_penalty",) if self.decorrelate else ()

    def build_model(self, mcfg, tokenizer, dtype=None, quantization_config=None, device_map=None, device=None):
        return models.build_reward_model(mcfg, tokenizer, dtype=dtype, quantization_config=quantization_config,
                                         device_map=device_map, device=device)

    def rewards(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen rewards, rejected rewards) of a padded batch (collate_pairs) or a packed one (collate_packed:
        it has ``seq_last``)."""
        if "seq_last" in batch:
            r = packing.forward_scores_packed(model, batch)
        else:
            r = models.forward_scores(model, batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
        b = batch["n_pairs"]
        return r[:b], r[b:]

    def compute(self, model, batch):
        rc, rr = self.rewards(model, batch)
        margin = batch["margin"].to(rc.device) if self.margin_in_loss else None
        loss = bt_loss(rc, rr, margin, self.center_rewards_coef, weight=batch.get("weight"),
                       offset=batch.get("length_offset"))
        diff = rc.float() - rr.float()
        extra = {}
        if self.decorrelate and "length_diff" in batch:
            penalty = decorrelation_penalty(diff, batch["length_diff"])
            loss = loss + self.decorrelate * penalty
            extra["length_penalty"] = penalty.detach()
        elif self.decorrelate:  # (the eval split carries no length_diff: nothing to penalise)
            extra["length_penalty"] = torch.zeros((), device=rc.device)
        with torch.no_grad():
            d = diff.detach()
            stats = {"accuracy": (d > 0).float().mean(), "margin": d.mean(),
                     "reward_chosen": rc.float().mean(), "reward_rejected": rr.float().mean(), **extra}
        return loss, stats


from worldpm.modeling.dpo import DPO  # noqa: E402  (dpo.py imports nothing from here)

OBJECTIVES = {"bt": BradleyTerry, "dpo": DPO}


def build_objective(t: TrainConfig | dict) -> Objective:
    """The objective of train.objective, configured from the train section (a TrainConfig or its dict)."""
    t = t if isinstance(t, TrainConfig) else TrainConfig.model_validate(t)
    return OBJECTIVES[t.objective](t)
