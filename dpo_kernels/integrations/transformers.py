"""Hugging Face causal LMs on the fused head: per-token log-probs from hidden states, never the logits.

- :func:`causal_lm_hidden_states` runs the backbone and returns the final hidden states, those of chosen
  intermediate layers (through the final norm by default), the output head and the logit post-processing the
  model's config asks for (Gemma 2's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's
  ``logits_scaling``). These are the inputs of :func:`dpo_kernels.fused_dpo_loss` and the linear primitives.
- :func:`patch_causal_lm` makes ``model(input_ids, labels=labels)`` return :class:`TokenLogprobsOutput` (per-token
  log-probs, the mean NLL as ``loss``, per-layer log-probs for ``intermediate_layers``) through
  :func:`dpo_kernels.linear_token_logprobs`. A forward without labels, and so ``generate``, is the original one.
- :func:`add_hidden_states_forward` makes ``model(..., dpo_kernels_hidden_states=HiddenStatesRequest(...))``
  compute the hidden states, and a loss on them, inside the model's own forward and the head's own forward, so
  that a wrapper's forward (DDP's gradient synchronisation, FSDP2's and DeepSpeed ZeRO-3's parameter gathering,
  accelerate's autocast) runs as for any other call.

Works for Llama, Mistral, Qwen2, Gemma 2 and any model whose head is a plain ``nn.Linear`` reached through
``get_output_embeddings()`` and whose backbone is ``model.model`` (or ``base_model``) with a final ``norm``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from ..primitives import linear_token_logprobs

_ORIGINAL = "_dpo_kernels_original_forward"


def logit_transform(config) -> dict:
    """``softcap`` and ``logit_scale`` of the model's logits, read from its (text) config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    if scale is None and getattr(text, "logits_scaling", None):  # Granite divides its logits by logits_scaling
        scale = 1.0 / text.logits_scaling
    return {"softcap": getattr(text, "final_logit_softcapping", None) or None,
            "logit_scale": 1.0 if scale is None else float(scale)}


@dataclass
class CausalLMHidden:
    """What the fused head needs. ``final [B, T, D]`` is the backbone's output (final norm applied);
    ``layers[k] [B, T, D]`` the output of decoder layer ``k`` (1-based), through the final norm when asked;
    ``aux_loss``: a Mixture-of-Experts model's load-balancing loss when the call asked for ``output_router_logits``
    (unweighted, as the model's own forward returns it), else ``None``."""

    final: torch.Tensor
    layers: dict[int, torch.Tensor]
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None
    softcap: float | None
    logit_scale: float
    aux_loss: torch.Tensor | None = None

    def head_options(self) -> dict:
        return {"softcap": self.softcap, "logit_scale": self.logit_scale}


def _backbone(model):
    for name in ("model", "base_model"):
        module = getattr(model, name, None)
        if module is not None and module is not model:
            return module
    raise TypeError(f"{type(model).__name__}: no backbone found at .model or .base_model")


def causal_lm_hidden_states(model, *args, layers: Sequence[int] = (), apply_final_norm: bool = True, **kwargs):
    """Run ``model``'s backbone on the usual inputs and return :class:`CausalLMHidden`."""
    backbone = _backbone(model)
    num_layers = model.config.get_text_config().num_hidden_layers
    for k in layers:
        if not 1 <= k <= num_layers:
            raise ValueError(f"layers must be decoder layers in [1, {num_layers}], got {k}")
    kwargs["use_cache"] = False
    out = backbone(*args, output_hidden_states=bool(layers), **kwargs)
    norm = getattr(backbone, "norm", None)
    if layers and apply_final_norm and norm is None:
        raise TypeError(f"{type(model).__name__}: apply_final_norm=True but the backbone has no .norm")
    picked = {}
    for k in layers:
        h = out.hidden_states[k]
        # the last entry is the backbone's output, already through the final norm
        picked[k] = norm(h) if apply_final_norm and k < num_layers else h
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(model).__name__}: the output head is {type(head).__name__}, not a plain nn.Linear")
    aux = None
    if kwargs.get("output_router_logits"):
        aux = router_aux_loss(model, out.router_logits, kwargs.get("attention_mask"))
    return CausalLMHidden(out.last_hidden_state, picked, head.weight, head.bias, **logit_transform(model.config),
                          aux_loss=aux)


