"""Evaluation shared by training, inference, analysis and the sweep: the mean loss over labelled
tokens, the label metrics of a classifier, and how far a prompt moved from its start."""

from __future__ import annotations

import torch

from .data import Example, collate
from .distributed import World
from .masks import IGNORE_INDEX
from .model import SoftPromptModel
from .shared_prefix import shared_prefix_loss, shared_prefix_supported


@torch.no_grad()
def mean_eval_loss(
    model: SoftPromptModel,
    examples: list[Example],
    batch_size: int,
    autocast,
    pad_token_id: int,
    world: World = World(),
    shared_prefix: bool = True,
) -> float:
    """The mean loss per labelled token over `examples` (longest rows first, to pad little); under
    torchrun each rank evaluates its share of each batch and the sums are combined. The prompt runs
    once per batch (`shared_prefix.py`) where that is exact in eval mode, unless `shared_prefix`
    is False. The model is left in the mode it came in."""
    was_training = model.training
    model.eval()
    loss_fn = shared_prefix_loss if shared_prefix and shared_prefix_supported(model)[0] else SoftPromptModel.loss
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        rows = world.share(order[start : start + batch_size])
        # A rank with no row of a short last batch still runs a forward (FSDP's all-gathers need
        # every rank), on the batch's first row, and does not count it.
        counted = bool(rows)
        batch = collate([examples[i] for i in rows or order[start : start + 1]], pad_token_id)
        batch = {key: value.to(model.device) for key, value in batch.items()}
        with autocast():
            loss = loss_fn(model, **batch)
        labelled = int((batch["labels"] != IGNORE_INDEX).sum()) if counted else 0
        total, count = total + loss.item() * labelled, count + labelled
    model.train(was_training)
    if world.size > 1:
        total, count = world.sum_(torch.tensor([total, count], dtype=torch.float64, device=model.device)).tolist()
    return total / max(count, 1)


def label_metrics(gold: list[str], predicted: list[str], labels: list[str]) -> dict:
    """Accuracy, per-label and macro F1 (the unweighted mean over `labels`; a label never gold nor
    predicted scores 0) and the confusion matrix (rows: gold label, columns: predicted)."""
    index = {label: i for i, label in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted, strict=True):
        confusion[index[g]][index[p]] += 1
    f1 = {}
    for i, label in enumerate(labels):
        true_positive = confusion[i][i]
        false_positive = sum(row[i] for row in confusion) - true_positive
        false_negative = sum(confusion[i]) - true_positive
        denominator = 2 * true_positive + false_positive + false_negative
        f1[label] = 2 * true_positive / denominator if denominator else 0.0
    return {
        "count": len(gold),
        "accuracy": sum(confusion[i][i] for i in range(len(labels))) / len(gold),
        "macro_f1": sum(f1.values()) / len(labels),
        "f1": f1,
        "labels": list(labels),
        "confusion": confusion,
    }


def prompt_drift(weight: torch.Tensor, initial_weight: torch.Tensor) -> dict[str, float]:
    """How far the prompt `[V, D]` moved from its initial value: the Frobenius distance and the
    mean over virtual tokens of the cosine between each token and its initial vector."""
    weight, initial_weight = weight.detach().float(), initial_weight.detach().float().to(weight.device)
    return {
        "prompt_distance": (weight - initial_weight).norm().item(),
        "prompt_cosine": torch.cosine_similarity(weight, initial_weight, dim=-1).mean().item(),
    }
