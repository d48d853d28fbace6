"""Calibrated label scoring: label scores `[N, L]` (one row per text, one column per label word)
turned into the scores a classifier decides by.

A small model's label scores carry a prior for the label words themselves ("no hate speech" may
be likelier than "hate speech" whatever the text), which moves every decision the same way. Each
calibration here is one offset per label, added to the label log-probabilities normalised over
the labels:

    none          offsets 0
    content-free  Zhao et al. 2021, "Calibrate Before Use": -log p_cf(label), p_cf the label
                  probabilities for content-free texts ("N/A", "", "[MASK]") averaged in
                  probability space; adding it divides each text's probabilities by p_cf
    domain        Fei et al. 2023, domain-context calibration: the same with random in-domain
                  texts, words drawn from the training rows at their mean length (`domain_texts`)
    fitted        offsets fitted on validation rows to maximise accuracy or macro-F1 (`fit_offsets`)

What a run fitted is a small JSON-able dict, `{"method", "label_score", "offsets": {label: float}}`,
stored with the prompt and applied at inference (`calibrate`). Ensembles of K prompts combine their
calibrated label log-probabilities `[K, N, L]` by their mean or by majority vote.

Everything here is a pure function of tensors; `calibrate_model.py` scores the reference texts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

LABEL_SCORES = ("sum", "mean")  # a label's score: its tokens' summed or mean log-probability
CALIBRATIONS = ("none", "content-free", "domain", "fitted")
CONTENT_FREE_TEXTS = ("N/A", "", "[MASK]")  # Zhao et al. 2021's content-free inputs
DOMAIN_TEXT_COUNT = 20  # Fei et al. 2023 average over 20 random in-domain texts
FIT_METRICS = ("accuracy", "macro_f1")
MAX_FIT_ROUNDS = 20  # coordinate ascent stops earlier, at the first round that changes nothing


def label_scores(total_log_probs: torch.Tensor, label_token_counts: Sequence[int] | torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """Label scores `[N, L]` from the total log-probabilities of each label's tokens `[N, L]`
    (what `SoftPromptModel.classify` returns): `"sum"` keeps them, `"mean"` divides each by its
    label's token count (`[L]`, or `[N, L]`), so that a 3-token label is not penalised against a
    2-token one for its length alone."""
    if mode not in LABEL_SCORES:
        raise ValueError(f"label score must be one of {LABEL_SCORES}, got {mode!r}")
    if mode == "sum":
        return total_log_probs
    counts = torch.as_tensor(label_token_counts, dtype=total_log_probs.dtype, device=total_log_probs.device)
    if (counts < 1).any():
        raise ValueError(f"every label needs at least one token, got counts {counts.tolist()}")
    return total_log_probs / counts


def reference_offsets(reference_scores: torch.Tensor) -> torch.Tensor:
    """The offsets `[L]` that divide by the labels' mean probability on reference texts (content-free
    or in-domain): `-log mean_m softmax(reference_scores[m])`, the mean taken in probability space
    over the M reference texts `[M, L]`, as Zhao et al. do."""
    mean_probs = reference_scores.float().softmax(dim=-1).mean(dim=0)  # [L]
    return -mean_probs.log()


def calibrate(scores: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Calibrated label log-probabilities `[..., L]`: the scores normalised over the labels, plus
    the offsets `[L]` (None: none), normalised again so that they stay log-probabilities."""
    log_probs = scores.float().log_softmax(dim=-1)
    if offsets is None:
        return log_probs
    return (log_probs + offsets.to(log_probs)).log_softmax(dim=-1)


def calibration_record(method: str, label_score: str, labels: Sequence[str], offsets: torch.Tensor | None) -> dict:
    """What is saved with the prompt: `{"method", "label_score", "offsets": {label: float}}`."""
    if method not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {method!r}")
    if label_score not in LABEL_SCORES:
        raise ValueError(f"label score must be one of {LABEL_SCORES}, got {label_score!r}")
    values = [0.0] * len(labels) if offsets is None else [float(value) for value in offsets.tolist()]
    if len(values) != len(labels):
        raise ValueError(f"{len(values)} offsets for {len(labels)} labels")
    return {"method": method, "label_score": label_score, "offsets": dict(zip(labels, values))}


def record_offsets(record: dict, labels: Sequence[str]) -> torch.Tensor:
    """The offsets `[L]` of a saved record, in the order of `labels` (which may differ from the
    order they were fitted in); a label the record lacks is a ValueError naming it."""
    offsets = record["offsets"]
    missing = [label for label in labels if label not in offsets]
    if missing:
        raise ValueError(f"the calibration holds offsets for {list(offsets)}, not for {missing}")
    return torch.tensor([float(offsets[label]) for label in labels])


def domain_texts(rows: Sequence[dict], fields: Sequence[str], count: int = DOMAIN_TEXT_COUNT, seed: int = 0) -> list[str | dict]:
    """`count` random in-domain texts (Fei et al. 2023): for each field, words drawn at random
    (with replacement) from that field's words in `rows`, as many as the rows' mean word count
    (at least one). A text is a str for one field, a dict for several (as `classify` takes them)."""
    if not rows:
        raise ValueError("domain calibration needs rows to draw words from")
    rng = random.Random(seed)
    pools = {name: [word for row in rows for word in str(row[name]).split()] for name in fields}
    lengths = {name: max(1, round(len(pool) / len(rows))) for name, pool in pools.items()}
    empty = [name for name, pool in pools.items() if not pool]
    if empty:
        raise ValueError(f"domain calibration: the rows hold no words in {empty}")
    texts = [{name: " ".join(rng.choices(pool, k=lengths[name])) for name, pool in pools.items()} for _ in range(count)]
    return [text[fields[0]] for text in texts] if len(fields) == 1 else texts


