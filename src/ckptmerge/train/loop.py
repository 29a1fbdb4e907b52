"""The step loop shared by ``ckptmerge train`` and the reproduction: one optimizer step, then the callbacks.

    state = TrainState(model, make_optimizer(model, config), step=0, averagers={"ema": EMA(decay=0.99)})
    run_steps(config, state, load_tokens(config.data), [on_step])   # on_step(state, record) -> True stops
    saved = state.state_dict()           # weights, optimizer, averagers, step, RNG: copies, safe to keep
    state.load_state_dict(saved)         # ... and the same trajectory continues

A step sets the LR of ``config.lr_schedule()`` at the current step, runs ``grad_accum`` micro-batches
(``data/batches.py``: a pure function of the data seed and the step), clips, steps AdamW, then folds
the new weights into every online averager (``online/``) before the callbacks see ``record``: the
step reached, tokens_seen, lr, loss and grad_norm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ckptmerge.data.batches import train_batch
from ckptmerge.train.config import TrainConfig

StepCallback = Callable[["TrainState", dict], bool]  # returns True to stop after this step


@dataclass
class TrainState:
    """What a run carries from step to step: the model, its optimizer, the step reached, online averagers."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int
    parent: str | None = None
    averagers: dict = field(default_factory=dict)

    def state_dict(self) -> dict:
        """Everything to continue the same trajectory, as copies (the live tensors change at the next step)."""
        return {"step": self.step, "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": optimizer_state_copy(self.optimizer), "torch_rng": torch.get_rng_state(),
                "averagers": {name: _copied(a.state_dict()) for name, a in self.averagers.items() if a.n_averaged}}

    def load_state_dict(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        for name, averager in self.averagers.items():
            if name in saved["averagers"]:  # absent when it had not updated yet
                averager.load_state_dict(saved["averagers"][name])
        self.step = saved["step"]


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings only (not norms or biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def optimizer_state_copy(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with its tensors cloned: the live one's moments are updated in place."""
    return _copied(optimizer.state_dict())


def _copied(value):
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return value


def clip_gradients(parameters, max_norm: float) -> float:
    """Clip the gradients' global norm to ``max_norm`` and return the norm before clipping.

    ``max_norm <= 0`` turns clipping off (the norm is still measured); it never scales gradients by 0.
    """
    limit = max_norm if max_norm > 0 else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(parameters, limit))


def run_steps(config: TrainConfig, state: TrainState, tokens, callbacks: Sequence[StepCallback] = ()) -> None:
    """Train from ``state.step`` to ``config.steps``, calling every callback after each step; any True stops."""
    schedule = config.lr_schedule()
    while state.step < config.steps:
        record = train_step(config, state, tokens, schedule(state.step))
        if any([callback(state, record) for callback in callbacks]):  # a list: every callback sees every step
            return


def train_step(config: TrainConfig, state: TrainState, tokens, lr: float) -> dict:
    """One optimizer step at ``lr`` on the batch of ``state.step``; updates the averagers; returns the record."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.model.train()
    loss_sum = 0.0
    for micro in range(config.grad_accum):
        x, y = train_batch(tokens, seed=config.batch_seed, step=state.step, micro=micro,
                           batch_size=config.batch_size, context=config.seq_len)
        logits = state.model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) / config.grad_accum
        loss.backward()
        loss_sum += loss.item()
    grad_norm = clip_gradients(state.model.parameters(), config.grad_clip)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    record = {"step": state.step, "tokens_seen": state.step * config.tokens_per_step, "lr": lr, "loss": loss_sum,
              "grad_norm": grad_norm}
    for averager in state.averagers.values():
        averager.update(state.model, state.step, tokens_seen=record["tokens_seen"])
    return record
