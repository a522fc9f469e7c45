"""Steering: add ``strength × W_dec[feature]`` to the activation at the SAE's hook, then generate.

::

    result = steered_generation(model, sae, "My favourite food is", feature=123, strength=8.0)
    print(format_side_by_side(result))

``strength`` is in the hook's activation units along the decoder row (SAELens's and Neuronpedia's
convention: ``x ← x + strength · W_dec[f]``); with unit-norm decoder rows it is the length of the
added vector. Templeton et al. 2024 ("Scaling Monosemanticity", feature steering) clamp instead;
adding is the simpler, commonly used form (Turner et al. 2023, activation addition).

Generation is a plain sampling loop that reruns the whole sequence every step (no KV cache), so
"only generated positions" means exactly the positions after the prompt, in every forward pass.
Both runs draw from one fixed seed, so with the same seed the unsteered run is reproducible and
the steered run differs only through the steering.
"""

from __future__ import annotations

import contextlib
import textwrap
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

from pipeline.analysis.features import check_feature_ids
from pipeline.analysis.matching import check_sae_fits_model, tokenize
from pipeline.analysis.splice import replace_activation
from pipeline.errors import ConfigError
from pipeline.sae import SAE


@contextlib.contextmanager
def steer(model: Any, sae: SAE, feature: int, strength: float, *, from_position: int = 0) -> Iterator[None]:
    """While open, every forward pass adds ``strength × W_dec[feature]`` at the SAE's hook, at every
    position ``>= from_position`` (0: all positions).

    Raises:
        ConfigError: a latent id out of range, or a hook whose activation is not ``[batch, pos, d_in]``.
    """
    check_feature_ids(sae, [feature])
    direction = strength * sae.W_dec[feature].detach().float()

    def add(activation: Tensor) -> Tensor:
        if activation.shape[-1] != direction.shape[0]:
            raise ConfigError(f"steering needs a [batch, pos, d_in] hook; {sae.cfg.hook_name!r} is shaped "
                              f"{tuple(activation.shape)}.")
        out = activation.clone()
        out[:, from_position:] += direction.to(activation.device, activation.dtype)
        return out

    with replace_activation(model, sae.cfg.hook_name, add):
        yield


@torch.no_grad()
def sample(model: Any, tokens: Tensor, max_new_tokens: int, *, temperature: float, top_k: int | None,
           seed: int, stop_at_eos: bool = True) -> Tensor:
    """Continue ``tokens: [1, pos]`` by up to ``max_new_tokens`` sampled tokens; ``[1, pos + new]``.

    ``temperature`` 0 is greedy; otherwise softmax(logits / temperature) restricted to the
    ``top_k`` most likely tokens (None: all), drawn from a generator seeded with ``seed``.
    """
    generator = torch.Generator(device=tokens.device).manual_seed(seed)
    eos = getattr(model.tokenizer, "eos_token_id", None)
    for _ in range(max_new_tokens):
        logits = model(tokens, return_type="logits")[0, -1].float()
        if temperature == 0:
            nxt = logits.argmax()
        else:
            if top_k is not None:
                logits = logits.masked_fill(logits < logits.topk(top_k).values[-1], -torch.inf)
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[0]
        tokens = torch.cat([tokens, nxt.view(1, 1).to(tokens.dtype)], 1)
        if stop_at_eos and eos is not None and int(nxt) == eos:
            break
    return tokens


@dataclass
class SteeringResult:
    """An unsteered and a steered continuation of one prompt.

    Fields: prompt; feature, strength, only_generated, seed (the settings); unsteered, steered
    (the generated text after the prompt).
    """

    prompt: str
    feature: int
    strength: float
    only_generated: bool
    seed: int
    unsteered: str
    steered: str


def steered_generation(model: Any, sae: SAE, prompt: str, feature: int, strength: float, *,
                       max_new_tokens: int = 30, only_generated: bool = False, temperature: float = 0.7,
                       top_k: int | None = 50, seed: int = 0, model_name: str | None = None) -> SteeringResult:
    """Generate from ``prompt`` without and with steering along ``W_dec[feature]`` (see the module docstring).

    Args:
        only_generated: steer only positions after the prompt (default: every position).
        temperature, top_k, seed: sampling settings shared by both runs (see :func:`sample`).
        model_name: the name the model was loaded by, to check against the SAE's.

    Raises:
        ConfigError: SAE and model do not fit, a latent id out of range, or bad sampling settings.
    """
    check_sae_fits_model(sae, model, model_name=model_name)
    if max_new_tokens < 1 or temperature < 0 or (top_k is not None and top_k < 1):
        raise ConfigError(f"need max_new_tokens >= 1, temperature >= 0 and top_k >= 1 (or none); got "
                          f"{max_new_tokens}, {temperature}, {top_k}.")
    tokens = tokenize(model, sae, prompt)
    settings = dict(temperature=temperature, top_k=top_k, seed=seed)
    plain = sample(model, tokens, max_new_tokens, **settings)
    with steer(model, sae, feature, strength, from_position=tokens.shape[1] if only_generated else 0):
        steered = sample(model, tokens, max_new_tokens, **settings)
    n = tokens.shape[1]
    return SteeringResult(prompt, feature, strength, only_generated, seed,
                          model.to_string(plain[0, n:]), model.to_string(steered[0, n:]))


def format_side_by_side(result: SteeringResult, width: int = 44) -> str:
    """The two continuations in two wrapped columns under a header naming the settings."""
    left = textwrap.wrap(result.unsteered.replace("\n", "↵ "), width) or [""]
    right = textwrap.wrap(result.steered.replace("\n", "↵ "), width) or [""]
    where = "generated positions" if result.only_generated else "all positions"
    lines = [f"prompt: {result.prompt!r}  (feature {result.feature}, strength {result.strength:g}, "
             f"{where}, seed {result.seed})",
             f"{'unsteered':<{width}} | steered", f"{'-' * width}-+-{'-' * width}"]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        lines.append(f"{a:<{width}} | {b}")
    return "\n".join(lines)
