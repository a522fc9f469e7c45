"""Splicing an SAE into a model: the hook's activation replaced by the SAE's reconstruction.

This is the one splicing implementation of sae-pipeline: CE loss recovered
(:func:`pipeline.evals.ce_loss_recovered`), zero-ablation, latent ablations and caching all go
through :func:`replace_activation`. It plays the role of SAELens's ``HookedSAETransformer``
(``model.add_sae`` / ``run_with_cache_with_saes``) for any TransformerLens ``HookedTransformer``
or ``TransformerBridge``, without changing the model's modules::

    with splice_sae(model, sae, use_error_term=True) as spliced:
        logits = model(tokens)                              # unchanged, up to float rounding
        logits, latents = spliced.run_with_cache(tokens)    # latents["blocks.8.hook_resid_post.hook_sae_acts_post"]
        with spliced.hooks([("hook_sae_acts_post", ablate_latent_7)]):
            ablated = model(tokens)
    # here the model is back to its own hooks

Hook points of the splice (SAELens's names, prefixed with the model hook's name when cached):
``hook_sae_input`` ``[batch, pos, d_in]``, ``hook_sae_acts_post`` ``[batch, pos, d_sae]``,
``hook_sae_recons`` ``[batch, pos, d_in]``, ``hook_sae_error`` ``[batch, pos, d_in]`` (the
activation minus the reconstruction of the *un-hooked* latents, computed only with the error
term, as SAELens does) and ``hook_sae_output`` (what the model receives).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from pipeline.errors import ConfigError
from pipeline.sae import SAE

HOOK_NAMES = ("hook_sae_input", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error", "hook_sae_output")


@contextlib.contextmanager
def replace_activation(model: Any, hook_name: str, replacement: Callable[[Tensor], Tensor],
                       keep_mask: Tensor | None = None) -> Iterator[None]:
    """While open, every forward pass of ``model`` sees ``replacement(activation)`` at ``hook_name``.

    Args:
        model: a TransformerLens ``HookedTransformer`` or ``TransformerBridge`` (anything with the
            ``model.hooks(fwd_hooks=...)`` context manager).
        hook_name: e.g. ``"blocks.8.hook_resid_post"``.
        replacement: ``[batch, pos, ...] → same shape``; its output is cast to the activation dtype.
        keep_mask: optional ``[batch, pos]`` bool; True positions keep their clean activation (e.g.
            BOS, which SAEs are usually not trained on; SAELens's ``ignore_tokens``). Its batch size
            must match every forward pass made while the context is open.

    Only the hook this context added is removed on exit (TransformerLens's context levels), so
    hooks the caller added before or inside stay as they were.
    """

    def hook(activation: Tensor, hook: Any = None) -> Tensor:
        new = replacement(activation).to(activation.dtype)
        if keep_mask is not None:
            mask = keep_mask.to(activation.device).reshape(*keep_mask.shape, *([1] * (activation.dim() - 2)))
            new = torch.where(mask, activation, new)
        return new

    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        yield


class SAESplice(nn.Module):
    """The SAE as a module that maps a hook's activation to what the model should see instead.

    ``forward(activation: [batch, pos, ...]) → [batch, pos, ...]`` in the activation's shape: the
    trailing dims are flattened into d_in first (``attn.hook_z`` is ``[batch, pos, n_heads,
    d_head]``; the cache stores it flattened the same way). Without the error term the output is
    the reconstruction ``decode(encode(x))``; with it, ``decode(f') + (x - decode(f))`` where ``f``
    are the latents and ``f'`` the latents after any hook on ``hook_sae_acts_post``, so with no
    hooks the model's output is unchanged and an ablation changes it by exactly
    ``(f' - f) @ W_dec`` at this hook (SAELens's ``use_error_term``).
    """

    def __init__(self, sae: SAE, hook_name: str, *, use_error_term: bool = False, model: Any = None) -> None:
        super().__init__()
        self.sae = sae
        # a plain attribute, not a submodule: the splice must not own (or move, or save) the model
        object.__setattr__(self, "model", model)
        self._level = 0
        self.hook_name = hook_name
        self.use_error_term = use_error_term
        for name in HOOK_NAMES:
            point = HookPoint()
            point.name = f"{hook_name}.{name}"
            setattr(self, name, point)

    def hook_points(self) -> dict[str, HookPoint]:
        """``{full name: HookPoint}``, e.g. ``"blocks.8.hook_resid_post.hook_sae_acts_post"``."""
        return {point.name: point for point in (getattr(self, name) for name in HOOK_NAMES)}

    def forward(self, activation: Tensor) -> Tensor:
        x = activation.reshape(*activation.shape[:2], -1)
        x = self.hook_sae_input(x)
        latents = self.sae.encode(x)
        # a clone, so that a hook editing the latents in place leaves the clean ones for the error term
        hooked = self.hook_sae_acts_post(latents.clone() if self.use_error_term else latents)
        recons = self.hook_sae_recons(self.sae.decode(hooked))
        out = recons
        if self.use_error_term:
            # the error of the clean latents, so that ablating a latent moves the output by exactly its decoder row
            clean = self.sae.decode(latents)
            out = recons + self.hook_sae_error(x.to(clean.dtype) - clean)
        return self.hook_sae_output(out).reshape(activation.shape).to(activation.dtype)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: list[tuple[str, Callable]]) -> Iterator[None]:
        """Add TransformerLens-style hooks ``fn(tensor, hook) -> tensor | None`` to the splice's hook
        points (short names like ``"hook_sae_acts_post"`` or full names) while the context is open.

        Raises:
            ConfigError: a name that is not one of the splice's hook points.
        """
        self._level += 1
        level = self._level  # TransformerLens context level: on exit only this context's hooks go
        added = []
        try:
            for name, fn in fwd_hooks:
                point = self._point(name)
                point.add_hook(fn, level=level)
                added.append(point)
            yield
        finally:
            for point in added:
                point.remove_hooks("fwd", level=level)

    def run_with_cache(self, *model_args: Any, names: list[str] | None = None,
                       **model_kwargs: Any) -> tuple[Any, dict[str, Tensor]]:
        """Run the model once; return its output and ``{full hook name: tensor}`` of the splice's
        hook points (all of them, or ``names``), detached, e.g. the latents ``[batch, pos, d_sae]``
        under ``"<hook_name>.hook_sae_acts_post"``."""
        cache: dict[str, Tensor] = {}
        wanted = [self._point(name).name for name in (names or HOOK_NAMES)]

        def save(tensor: Tensor, hook: HookPoint) -> None:
            cache[hook.name] = tensor.detach()

        with self.hooks([(name, save) for name in wanted]):
            output = self.model(*model_args, **model_kwargs)
        return output, cache

    def _point(self, name: str) -> HookPoint:
        short = name.removeprefix(f"{self.hook_name}.")
        if short not in HOOK_NAMES:
            raise ConfigError(f"{name!r} is not a hook point of the SAE splice; use one of {', '.join(HOOK_NAMES)}.")
        return getattr(self, short)


@contextlib.contextmanager
def splice_sae(model: Any, sae: SAE, *, hook_name: str | None = None, use_error_term: bool = False,
               keep_mask: Tensor | None = None) -> Iterator[SAESplice]:
    """Splice ``sae`` into ``model`` at its hook while the context is open; yields the :class:`SAESplice`.

    Args:
        model: a TransformerLens ``HookedTransformer`` or ``TransformerBridge``.
        sae: the SAE; ``hook_name`` defaults to ``sae.cfg.hook_name``.
        use_error_term: add ``x - x̂`` back so the model's output is unchanged (see :class:`SAESplice`).
        keep_mask: ``[batch, pos]`` bool, positions that keep their clean activation (see
            :func:`replace_activation`).

    On exit the model hook and every hook added to the splice's hook points are removed.

    Raises:
        ConfigError: no hook name (neither given nor in the SAE's config).
    """
    hook_name = hook_name or sae.cfg.hook_name
    if not hook_name:
        raise ConfigError("the SAE's config names no hook_name; pass hook_name= (e.g. 'blocks.8.hook_resid_post').")
    spliced = SAESplice(sae, hook_name, use_error_term=use_error_term, model=model)
    try:
        with replace_activation(model, hook_name, spliced, keep_mask):
            yield spliced
    finally:
        for point in spliced.hook_points().values():
            point.remove_hooks("fwd", including_permanent=True)