def router_aux_loss(model, router_logits, attention_mask) -> torch.Tensor:
    """A Mixture-of-Experts model's load-balancing loss from its backbone's router logits, as the model's own forward
    (and TRL's fused head) computes it: transformers' Mixtral ``load_balancing_loss_func``, which every MoE family
    shares, with the config's expert counts."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    config = model.config.get_text_config()
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None) or getattr(
        model, "num_experts", None)
    per_token = getattr(config, "num_experts_per_tok", None) or getattr(model, "num_experts_per_tok", None)
    if experts is None or per_token is None or router_logits is None:
        raise TypeError(f"{type(model).__name__}: output_router_logits was asked for, but the model names no expert "
                        "counts (num_experts / num_local_experts, num_experts_per_tok) or returned no router logits")
    return load_balancing_loss_func(router_logits, experts, per_token, attention_mask)


@dataclass
class TokenLogprobsOutput(ModelOutput):
    """Output of a patched forward with labels. ``token_logps [B, T-1]`` score ``labels[:, 1:]`` (0 where masked);
    ``loss`` is their mean NLL over unmasked tokens (Hugging Face's causal LM loss); ``layer_token_logps[k]`` the same
    from intermediate layer ``k``. No logits are built."""

    loss: torch.Tensor | None = None
    token_logps: torch.Tensor | None = None
    layer_token_logps: dict | None = None
    logits: torch.Tensor | None = None


HIDDEN_STATES_KWARG = "dpo_kernels_hidden_states"
_HEAD_KWARG = "dpo_kernels_consume"
# keyword arguments wrappers such as PEFT pass along that the backbone does not take (or that we set ourselves)
_NOT_FOR_THE_BACKBONE = ("labels", "return_dict", "output_hidden_states", "output_attentions", "logits_to_keep",
                         "num_items_in_batch", "use_cache")


@dataclass(frozen=True)
class HiddenStatesRequest:
    """What ``model(..., dpo_kernels_hidden_states=request)`` computes inside the model's forward: the hidden states
    of ``layers`` (and the final ones, through the final norm per ``apply_final_norm``), then ``consume(hidden)``
    called inside the output head's own forward, whose result the model's forward returns. Without ``consume`` the
    forward returns :class:`CausalLMHidden` (the head's parameters as they are: fine under DDP, not under FSDP or
    ZeRO-3, whose head is only whole inside a forward).

    Why inside both forwards: FSDP2 gathers a module's parameters (and, in the backward, reduce-scatters their
    gradients) around that module's forward, and so does DeepSpeed ZeRO-3; a head used inside them is gathered for
    the fused projection in the forward and again in the backward, and its gradient reaches the shards, exactly as
    for ``nn.Linear``'s own product, with no full copy held by this package. ``consume`` should return a tuple whose
    first item is the loss tensor: wrappers find the tensors of a forward's output by walking tuples."""

    layers: tuple[int, ...] = ()
    apply_final_norm: bool = True
    consume: object = None


def add_hidden_states_forward(model):
    """Patch ``model`` (a causal LM; the base model of a PEFT model) and its output head in place for
    :class:`HiddenStatesRequest`; any other call is the forward each had. Idempotent; returns ``model``.

    Trainers call the *wrapped* model this way: under DDP the wrapper's forward prepares the gradient all-reduce of
    every parameter the loss then reaches, the head included; under FSDP2 and ZeRO-3, see the request's docstring."""
    if getattr(model, "_dpo_kernels_hidden_states", False):
        return model
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, dpo_kernels_hidden_states: HiddenStatesRequest | None = None, **kwargs):
        if dpo_kernels_hidden_states is None:
            return original(*args, **kwargs)
        request = dpo_kernels_hidden_states
        for name in _NOT_FOR_THE_BACKBONE:
            kwargs.pop(name, None)
        hidden = causal_lm_hidden_states(self, *args, layers=request.layers,
                                         apply_final_norm=request.apply_final_norm, **kwargs)
        if request.consume is None:
            return hidden
        head = self.get_output_embeddings()
        return head(hidden.final, **{_HEAD_KWARG: lambda weight, bias: request.consume(
            dataclasses.replace(hidden, head_weight=weight, head_bias=bias))})

    _add_head_forward(model.get_output_embeddings())
    model.forward = types.MethodType(forward, model)
    model._dpo_kernels_hidden_states = True
    return model


def _add_head_forward(head: torch.nn.Linear) -> None:
    """``head(x, dpo_kernels_consume=fn)`` returns ``fn(head.weight, head.bias)``, evaluated inside the head's forward
    (and so inside any gathering its wrappers do around it)."""
    if getattr(head, "_dpo_kernels_consume", False):
        return
    original = head.forward

    def forward(self, *args, dpo_kernels_consume=None, **kwargs):
        if dpo_kernels_consume is None:
            return original(*args, **kwargs)
        return dpo_kernels_consume(self.weight, self.bias)

    head.forward = types.MethodType(forward, head)
    head._dpo_kernels_consume = True