def content_free_texts(fields: Sequence[str], texts: Sequence[str] = CONTENT_FREE_TEXTS) -> list[str | dict]:
    """The content-free inputs, each filling every text field (a str for one field, a dict for several)."""
    return list(texts) if len(fields) == 1 else [{name: text for name in fields} for text in texts]


# -- fitted offsets --------------------------------------------------------------------------------


def prediction_metric(predicted: torch.Tensor, gold: torch.Tensor, num_labels: int, metric: str = "macro_f1") -> float:
    """Accuracy, or macro-F1 (the unweighted mean over the labels; a label never gold nor
    predicted scores 0), of label indices `[N]`."""
    if metric not in FIT_METRICS:
        raise ValueError(f"metric must be one of {FIT_METRICS}, got {metric!r}")
    if metric == "accuracy":
        return (predicted == gold).float().mean().item()
    confusion = torch.zeros(num_labels, num_labels)  # rows: gold, columns: predicted
    confusion.index_put_((gold, predicted), torch.ones(len(gold)), accumulate=True)
    true_positive = confusion.diagonal()
    denominator = confusion.sum(dim=0) + confusion.sum(dim=1)  # = 2 TP + FP + FN
    f1 = torch.where(denominator > 0, 2 * true_positive / denominator.clamp(min=1), torch.zeros(()))
    return f1.mean().item()


def fit_offsets(scores: torch.Tensor, gold: torch.Tensor, metric: str = "macro_f1") -> torch.Tensor:
    """Offsets `[L]` (the first label's fixed at 0: only differences matter) that maximise `metric`
    of `argmax(calibrate(scores) + offsets)` on labelled rows: `scores` `[N, L]`, `gold` `[N]` label
    indices.

    Coordinate ascent: each label's offset in turn is set to its best value with the others held,
    until a round changes none. A label's prediction on a row flips where its offset crosses that
    row's margin to the best other label, so the midpoints between consecutive margins (and one
    beyond each end) are every distinct outcome; of the best, the value nearest the current one is
    kept (so the raw scores stay when nothing beats them). With 2 labels one pass is the exact
    1-D threshold search on the score difference. Deterministic: no randomness, a fixed order.
    """
    if scores.dim() != 2 or gold.shape != scores.shape[:1]:
        raise ValueError(f"fit_offsets needs scores [N, L] and gold [N], got {list(scores.shape)} and {list(gold.shape)}")
    log_probs = calibrate(scores).double()  # [N, L]; float64 so that midpoints of near margins stay apart
    num_labels = log_probs.shape[1]
    offsets = torch.zeros(num_labels, dtype=torch.float64)
    gold = gold.long()
    for _ in range(MAX_FIT_ROUNDS):
        changed = False
        for label in range(1, num_labels):
            others = (log_probs + offsets).index_fill(1, torch.tensor([label]), -math.inf).max(dim=1).values  # [N]
            margins = torch.unique(others - log_probs[:, label])  # sorted; `label` wins a row iff its offset exceeds the margin
            candidates = torch.cat([margins[:1] - 1, (margins[1:] + margins[:-1]) / 2, margins[-1:] + 1, offsets[label : label + 1]])
            best_value, best_score = offsets[label].item(), -math.inf
            # Nearest the current value first, so that a tie keeps the smallest move.
            for value in sorted(candidates.tolist(), key=lambda value: (abs(value - offsets[label].item()), value)):
                trial = offsets.clone()
                trial[label] = value
                score = prediction_metric((log_probs + trial).argmax(dim=1), gold, num_labels, metric)
                if score > best_score:
                    best_value, best_score = value, score
            if best_value != offsets[label].item():
                offsets[label], changed = best_value, True
        if not changed:
            break
    return offsets.float()


# -- ensembles -------------------------------------------------------------------------------------


def ensemble_mean(log_probs: torch.Tensor) -> torch.Tensor:
    """The ensemble's label scores `[N, L]` from K prompts' (calibrated) label scores `[K, N, L]`:
    each prompt's normalised over the labels (log-softmax), then the mean over the prompts."""
    return log_probs.float().log_softmax(dim=-1).mean(dim=0)


def ensemble_vote(log_probs: torch.Tensor) -> torch.Tensor:
    """The majority vote `[N]` (label indices) of K prompts' label scores `[K, N, L]`: each prompt
    votes for its best label; a tie between labels with the most votes goes to the one of them
    with the best `ensemble_mean` score (Lester et al. 2021, section 6, vote; the mean breaks ties)."""
    num_labels = log_probs.shape[-1]
    votes = torch.nn.functional.one_hot(log_probs.argmax(dim=-1), num_labels).sum(dim=0)  # [N, L]
    mean = ensemble_mean(log_probs)
    return mean.masked_fill(votes < votes.max(dim=1, keepdim=True).values, -math.inf).argmax(dim=1)
