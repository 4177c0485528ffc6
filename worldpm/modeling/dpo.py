"""Direct Preference Optimization (Rafailov et al. 2023) as a second objective of the one trainer.

The policy is a causal LM; the reference is frozen and never loaded here: its log-probs of every pair's chosen and
rejected response were computed once by the ``ref_logps`` stage (cached, keyed on the reference model and the
token ids only, so changing beta, the loss variant or the learning rate reuses them) and ride in the batch as
``ref_chosen_logps`` / ``ref_rejected_logps``. Per batch: ONE forward pass over [chosen; rejected] (the trainer's
collate), the response log-probs of both sides (logps.sequence_logps: prompt and padding masked), then

    h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
    sigmoid  -logsigmoid(beta * h)                 the DPO paper
    ipo      (h - 1 / (2 * beta))^2                Azar et al. 2023 (use train.logp_average=true as IPO does)
    hinge    relu(1 - beta * h)                    SLiC (Zhao et al. 2023)
    + rpo_alpha * NLL of the chosen response per token (RPO, Pang et al. 2024) when rpo_alpha is set

with log-probs summed over response tokens (the DPO paper, default) or averaged (train.logp_average). The
implicit reward of a response is beta * (log pi - log ref); accuracy is the fraction of pairs whose chosen reward
is above the rejected one. Statistics use the trainer's shared names (accuracy, margin = mean reward margin,
reward_chosen, reward_rejected) plus logps_chosen, logps_rejected (policy, as used in the loss) and kl: the mean
sequence log-ratio log pi - log ref over both responses, the Monte Carlo estimate of KL(pi || ref) were the
responses sampled from pi (here they come from the data, so it measures drift from the reference; 0 at step 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from worldpm.config import TrainConfig
from worldpm.modeling.logps import build_causal_lm, sequence_logps

LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), all fp32; rewards are detached."""
    pc, pr = pi_chosen.float(), pi_rejected.float()
    rc, rr = ref_chosen.to(pc.device).float(), ref_rejected.to(pc.device).float()
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        raise ValueError(f"train.dpo_loss {loss_type!r}: one of {', '.join(LOSSES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class DPO:
    """Policy pi = causal LM; loss on cached reference log-probs. Implements trainer.objectives.Objective."""

    name = "dpo"
    lora_task_type = "CAUSAL_LM"
    # statistics beyond the trainer's shared ones (loss, accuracy, margin, reward_chosen, reward_rejected)
    extra_metrics = ("logps_chosen", "logps_rejected", "kl")

    def __init__(self, t: TrainConfig):
        self.beta = t.beta
        self.loss_type = t.dpo_loss
        self.rpo_alpha = t.rpo_alpha or 0.0
        self.average = t.logp_average
        self.init_seed = t.seed

    def build_model(self, mcfg, tokenizer, dtype=None, quantization_config=None, device_map=None, device=None):
        # built in fp32 on the CPU whatever `dtype` and `device` say: a from_config policy must start from the very
        # weights the ref_logps stage's reference drew there (same seed, same generator, same dtype)
        return build_causal_lm(mcfg, tokenizer, quantization_config=quantization_config,
                               device_map=device_map, init_seed=self.init_seed)

    def policy_logps(self, model, batch: dict, return_tokens: bool = False):
        """Summed response log-probs of the B chosen rows and the B rejected rows (one forward pass)."""
        b = batch["n_pairs"]
        pl = batch["prompt_len"]
        prompt_len = torch.cat([pl, pl]) if pl.shape[0] == b else pl
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch.get("position_ids"),
                              prompt_len, return_tokens=return_tokens)

    def scores(self, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return sums / counts.clamp(min=1) if self.average else sums

    def compute(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = batch["n_pairs"]
        sums, counts = self.policy_logps(model, batch)
        pi = self.scores(sums, counts)
        ref_sums = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).to(sums.device).float()
        ref = self.scores(ref_sums, counts)
        losses, r_c, r_r = dpo_loss(pi[:b], pi[b:], ref[:b], ref[b:], self.beta, self.loss_type)
        loss = losses.mean()
        if self.rpo_alpha:
            # NLL per chosen response token, over the batch (RPO / TRL's rpo_alpha)
            loss = loss + self.rpo_alpha * (-sums[:b].sum() / counts[:b].sum().clamp(min=1))
        with torch.no_grad():
            margin = r_c - r_r
            stats = {"accuracy": (margin > 0).float().mean(), "margin": margin.mean(),
                     "reward_chosen": r_c.mean(), "reward_rejected": r_r.mean(),
                     "logps_chosen": pi[:b].detach().mean(), "logps_rejected": pi[b:].detach().mean(),
                     "kl": (sums.detach().float() - ref_sums).mean()}
        return loss, stats