class _Carried:
    """Carries a result out of a wrapped forward untouched: FSDP2 walks tuples, dicts and dataclasses in a module's
    output (DeepSpeed walks containers) to hook their tensors, and only the loss should be hooked."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value


def loss_in_forward(model, loss_fn, *, layers: Sequence[int] = (), apply_final_norm: bool = True, **model_kwargs):
    """``(loss, result)`` of ``loss_fn(hidden) -> (loss, result)`` evaluated inside ``model``'s forward and its
    head's forward (see :class:`HiddenStatesRequest`), ``model`` called as given: wrapped by DDP, FSDP2 or DeepSpeed,
    or not. ``loss`` is the tensor the wrapped forward returned, the one to call ``backward`` on (DeepSpeed and DDP
    hook the backward onto it). ``model``'s causal LM must have been through :func:`add_hidden_states_forward`."""

    def consume(hidden):
        loss, result = loss_fn(hidden)
        return loss, _Carried(result)

    loss, carried = model(**model_kwargs, **{HIDDEN_STATES_KWARG: HiddenStatesRequest(tuple(layers), apply_final_norm,
                                                                                      consume)})
    return loss, carried.value


def hidden_states_in_forward(model, *, layers: Sequence[int] = (), apply_final_norm: bool = True,
                             **model_kwargs) -> CausalLMHidden:
    """A frozen model's (a reference's) :class:`CausalLMHidden` from its forward, through its wrappers, with a head
    that stays valid after the forward: copied there when it is sharded (FSDP2, ZeRO-3), since it is whole only inside
    the forward; used as is otherwise. Call under ``torch.no_grad()``."""
    copy = head_is_sharded(model)

    def consume(hidden):
        if copy:
            bias = None if hidden.head_bias is None else hidden.head_bias.detach().clone()
            hidden = dataclasses.replace(hidden, head_weight=hidden.head_weight.detach().clone(), head_bias=bias)
        return hidden.final, _Carried(hidden)

    return model(**model_kwargs, **{HIDDEN_STATES_KWARG: HiddenStatesRequest(tuple(layers), apply_final_norm,
                                                                            consume)})[1].value


def unwrap_causal_lm(model):
    """The causal LM inside a DeepSpeed engine or DDP wrapper (``.module``) and a PEFT model (its base model)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_is_sharded(model) -> bool:
    """Whether ``model``'s output head is sharded outside its forward: an FSDP2 parameter (a DTensor) or a ZeRO-3
    partitioned one. Looked at outside the forward, where the sharding shows."""
    from torch.distributed.tensor import DTensor

    weight = unwrap_causal_lm(model).get_output_embeddings().weight
    return isinstance(weight, DTensor) or hasattr(weight, "ds_id")


def patch_causal_lm(model, *, backend: str = "auto", temperature: float = 1.0,
                    intermediate_layers: Sequence[int] = (), apply_final_norm: bool = True):
    """Patch ``model`` in place (see the module docstring); returns it. :func:`unpatch_causal_lm` undoes it."""
    if hasattr(model, _ORIGINAL):
        unpatch_causal_lm(model)
    original = model.forward
    layers = tuple(intermediate_layers)

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self, *args, labels=None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        for unused in ("logits_to_keep", "num_items_in_batch"):
            kwargs.pop(unused, None)
        hidden = causal_lm_hidden_states(self, *args, layers=layers, apply_final_norm=apply_final_norm, **kwargs)
        shifted = labels[:, 1:]
        options = dict(bias=hidden.head_bias, temperature=temperature, backend=backend, **hidden.head_options())
        token_logps = linear_token_logprobs(hidden.final[:, :-1], hidden.head_weight, shifted, **options)
        count = (shifted != -100).sum().clamp(min=1)
        layer_logps = {k: linear_token_logprobs(h[:, :-1], hidden.head_weight, shifted, **options)
                       for k, h in hidden.layers.items()}
        return TokenLogprobsOutput(loss=-token_logps.sum() / count, token_logps=token_logps,
                                   layer_token_logps=layer_logps or None)

    setattr(model, _ORIGINAL, original)
    model.forward = types.MethodType(forward, model)
    return model


def unpatch_causal_lm(model):
    """Restore the forward :func:`patch_causal_lm` replaced; a no-op on an unpatched model."""
    original = model.__dict__.pop(_ORIGINAL, None)
    if original is None:
        return model
    if getattr(original, "__func__", None) is type(model).forward:
        model.__dict__.pop("forward", None)  # back to the class's own forward
    else:
        model.forward = original  # another patch (e.g. TRL's fused head) was there before ours
    return model
