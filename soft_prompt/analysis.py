"""What a soft prompt learned: its virtual tokens measured against the frozen vocabulary, and, on
labelled rows, which tokens carry the task.

Without data (the prompt `[V, D]` against the input embedding matrix `[N, D]`):
    nearest tokens   top-k vocabulary tokens by cosine per virtual token, decoded, with their script
    norms            each virtual token's norm and its percentile among the vocabulary's norms
    drift            distance and cosine to the prompt before training (initial_prompt.safetensors)
    pairwise cosine  between the virtual tokens, [V, V]
With rows (`analyze(..., rows=...)`):
    ablation         loss and accuracy with virtual token i replaced by the mean vocabulary embedding
    hard prompt      each virtual token replaced by its nearest token's embedding: a real text prompt
    attention        the share of attention the text positions give to the virtual tokens, per layer
Chance: the nearest-token cosines, the scripts, the pairwise cosines and the attention measured the
same way for two prompts with nothing learned (`chance.chance_prompts`): random vectors of the
prompt's per-token norms and a random hard prompt of V vocabulary tokens.
With `--describe`: the prompt's descriptions by patching (`description.py`, InSPEcT).
With a run's metrics.jsonl: the drift over training and the `--probe` continuations.

`analyze.py` is its command line; `analysis_plots.py` draws the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .chance import chance_prompts, script_of
from .checkpoint import load_initial_prompt
from .data import Example, check_template_columns, collate, load_rows, tokenize_rows
from .description import describe, format_descriptions, layer_grid
from .evaluation import label_metrics, mean_eval_loss, prompt_drift
from .files import portable_path, write_output
from .masks import IGNORE_INDEX
from .model import SoftPromptModel
from .runtime import load_prompted_model, pick_device
from .templates import template_fields
from .training_state import METRICS_FILE

SPECIAL = "special"  # the tokenizer's special tokens (<|im_end|>, <pad>, ...), whatever letters they hold


# -- the prompt against the vocabulary --------------------------------------------------------------


def nearest_tokens(prompt: torch.Tensor, embeddings: torch.Tensor, tokenizer, top_k: int = 5) -> list[list[dict]]:
    """For each virtual token of `prompt` `[V, D]`, the `top_k` rows of `embeddings` `[N, D]` with
    the highest cosine: [{"id", "text", "similarity", "script"}, ...] per token."""
    special_ids = set(tokenizer.all_special_ids)
    similarity = torch.nn.functional.normalize(prompt.float(), dim=-1) @ torch.nn.functional.normalize(
        embeddings.float(), dim=-1
    ).T  # [V, N]
    values, ids = similarity.topk(min(top_k, embeddings.shape[0]), dim=-1)
    neighbours = []
    for row_values, row_ids in zip(values.tolist(), ids.tolist()):
        texts = [tokenizer.decode([token_id]) for token_id in row_ids]
        neighbours.append([
            {"id": token_id, "text": text, "similarity": value, "script": SPECIAL if token_id in special_ids else script_of(text)}
            for token_id, text, value in zip(row_ids, texts, row_values)
        ])
    return neighbours


def script_shares(neighbours: list[list[dict]]) -> dict[str, float]:
    """The share of each script among all the neighbours listed, largest first."""
    counts = Counter(neighbour["script"] for row in neighbours for neighbour in row)
    total = sum(counts.values())
    return {script: count / total for script, count in counts.most_common()}


def norm_figures(prompt: torch.Tensor, embeddings: torch.Tensor) -> tuple[list[dict], dict[str, float]]:
    """(per virtual token: its norm and the percentage of vocabulary norms below it; the
    vocabulary's norm distribution: min, 5th percentile, median, mean, 95th percentile, max)."""
    vocabulary_norms = embeddings.float().norm(dim=-1)  # [N]
    sorted_norms = vocabulary_norms.sort().values
    tokens = []
    for norm in prompt.float().norm(dim=-1).tolist():
        below = torch.searchsorted(sorted_norms, torch.tensor(norm)).item()
        tokens.append({"norm": norm, "norm_percentile": 100.0 * below / len(sorted_norms)})
    quantiles = torch.quantile(vocabulary_norms, torch.tensor([0.05, 0.5, 0.95])).tolist()
    distribution = {
        "min": sorted_norms[0].item(),
        "p5": quantiles[0],
        "median": quantiles[1],
        "mean": vocabulary_norms.mean().item(),
        "p95": quantiles[2],
        "max": sorted_norms[-1].item(),
    }
    return tokens, distribution


def pairwise_cosine(prompt: torch.Tensor) -> torch.Tensor:
    """Cosine between every two virtual tokens, `[V, V]`."""
    unit = torch.nn.functional.normalize(prompt.float(), dim=-1)
    return unit @ unit.T


def readings(prompt: torch.Tensor, embeddings: torch.Tensor, tokenizer, top_k: int) -> dict:
    """The summary figures a chance level stands beside, for any prompt `[V, D]`: the mean cosine
    of each virtual token's nearest vocabulary token and of its `top_k` nearest, the scripts of
    all the neighbours, the mean and max pairwise cosine between different virtual tokens."""
    neighbours = nearest_tokens(prompt, embeddings, tokenizer, top_k)
    cosine = pairwise_cosine(prompt)
    off_diagonal = cosine[~torch.eye(len(cosine), dtype=torch.bool)]  # [V * (V - 1)]
    return {
        "nearest_cosine": sum(row[0]["similarity"] for row in neighbours) / len(neighbours),
        "nearest_cosine_top_k": sum(n["similarity"] for row in neighbours for n in row) / sum(map(len, neighbours)),
        "scripts": script_shares(neighbours),
        "pairwise_cosine_mean": off_diagonal.mean().item() if len(off_diagonal) else None,
        "pairwise_cosine_max": off_diagonal.max().item() if len(off_diagonal) else None,
    }


# -- on labelled rows -------------------------------------------------------------------------------


@contextlib.contextmanager
def swapped_prompt(model: SoftPromptModel, weight: torch.Tensor) -> Iterator[None]:
    """Run with `weight` `[V, D]` as the prompt, then put the trained one back."""
    trained = model.prompt.weight.detach().clone()
    with torch.no_grad():
        model.prompt.weight.copy_(weight)
    try:
        yield
    finally:
        with torch.no_grad():
            model.prompt.weight.copy_(trained)


@torch.no_grad()
def no_prompt_loss(model: SoftPromptModel, examples: list[Example], batch_size: int, pad_token_id: int) -> float:
    """The frozen model's mean loss per labelled token without a prompt. With the loss on every
    token, the first text token has nothing before it and is not predicted: one token fewer a row
    than with a prompt."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {key: value.to(model.device) for key, value in collate(examples[start : start + batch_size], pad_token_id).items()}
        loss = model.base_model(**batch, use_cache=False).loss
        labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total, count = total + loss.item() * labelled, count + labelled
    return total / max(count, 1)


def scores_on(
    model: SoftPromptModel, examples: list[Example], rows: list[dict], labels: list[str] | None, batch_size: int,
    use_prompt: bool = True,
) -> dict[str, float]:
    """The mean loss over `examples` and, with `labels`, label-scoring accuracy and macro-F1 over `rows`."""
    pad_token_id = model.tokenizer.pad_token_id
    if use_prompt:
        loss = mean_eval_loss(model, examples, batch_size, contextlib.nullcontext, pad_token_id)
    else:
        loss = no_prompt_loss(model, examples, batch_size, pad_token_id)
    figures = {"loss": loss}
    if labels:
        template = model.metadata["template"]
        predictions, _ = model.classify(rows, labels, template, batch_size=batch_size * len(labels), use_prompt=use_prompt)
        result = label_metrics([row[template_fields(template)[-1]] for row in rows], predictions, labels)
        figures.update(accuracy=result["accuracy"], macro_f1=result["macro_f1"])
    return figures


@torch.no_grad()
def attention_to_prompt(model: SoftPromptModel, examples: list[Example], batch_size: int) -> list[float]:
    """Per layer, the share of attention that text positions give to the virtual tokens, averaged
    over heads, text positions and rows. Switches the frozen model to eager attention (the only
    one that returns weights); raises ValueError where the model cannot return them."""
    base_model, num_virtual = model.base_model, model.num_virtual_tokens
    if hasattr(base_model, "set_attn_implementation"):
        try:
            base_model.set_attn_implementation("eager")
        except (ValueError, ImportError, AttributeError) as error:
            raise ValueError(f"{type(base_model).__name__} cannot switch to eager attention ({error})") from None
    totals, count = None, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], model.tokenizer.pad_token_id)
        inputs = model.prepare_inputs(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device))
        attentions = base_model(**inputs, output_attentions=True, use_cache=False).attentions
        if not attentions or any(layer is None for layer in attentions):
            raise ValueError(f"{type(base_model).__name__} returns no attention weights with its attention kernel")
        text_mask = inputs["attention_mask"][:, num_virtual:].bool()  # [B, T], the real text positions
        shares = []
        for layer in attentions:  # [B, H, V + T, V + T]
            to_prompt = layer[:, :, num_virtual:, :num_virtual].float().sum(-1).mean(1)  # [B, T]
            shares.append(to_prompt[text_mask].sum())
        batch_totals = torch.stack(shares)  # [layers]
        totals = batch_totals if totals is None else totals + batch_totals
        count += int(text_mask.sum())
    return (totals / count).tolist()


def uniform_attention_share(examples: list[Example], num_virtual_tokens: int) -> float:
    """The share `attention_to_prompt` would measure if every position attended evenly to all it
    can see: text position t (1-based) sees V virtual tokens among V + t keys."""
    shares = [num_virtual_tokens / (num_virtual_tokens + t) for example in examples for t in range(1, len(example.input_ids) + 1)]
    return sum(shares) / len(shares)


def analyze(
    model: SoftPromptModel,
    top_k: int = 5,
    rows: list[dict] | None = None,
    batch_size: int = 8,
    initial_prompt: torch.Tensor | None = None,
    metrics_file: str | Path | None = None,
    chance_seed: int = 0,
) -> dict:
    """Every figure of the analysis as a JSON-ready dict (see the module docstring). `rows` (in the
    checkpoint's template) add the ablation, hard-prompt and attention figures; `metrics_file` (the
    run's metrics.jsonl) adds the drift over training and the probe's lines. "readings" and
    "chance" hold the same summary figures for the prompt and for each chance prompt (drawn from
    `chance_seed`)."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("analysis decodes tokens: load the model with its tokenizer (tokenizer=...)")
    prompt = model.prompt.weight.detach().float().cpu()  # [V, D]
    embeddings = model.base_model.get_input_embeddings().weight.detach().float().cpu()  # [N, D]
    neighbours = nearest_tokens(prompt, embeddings, tokenizer, top_k)
    norms, vocabulary_norms = norm_figures(prompt, embeddings)
    tokens = [{"index": i, "neighbours": neighbours[i], **norms[i]} for i in range(len(neighbours))]
    if initial_prompt is not None:
        per_token_cosine = torch.cosine_similarity(prompt, initial_prompt.float(), dim=-1).tolist()
        per_token_distance = (prompt - initial_prompt.float()).norm(dim=-1).tolist()
        for token, cosine, distance in zip(tokens, per_token_cosine, per_token_distance):
            token.update(cosine_to_initial=cosine, distance_to_initial=distance)
    figures = {
        "num_virtual_tokens": prompt.shape[0],
        "embed_dim": prompt.shape[1],
        "metadata": model.metadata,
        "tokens": tokens,
        "scripts": script_shares(neighbours),
        "top1_scripts": script_shares([row[:1] for row in neighbours]),
        "vocabulary_norms": vocabulary_norms,
        "pairwise_cosine": pairwise_cosine(prompt).tolist(),
        "drift": prompt_drift(prompt, initial_prompt) if initial_prompt is not None else None,
        "training": read_drift_curve(metrics_file) if metrics_file else None,
        "probe": read_probe_lines(metrics_file) if metrics_file else None,
        "readings": readings(prompt, embeddings, tokenizer, top_k),
    }
    chance = chance_prompts(prompt, embeddings, chance_seed, len(tokenizer), tokenizer.all_special_ids)
    figures["chance"] = {
        name: {**readings(drawn["weight"], embeddings, tokenizer, top_k), **({"ids": drawn["ids"]} if "ids" in drawn else {})}
        for name, drawn in chance.items()
    }
    if rows:
        chance_weights = {name: drawn["weight"] for name, drawn in chance.items()}
        figures["data"] = analyze_rows(model, rows, embeddings, [row[0]["id"] for row in neighbours], batch_size, chance_weights)
        for name, shares in figures["data"].pop("chance_attention").items():
            figures["chance"][name]["attention_to_prompt"] = shares
    return figures


def analyze_rows(
    model: SoftPromptModel, rows: list[dict], embeddings: torch.Tensor, nearest_ids: list[int], batch_size: int,
    chance_weights: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Loss (and label-scoring accuracy, when the checkpoint has label words) with the soft prompt,
    without a prompt, as its nearest hard prompt, and with each virtual token ablated in turn;
    and the attention the text gives the prompt per layer, and ("chance_attention") the same for
    each of `chance_weights` `[V, D]` in the prompt's place (None where there are no weights)."""
    template = model.metadata.get("template")
    if not template:
        raise ValueError("the checkpoint records no template: the rows cannot be laid out as in training")
    check_template_columns(template, rows, "--data")
    loss_on, max_length = model.metadata.get("loss_on") or "all", model.metadata.get("max_length") or 256
    examples, _ = tokenize_rows(model.tokenizer, template, rows, max_length, loss_on)
    if not examples:
        raise ValueError("no usable rows in --data (empty fields, or no completion left within max_length)")
    labels = model.metadata.get("label_words")
    if labels and any(row[template_fields(template)[-1]] not in labels for row in rows):
        labels = None  # rows whose label is not a label word: no accuracy, the loss still holds
    model.eval()
    prompt = model.prompt.weight.detach().clone()  # [V, D]
    mean_embedding = embeddings.mean(dim=0).to(prompt)  # [D]
    hard_prompt = embeddings[nearest_ids].to(prompt)  # [V, D]
    figures = {
        "rows": len(examples),
        "loss_on": loss_on,
        "soft_prompt": scores_on(model, examples, rows, labels, batch_size),
        "no_prompt": scores_on(model, examples, rows, labels, batch_size, use_prompt=False),
        "hard_prompt": {"ids": nearest_ids, "text": model.tokenizer.decode(nearest_ids)},
    }
    with swapped_prompt(model, hard_prompt):
        figures["hard_prompt"].update(scores_on(model, examples, rows, labels, batch_size))
    ablation = []
    for index in tqdm(range(prompt.shape[0]), desc="ablating virtual tokens", unit="token", leave=False):
        ablated = prompt.clone()
        ablated[index] = mean_embedding
        with swapped_prompt(model, ablated):
            ablation.append({"index": index, **scores_on(model, examples, rows, labels, batch_size)})
    figures["ablation"] = ablation
    figures["chance_attention"] = dict.fromkeys(chance_weights or {})
    try:
        figures["attention_to_prompt"] = attention_to_prompt(model, examples, batch_size)
        figures["attention_uniform_share"] = uniform_attention_share(examples, model.num_virtual_tokens)
        for name, weight in (chance_weights or {}).items():
            with swapped_prompt(model, weight.to(prompt)):
                figures["chance_attention"][name] = attention_to_prompt(model, examples, batch_size)
    except ValueError as error:
        figures["attention_to_prompt"] = None
        figures["attention_note"] = f"no attention figures: {error}"
    return figures


def read_drift_curve(metrics_file: str | Path) -> list[dict] | None:
    """The logged steps' loss, prompt norm and drift from a run's metrics.jsonl (None when the run
    predates drift logging)."""
    lines = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    keys = ("step", "loss", "prompt_norm", "prompt_distance", "prompt_cosine")
    curve = [{key: line[key] for key in keys} for line in lines if "prompt_distance" in line]
    return curve or None


def read_probe_lines(metrics_file: str | Path) -> list[dict] | None:
    """The run's `--probe` lines, {"step", "probe": [{"text", "continuation", "scripts"}, ...]} in step
    order (None when it logged none)."""
    lines = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    return [line for line in lines if "probe" in line] or None


# -- the terminal report and the command line -------------------------------------------------------


def format_report(figures: dict) -> str:
    """The figures as a readable table."""
    vocabulary = figures["vocabulary_norms"]
    lines = [
        f"{figures['num_virtual_tokens']} virtual tokens of size {figures['embed_dim']}; vocabulary norms: "
        f"median {vocabulary['median']:.3f}, 5-95% {vocabulary['p5']:.3f}-{vocabulary['p95']:.3f}, max {vocabulary['max']:.3f}",
    ]
    if figures["drift"]:
        drift = figures["drift"]
        lines.append(f"drift from the initial prompt: distance {drift['prompt_distance']:.3f}, mean cosine {drift['prompt_cosine']:.3f}")
    else:
        lines.append("drift: the checkpoint holds no initial prompt (initial_prompt.safetensors)")
    has_initial = figures["drift"] is not None
    lines += ["", f"{'tok':>3} {'norm':>8} {'pct':>5} {'cos0':>6} {'script':>13}  nearest tokens (cosine)"]
    for token in figures["tokens"]:
        cosine = f"{token['cosine_to_initial']:6.3f}" if has_initial else f"{'-':>6}"
        neighbours = ", ".join(f"{n['text']!r} {n['similarity']:.2f}" for n in token["neighbours"])
        script = next(iter(script_shares([token["neighbours"]])))  # the most common among its neighbours
        lines.append(f"{token['index']:>3} {token['norm']:8.3f} {token['norm_percentile']:5.1f} {cosine} {script:>13}  {neighbours}")
    lines += ["", *format_chance(figures)]
    data = figures.get("data")
    if data:
        def described(scores: dict) -> str:
            text = f"loss {scores['loss']:.4f}"
            return text + (f", accuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}" if "accuracy" in scores else "")

        lines += [
            "",
            f"on {data['rows']} rows (loss on {data['loss_on']}):",
            f"  soft prompt:  {described(data['soft_prompt'])}",
            f"  hard prompt:  {described(data['hard_prompt'])}",
            f"  no prompt:    {described(data['no_prompt'])}",
            f"  hard prompt text: {data['hard_prompt']['text']!r}",
            "",
            "ablation (token replaced by the mean vocabulary embedding): loss change"
            + (", accuracy change" if "accuracy" in data["soft_prompt"] else ""),
        ]
        full = data["soft_prompt"]
        for entry in data["ablation"]:
            line = f"  {entry['index']:>3} {entry['loss'] - full['loss']:+.4f}"
            if "accuracy" in entry:
                line += f" {entry['accuracy'] - full['accuracy']:+.3f}"
            lines.append(line)
        if data["attention_to_prompt"] is not None:
            shares = " ".join(f"{share:.2f}" for share in data["attention_to_prompt"])
            lines += [
                "",
                f"attention share of the text to the prompt, layer 1..{len(data['attention_to_prompt'])}: {shares}",
                f"  (evenly spread attention would give {data['attention_uniform_share']:.2f})",
            ]
            for name, chance in figures["chance"].items():
                if chance.get("attention_to_prompt"):
                    shares = " ".join(f"{share:.2f}" for share in chance["attention_to_prompt"])
                    lines.append(f"  chance, {CHANCE_NAMES[name]}: {shares}")
        else:
            lines += ["", data["attention_note"]]
    if figures.get("probe"):
        lines += ["", *format_probe(figures["probe"])]
    return "\n".join(lines)


CHANCE_NAMES = {"random_vectors": "random vectors of the prompt's norms", "random_tokens": "a random hard prompt"}


def format_chance(figures: dict) -> list[str]:
    """Each summary reading of the prompt beside its chance levels."""
    columns = {"prompt": figures["readings"], **figures["chance"]}

    def scripts(shares: dict[str, float]) -> str:
        return ", ".join(f"{script} {share:.0%}" for script, share in shares.items())

    lines = [f"readings against chance: prompt | chance: {' | '.join(CHANCE_NAMES[name] for name in figures['chance'])}"]
    for key, label in (("nearest_cosine", "nearest-token cosine (top 1)"), ("nearest_cosine_top_k", "nearest-token cosine (top k)"),
                       ("pairwise_cosine_mean", "pairwise cosine, mean"), ("pairwise_cosine_max", "pairwise cosine, max")):
        if figures["readings"][key] is not None:
            lines.append(f"  {label:<30} " + " | ".join(f"{column[key]:6.3f}" for column in columns.values()))
    lines.append(f"  scripts of all the neighbours: {scripts(figures['readings']['scripts'])}")
    lines += [f"    chance, {CHANCE_NAMES[name]}: {scripts(chance['scripts'])}" for name, chance in figures["chance"].items()]
    return lines


def format_probe(probe_lines: list[dict]) -> list[str]:
    """The `--probe` texts' continuations at the first and the last logged evaluation."""
    lines = []
    for line in probe_lines[:1] + probe_lines[1:][-1:]:  # the first, and the last when it is another
        lines.append(f"probe at step {line['step']}:")
        for entry in line["probe"]:
            shares = ", ".join(f"{script} {share:.0%}" for script, share in entry["scripts"].items()) or "no letters"
            lines.append(f"  {entry['text']!r} -> {entry['continuation']!r} ({shares})")
    return lines


def run(options: argparse.Namespace) -> dict:
    """What `analyze.py` does (see its --help): analyse, print, and write the JSON and plots."""
    if options.top_k < 1 or options.rows < 1 or options.batch_size < 1:
        raise ValueError("--top-k, --rows and --batch-size must be at least 1")
    if (options.layers is not None or options.reference is not None) and not options.describe:
        raise ValueError("--layers and --reference say what --describe does: add --describe")
    pick_device(options.device)  # a device this machine has, before anything is loaded
    if not Path(options.checkpoint).is_dir():  # before the minutes of loading a model
        raise ValueError(f"checkpoint directory {options.checkpoint} does not exist")
    rows = None
    if options.data:
        rows = load_rows(options.data)[: options.rows]
    model = load_prompted_model(options.model, options.checkpoint, device=options.device)
    model.eval()
    if options.describe:
        layer_grid(model.base_model.config.num_hidden_layers, options.layers)  # bad --layers before the work
    metrics_file = Path(options.checkpoint).parent / METRICS_FILE
    initial_prompt = load_initial_prompt(options.checkpoint)
    figures = analyze(
        model,
        top_k=options.top_k,
        rows=rows,
        batch_size=options.batch_size,
        initial_prompt=initial_prompt,
        metrics_file=metrics_file if metrics_file.is_file() else None,
    )
    figures.update(checkpoint=portable_path(str(options.checkpoint)), model=portable_path(options.model))
    print(format_report(figures))
    if options.describe:
        figures["descriptions"] = describe(model, options.layers, references=options.reference, initial_prompt=initial_prompt)
        print("\n" + format_descriptions(figures["descriptions"]))
    if options.json:
        write_output(options.json, json.dumps(figures, indent=2) + "\n")
        print(f"\nfigures written to {options.json}")
    if options.plot:
        from .analysis_plots import write_plots

        written = write_plots(figures, options.plot)
        print(f"plots written to {options.plot}: {', '.join(path.name for path in written)}")
    return figures
