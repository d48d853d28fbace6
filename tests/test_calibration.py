"""Calibrated label scoring and ensembles: hand-fed scores against hand computations, and the
model-backed calibrations against the model's own label scores."""

import math
import random

import pytest
import torch

from soft_prompt import SoftPromptModel
from soft_prompt.calibrate_model import calibrated_label_log_probs, fitted_calibration, model_label_scores, reference_calibration
from soft_prompt.calibration import (
    calibrate,
    calibration_record,
    content_free_texts,
    domain_texts,
    ensemble_mean,
    ensemble_vote,
    fit_offsets,
    label_scores,
    prediction_metric,
    record_offsets,
    reference_offsets,
)
from soft_prompt.config import HATE_TEMPLATE
from soft_prompt.evaluation import label_metrics

LABELS = ["no hate speech", "hate speech"]


def test_label_scores_sum_or_mean_per_token():
    totals = torch.tensor([[-6.0, -3.0], [-1.5, -9.0]])
    assert torch.equal(label_scores(totals, [3, 2], "sum"), totals)
    assert torch.equal(label_scores(totals, [3, 2], "mean"), torch.tensor([[-2.0, -1.5], [-0.5, -4.5]]))
    assert torch.equal(label_scores(totals, torch.tensor([[3, 2], [1, 3]]), "mean"), torch.tensor([[-2.0, -1.5], [-1.5, -3.0]]))
    with pytest.raises(ValueError, match="label score must be one of"):
        label_scores(totals, [3, 2], "max")


def test_content_free_scores_equal_to_the_prior_give_uniform_scores():
    # Three content-free texts whose label probabilities average, in probability space, to the prior [0.8, 0.2].
    reference = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.8, 0.2]]).log() - 4.0  # unnormalised: the offset cancels
    offsets = reference_offsets(reference)
    torch.testing.assert_close(offsets, -torch.tensor([0.8, 0.2]).log())
    prior_text = torch.tensor([[0.8, 0.2]]).log() - 7.0
    torch.testing.assert_close(calibrate(prior_text, offsets), torch.full((1, 2), math.log(0.5)))
    # Another text, [0.6, 0.4], divided by the prior: [0.75, 2], normalised [3/11, 8/11].
    other = torch.tensor([[0.6, 0.4]]).log()
    torch.testing.assert_close(calibrate(other, offsets), torch.tensor([[3 / 11, 8 / 11]]).log())


def test_fitted_offsets_move_a_hand_made_threshold():
    # Score differences s1 - s0; raw (threshold 0) gets 4 of 6; a threshold between -2 and -1.5 gets all.
    differences = torch.tensor([-3.0, -2.0, -1.5, -1.0, 0.5, 1.0])
    scores = torch.stack([torch.zeros(6), differences], dim=1)
    gold = torch.tensor([0, 0, 1, 1, 1, 1])
    assert prediction_metric(scores.argmax(1), gold, 2, "accuracy") == pytest.approx(4 / 6)
    for metric in ("accuracy", "macro_f1"):
        offsets = fit_offsets(scores, gold, metric)
        assert offsets.tolist() == [0.0, 1.75]  # the midpoint of -2 and -1.5, negated
        assert prediction_metric(calibrate(scores, offsets).argmax(1), gold, 2, "accuracy") == 1.0
    # Already the best: the raw scores are kept.
    assert fit_offsets(scores, torch.tensor([0, 0, 0, 0, 1, 1])).tolist() == [0.0, 0.0]


def test_fitted_offsets_for_three_labels_move_the_under_predicted_label():
    # Label 2 loses its two rows to label 0 by 0.5 and 0.2; labels 0 and 1 win theirs by 3 over label 2.
    scores = torch.tensor([[0.0, -1.0, -3.0], [-1.0, 0.0, -3.0], [-1.0, -2.0, -1.5], [-1.0, -2.0, -1.2]])
    gold = torch.tensor([0, 1, 2, 2])
    offsets = fit_offsets(scores, gold, "macro_f1")
    assert offsets.tolist() == [0.0, 0.0, 1.75]  # the midpoint of the margins 0.5 and 3
    assert calibrate(scores, offsets).argmax(1).tolist() == [0, 1, 2, 2]


def test_prediction_metric_equals_the_evaluation_report():
    rng = random.Random(0)
    labels = ["a", "b", "c"]
    for _ in range(5):
        gold = [rng.randrange(3) for _ in range(30)]
        predicted = [rng.choice([0, 0, 1]) for _ in range(30)]  # "c" never predicted: its F1 is 0
        report = label_metrics([labels[i] for i in gold], [labels[i] for i in predicted], labels)
        for metric in ("accuracy", "macro_f1"):
            assert prediction_metric(torch.tensor(predicted), torch.tensor(gold), 3, metric) == pytest.approx(report[metric])


def test_records_round_trip_in_any_label_order():
    record = calibration_record("content-free", "mean", ["x", "y", "z"], torch.tensor([0.5, -1.0, 2.0]))
    assert record == {"method": "content-free", "label_score": "mean", "offsets": {"x": 0.5, "y": -1.0, "z": 2.0}}
    assert record_offsets(record, ["z", "x", "y"]).tolist() == [2.0, 0.5, -1.0]
    assert calibration_record("none", "sum", ["x", "y"], None)["offsets"] == {"x": 0.0, "y": 0.0}
    with pytest.raises(ValueError, match=r"not for \['w'\]"):
        record_offsets(record, ["x", "w"])
    with pytest.raises(ValueError, match="calibration must be one of"):
        calibration_record("platt", "sum", ["x"], None)


