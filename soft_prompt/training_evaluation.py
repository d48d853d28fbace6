"""Evaluation during training: at each evaluation the eval loss and, with label words, label
scoring's accuracy and macro-F1 on the evaluation rows, `best/` kept by `--best-metric` and
`--patience` counted; `--probe`'s greedy continuations; after training, `--calibration` fitted for
the prompt `best/` holds."""

from __future__ import annotations

from .calibrate_model import fitted_calibration, model_label_scores, reference_calibration
from .calibration import FIT_METRICS, calibration_record
from .checkpoint import save_checkpoint, update_metadata
from .evaluation import label_metrics, mean_eval_loss
from .probe import probe
from .templates import template_fields
from .training_setup import Run, log_metrics


def validation_label_metrics(run: Run) -> dict[str, float]:
    """Accuracy and macro-F1 of label scoring (`--label-score`, uncalibrated) on the evaluation
    rows, when there are label words (every rank scores every row: the same figures on each)."""
    labels, template = run.config.data.label_words, run.config.data.template
    if not labels:
        return {}
    model, last = run.model, template_fields(template)[-1]
    model.eval()  # no dropout while scoring
    with run.autocast():
        scores = model_label_scores(model, run.eval_rows, labels, template, run.config.classify.label_score, run.config.optim.batch_size)
    model.train()
    predicted = [labels[i] for i in scores.argmax(dim=1).tolist()]
    figures = label_metrics([str(row[last]) for row in run.eval_rows], predicted, labels)
    return {"accuracy": figures["accuracy"], "macro_f1": figures["macro_f1"]}


def evaluate_and_keep_best(run: Run) -> None:
    """Evaluate (every rank): the eval loss and, with label words, label scoring's accuracy and
    macro-F1; log them and save `best/` when `--best-metric` is the best so far (rank 0)."""
    model, state = run.model, run.state
    eval_loss = mean_eval_loss(model, run.eval_examples, run.config.optim.batch_size, run.autocast, run.pad_token_id,
                               run.world, shared_prefix=run.config.model.shared_prefix)
    state.eval_loss = eval_loss
    if state.best_eval_loss is None or eval_loss < state.best_eval_loss:
        state.best_eval_loss = eval_loss
    figures = {"eval_loss": eval_loss, **validation_label_metrics(run)}
    metric = run.config.classify.best_metric
    score = figures[metric]
    lower_is_better = metric == "eval_loss"
    is_best = state.best_score is None or (score < state.best_score if lower_is_better else score > state.best_score)
    if is_best:
        state.best_score, state.evals_without_improvement = score, 0
    else:
        state.evals_without_improvement += 1
    if run.world.is_main:
        epoch = state.epoch_progress(run.batches_per_epoch)
        log_metrics(run.metrics_path, {"step": state.step, "epoch": epoch, **figures})
        if is_best:
            metadata = {**model.metadata, "step": state.step, **figures}
            save_checkpoint(run.output_dir / "best", model.prompt.weight, model.base_model, metadata,
                            initial_weight=run.initial_weight)


def log_probe(run: Run) -> None:
    """`--probe`: the probe texts' greedy continuations with the current prompt and their letters'
    scripts, one metrics.jsonl line. Rank 0 alone generates, with no collective inside; the other
    ranks go on to the step's end, where the stop check waits for it."""
    if not run.config.run.probe or not run.world.is_main:
        return
    with run.autocast():
        lines = probe(run.model, run.config.run.probe, run.config.run.probe_tokens)
    log_metrics(run.metrics_path, {"step": run.state.step, "probe": lines})


def patience_spent(run: Run) -> bool:
    """`--patience` evaluations in a row without a better `--best-metric`: training stops."""
    patience = run.config.classify.patience
    return bool(patience) and run.state.evals_without_improvement >= patience


def calibrate_best(run: Run) -> None:
    """Fit `--calibration` for the prompt best/ holds (last/ when there were no evaluation rows) and
    store it, with `--label-score`, in its soft_prompt.json, where infer.py reads it. Every rank
    scores (FSDP needs them all), rank 0 writes."""
    labels, classify, data_cfg = run.config.data.label_words, run.config.classify, run.config.data
    if not labels:
        return
    target = run.output_dir / ("best" if run.state.best_score is not None else "last")
    run.world.barrier()  # rank 0 has written it
    model = run.model
    model.load_prompt(target, "calibrating")
    model.set_prompt("calibrating")
    model.eval()
    with run.autocast():
        if classify.calibration == "fitted":
            metric = classify.best_metric if classify.best_metric in FIT_METRICS else "macro_f1"
            record = fitted_calibration(model, run.eval_rows, labels, data_cfg.template, classify.label_score, metric,
                                        run.config.optim.batch_size)
        elif classify.calibration in ("content-free", "domain"):
            record = reference_calibration(model, classify.calibration, labels, data_cfg.template, run.train_rows,
                                           classify.label_score, run.config.run.seed, run.config.optim.batch_size)
        else:
            record = calibration_record("none", classify.label_score, labels, None)
    if run.world.is_main:
        update_metadata(target, {"calibration": record, "label_score": classify.label_score})


