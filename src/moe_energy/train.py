"""Training loop and held-out evaluation: the seed's recipe (Adam, cross-entropy), plus a divergence flag."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Dataset

# Held-out accuracy within this many points of chance counts as "stayed at chance".
CHANCE_MARGIN = 0.02


@dataclass
class TrainResult:
    epoch_loss: list[float] = field(default_factory=list)
    # running: counted during each epoch while the weights changed (not what the trained model scores)
    epoch_train_accuracy: list[float] = field(default_factory=list)
    train_accuracy: float | None = None  # the final weights on the training set: one pass after training
    test_accuracy: float | None = None
    chance_accuracy: float | None = None
    diverged: bool = False  # training failed (the stored field's name): non-finite loss, nothing learned, or none run
    diverged_reason: str | None = None
    failure: str | None = None  # which, in words: "diverged", "did not learn" or "untrained" (--epochs 0)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@torch.inference_mode()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device,
             dtype: torch.dtype = torch.float32) -> float:
    """Fraction of samples whose argmax logit is the label."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device=device, dtype=dtype)
        correct += int((model(xb).argmax(dim=-1).cpu() == y[i : i + batch_size]).sum())
    return correct / len(x)


def train(
    model: nn.Module,
    data: Dataset,
    epochs: int,
    lr: float,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train in fp32, then evaluate the final weights on the training and the held-out data (before any energy
    window: the runner measures after training). ``on_step(epoch, batch)`` drives progress bars."""
    res = TrainResult(chance_accuracy=data.chance_accuracy)
    t0 = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x, y = data.x_train, data.y_train
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for b, i in enumerate(range(0, len(x), batch_size)):
            sel = order[i : i + batch_size]
            xb, yb = x[sel].to(device), y[sel].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(sel)
            correct += (logits.argmax(-1) == yb).sum()
            if on_step is not None:
                on_step(epoch, b)
        mean_loss = float(loss_sum) / len(x)
        res.epoch_loss.append(mean_loss)
        res.epoch_train_accuracy.append(float(correct) / len(x))
        if not math.isfinite(mean_loss):
            res.diverged, res.diverged_reason = True, f"loss is {mean_loss} in epoch {epoch + 1}"
            res.failure = "diverged"
            break
    res.train_accuracy = evaluate(model, x, y, batch_size, device)
    res.test_accuracy = evaluate(model, data.x_test, data.y_test, batch_size, device)
    if epochs == 0:  # speed and energy of the initial weights are valid; their accuracy is no trained result
        res.diverged, res.diverged_reason = True, "--epochs 0: the weights are their random initialisation"
        res.failure = "untrained"
    elif not res.diverged and res.test_accuracy <= data.chance_accuracy + CHANCE_MARGIN:
        res.diverged, res.diverged_reason = True, (f"held-out accuracy {res.test_accuracy:.3f} is at chance "
                                                   f"({data.chance_accuracy:.3f})")
        res.failure = "did not learn"  # too few epochs or samples, or a bad learning rate: not a divergence
    res.seconds = time.perf_counter() - t0
    return res