def test_domain_texts_draw_field_words_at_their_mean_length():
    rows = [{"text": "a b c d", "topic": "x"}, {"text": "e f", "topic": "y z"}]  # 3 and 1.5 -> 2 words
    texts = domain_texts(rows, ["text"], count=5, seed=1)
    assert len(texts) == 5 and all(len(text.split()) == 3 and set(text.split()) <= set("abcdef") for text in texts)
    assert domain_texts(rows, ["text"], count=5, seed=1) == texts
    assert domain_texts(rows, ["text"], count=5, seed=2) != texts
    pairs = domain_texts(rows, ["topic", "text"], count=2, seed=1)
    assert all(len(pair["topic"].split()) == 2 and set(pair["topic"].split()) <= set("xyz") for pair in pairs)
    assert content_free_texts(["text"]) == ["N/A", "", "[MASK]"]
    assert content_free_texts(["topic", "text"])[0] == {"topic": "N/A", "text": "N/A"}


def test_ensemble_mean_and_vote_equal_a_hand_computation():
    # Three prompts, two rows, three labels, given as probabilities (each row sums to 1).
    probs = torch.tensor([
        [[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]],
        [[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]],
        [[0.2, 0.7, 0.1], [0.6, 0.2, 0.2]],
    ])
    scores = probs.log() + torch.tensor([1.0, -2.0, 0.5])[:, None, None]  # each prompt's own unnormalised shift
    mean = [[sum(math.log(probs[k, n, label]) for k in range(3)) / 3 for label in range(3)] for n in range(2)]
    torch.testing.assert_close(ensemble_mean(scores), torch.tensor(mean))
    # Row 0: votes 0, 1, 1 -> label 1. Row 1: votes 1, 2, 0, a three-way tie -> the best mean,
    # label 0: (log .2 + log .3 + log .6) / 3 = -1.1081 against -1.1688 (label 1) and -1.2432 (label 2).
    assert mean[1][0] > mean[1][1] > mean[1][2]
    assert ensemble_vote(scores).tolist() == [1, 0]
    # Prompts 0, 0, 1 on row 0: the vote is label 0 (two votes), the mean label 1
    # ((2 log .3 + log .6) / 3 = -0.9729 against (2 log .5 + log .1) / 3 = -1.2296).
    assert ensemble_vote(scores[[0, 0, 1]])[0].item() == 0
    assert ensemble_mean(scores[[0, 0, 1]])[0].argmax().item() == 1


@pytest.fixture
def wrapper(bloom):
    model, tokenizer = bloom
    return SoftPromptModel(model, num_virtual_tokens=3, seed=0, tokenizer=tokenizer, metadata={"template": HATE_TEMPLATE})


def test_reference_calibration_divides_by_the_models_content_free_probabilities(wrapper):
    _, totals = wrapper.classify(["N/A", "", "[MASK]"], LABELS)
    counts = [len(wrapper.tokenizer(" " + label, add_special_tokens=False)["input_ids"]) for label in LABELS]
    for label_score, scores in (("sum", totals), ("mean", totals / torch.tensor(counts))):
        record = reference_calibration(wrapper, "content-free", LABELS, label_score=label_score)
        want = -scores.softmax(-1).mean(0).log()
        assert record["method"] == "content-free" and record["label_score"] == label_score
        torch.testing.assert_close(record_offsets(record, LABELS), want)
    texts = ["the cat is lovely", "those people are animals"]
    record = reference_calibration(wrapper, "content-free", LABELS)
    torch.testing.assert_close(
        calibrated_label_log_probs(wrapper, texts, LABELS, record),
        calibrate(wrapper.classify(texts, LABELS)[1], record_offsets(record, LABELS)),
    )
    rows = [{"text": "the cat is lovely"}, {"text": "those people are animals"}]
    domain = reference_calibration(wrapper, "domain", LABELS, rows=rows, seed=3)
    want = reference_offsets(wrapper.classify(domain_texts(rows, ["text"], seed=3), LABELS)[1])
    torch.testing.assert_close(record_offsets(domain, LABELS), want)


def test_fitted_calibration_fits_the_model_scores_of_the_rows(wrapper):
    texts = ["the cat is lovely", "those people are animals", "that song", "they should all be thrown out"]
    rows = [{"text": text, "label_text": LABELS[i % 2]} for i, text in enumerate(texts)]
    record = fitted_calibration(wrapper, rows, LABELS, metric="accuracy")
    scores = model_label_scores(wrapper, texts, LABELS)
    want = fit_offsets(scores, torch.tensor([0, 1, 0, 1]), "accuracy")
    torch.testing.assert_close(record_offsets(record, LABELS), want)
    with pytest.raises(ValueError, match=r"rows labelled \['maybe'\]"):
        fitted_calibration(wrapper, [{"text": "a", "label_text": "maybe"}], LABELS)
