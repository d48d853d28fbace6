"""Calibration with a model: label scores for texts, and the calibrations that need the model to
score something (content-free or in-domain reference texts, validation rows). The arithmetic is
`calibration.py`'s; this module only feeds it the model's label scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .calibration import (
    calibrate,
    calibration_record,
    content_free_texts,
    domain_texts,
    fit_offsets,
    label_scores,
    record_offsets,
    reference_offsets,
)
from .model import SoftPromptModel
from .scoring import label_sequences
from .templates import template_fields


def model_label_scores(
    model: SoftPromptModel,
    texts: Sequence[str | dict],
    labels: Sequence[str],
    template: str | None = None,
    label_score: str = "sum",
    batch_size: int = 16,
    prompt_names: Sequence[str | None] | None = None,
) -> torch.Tensor:
    """Label scores `[N, L]` of the texts: each label's summed or mean (`label_score`) token
    log-probability, after the active prompt (or each text's `prompt_names`)."""
    template = template or model.metadata.get("template")
    _, totals = model.classify(texts, labels, template, batch_size=batch_size, prompt_names=prompt_names)
    # A label's token count can depend on the text before it (BPE merges across the split), so per text: [N, L].
    counts = [len(completion) for _, completion in label_sequences(texts, labels, template, model.tokenizer)]
    return label_scores(totals, torch.tensor(counts).view(len(texts), len(labels)), label_score)


def reference_calibration(
    model: SoftPromptModel,
    method: str,
    labels: Sequence[str],
    template: str | None = None,
    rows: Sequence[dict] | None = None,
    label_score: str = "sum",
    seed: int = 0,
    batch_size: int = 16,
) -> dict:
    """The `content-free` or `domain` calibration record of the active prompt: the offsets that
    divide by the label probabilities on the reference texts (`domain` draws them from `rows`,
    the training rows, seeded)."""
    template = template or model.metadata.get("template")
    fields = template_fields(template)[:-1]  # the text fields; the last one holds the label
    if method == "content-free":
        texts = content_free_texts(fields)
    elif method == "domain":
        texts = domain_texts(rows or [], fields, seed=seed)
    else:
        raise ValueError(f"reference calibration is content-free or domain, got {method!r}")
    scores = model_label_scores(model, texts, labels, template, label_score, batch_size)
    return calibration_record(method, label_score, labels, reference_offsets(scores))


def fitted_calibration(
    model: SoftPromptModel,
    rows: Sequence[dict],
    labels: Sequence[str],
    template: str | None = None,
    label_score: str = "sum",
    metric: str = "macro_f1",
    batch_size: int = 16,
) -> dict:
    """The `fitted` calibration record of the active prompt: offsets that maximise `metric` on
    labelled `rows` (validation rows: never the test rows), whose template's last field holds
    their label word."""
    template = template or model.metadata.get("template")
    last = template_fields(template)[-1]
    unknown = sorted({str(row[last]) for row in rows} - set(labels))
    if unknown:
        raise ValueError(f"rows labelled {unknown}, which are not among the label words {list(labels)}")
    gold = torch.tensor([list(labels).index(str(row[last])) for row in rows])
    scores = model_label_scores(model, list(rows), labels, template, label_score, batch_size)
    return calibration_record("fitted", label_score, labels, fit_offsets(scores, gold, metric))


def calibrated_label_log_probs(
    model: SoftPromptModel,
    texts: Sequence[str | dict],
    labels: Sequence[str],
    record: dict | None,
    template: str | None = None,
    batch_size: int = 16,
    prompt_names: Sequence[str | None] | None = None,
) -> torch.Tensor:
    """The calibrated label log-probabilities `[N, L]` of the texts under a saved record (None:
    uncalibrated summed scores), normalised over the labels."""
    if record is None:
        return calibrate(model_label_scores(model, texts, labels, template, "sum", batch_size, prompt_names))
    scores = model_label_scores(model, texts, labels, template, record["label_score"], batch_size, prompt_names)
    return calibrate(scores, record_offsets(record, labels))
