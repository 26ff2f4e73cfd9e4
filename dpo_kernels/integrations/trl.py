"""Run TRL's own trainers on dpo_kernels: ``patch()`` / ``unpatch()``.

TRL computes per-token log-probs through one fused LM head, ``trl.trainer.utils._ChunkedLogProbFunction``: in TRL
1.15 and 1.16 every trainer does (DPO, KTO, GRPO, RLOO, SFT: ``add_fused_lm_head`` makes
``model(..., fused_lm_head=True)`` call it); in TRL 1.14 the DPO, KTO and GRPO trainers call it directly. ``patch()``
replaces it with :class:`FusedLogProbs`, which computes the log-probs on dpo_kernels' linear path (the backend you
choose; gradients flow to hidden states, head weight and bias) and the fields TRL only logs (entropy, mean logits,
top-1 accuracy, log sum p^2) in the same forward pass, with no extra product of the head. The trainers, their losses
and their metrics are otherwise TRL's own.

    from dpo_kernels.integrations import trl as dk_trl
    dk_trl.patch()            # before building the trainer; dk_trl.unpatch() restores TRL's function
    trainer = DPOTrainer(...)

Supported: TRL 1.14, 1.15 and 1.16 (:data:`SUPPORTED_TRL`), the releases whose ``DPOTrainer`` runs on the fused LM
head (TRL 1.14 only with ``use_liger_kernel=True``, TRL's switch for it then; ``patch()`` warns once), and any
later release whose function still has one of their two interfaces (checked from its signature); any other release
is refused with the supported range in the message. Older releases' ``DPOTrainer`` computes full logits, so there
is nothing for ``patch()`` to replace there (use :func:`dpo_kernels.fused_dpo_loss` directly).

Entropy is returned for logging: a trainer that backpropagates through it (an entropy bonus) gets a clear error
instead of a silently missing gradient; ``unpatch()`` for such trainers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import inspect
import logging
import sys
import warnings

import torch

from ..checks import check_head, check_label_range, check_schedule
from ..ops import dispatch
from ..ops.common import LinearHead
from ..ops.linear.entropy_grad import differentiable_entropy
from ..ops.registry import require_backend
from ..options import TokenOptions
from ..primitives import linear_token_logprobs

_log = logging.getLogger("dpo_kernels")

SUPPORTED_TRL = ("1.14", "1.15", "1.16")
_ALL_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# The fused head's arguments after (hidden, weight): TRL 1.14 returns (log_probs, entropy); 1.15 and 1.16 take the
# outputs wanted and return five fields.
_ARGUMENTS = ("bias", "targets", "temperature", "chunk_size", "final_logit_softcapping", "logit_scale")
_INTERFACES = {_ARGUMENTS: "two_outputs", (*_ARGUMENTS, "outputs"): "five_outputs"}

_state: dict[str, object] = {}


def _trl_version() -> str:
    try:
        return importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("dpo_kernels.integrations.trl needs TRL: pip install 'trl>=1.14,<1.17'") from None


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _trl_utils():
    """``(trl.trainer.utils, interface of its fused LM head)`` after checking the installed TRL is one ``patch()``
    supports."""
    version = _trl_version()
    supported = f"TRL {SUPPORTED_TRL[0]} to {SUPPORTED_TRL[-1]}"
    if _minor(version) < _minor(SUPPORTED_TRL[0]):
        raise RuntimeError(
            f"dpo_kernels.integrations.trl supports {supported}; found TRL {version}, whose DPOTrainer computes full "
            "logits (nothing for patch() to replace). Upgrade TRL, or call dpo_kernels.fused_dpo_loss yourself."
        )
    import trl.trainer.utils as utils

    interface = _interface(utils, version)
    if interface is None:
        raise RuntimeError(
            f"dpo_kernels.integrations.trl supports {supported}; found TRL {version}, whose fused LM head "
            "(trl.trainer.utils._ChunkedLogProbFunction) has an interface this version of dpo_kernels does not know."
        )
    return utils, interface


def _interface(utils, version: str) -> str | None:
    """``"two_outputs"`` (TRL 1.14), ``"five_outputs"`` (1.15, 1.16) or ``None``, from the function's signature."""
    function = _state.get("original", getattr(utils, "_ChunkedLogProbFunction", None))
    if function is None:  # TRL 1.15+ without Triton leaves it None; add_fused_lm_head still calls it with outputs
        return "five_outputs" if _minor(version) >= (1, 15) and hasattr(utils, "add_fused_lm_head") else None
    params = tuple(inspect.signature(function.forward).parameters)[3:]  # after ctx, hidden, weight
    return _INTERFACES.get(params)


@dataclasses.dataclass(frozen=True)
class PatchReport:
    """What :func:`patch` did: the TRL version and its fused head's interface, the options the patched head runs
    with, and the TRL modules whose ``_ChunkedLogProbFunction`` now is dpo_kernels'."""

    trl_version: str
    interface: str
    backend: str
    tile_budget_mb: float | None
    modules: tuple[str, ...]
    schedule: str = "auto"
    eager_budget_mb: float | None = None


def patch(*, backend: str = "auto", tile_budget_mb: float | None = None, schedule: str = "auto",
          eager_budget_mb: float | None = None) -> PatchReport:
    """Make TRL's fused LM head use dpo_kernels with ``backend`` (and the linear path's ``tile_budget_mb``; a
    trainable head's ``schedule`` and ``eager_budget_mb``, as for :func:`dpo_kernels.linear_token_logprobs`).
    Idempotent; call before creating the trainer. Returns a :class:`PatchReport` and logs it at INFO level on the
    ``dpo_kernels`` logger."""
    utils, interface = _trl_utils()
    require_backend(backend, available=True)  # validated now, not at the first training step
    TokenOptions(tile_budget_mb=tile_budget_mb)
    check_schedule(schedule, eager_budget_mb)
    if "original" not in _state:
        original = utils._ChunkedLogProbFunction
        _state["interface"] = interface
        _state["original"] = original
        # TRL 1.14's trainers import the function by name: every module holding it gets ours (TRL 1.15+ without
        # Triton holds None there; modules without the name are left alone)
        _state["modules"] = [m for name, m in list(sys.modules.items()) if name.startswith("trl.")
                             and "_ChunkedLogProbFunction" in vars(m) and m._ChunkedLogProbFunction is original]
    FusedLogProbs.backend = backend
    FusedLogProbs.tile_budget_mb = tile_budget_mb
    FusedLogProbs.schedule, FusedLogProbs.eager_budget_mb = schedule, eager_budget_mb
    FusedLogProbs.interface = _state["interface"]
    for module in _state["modules"]:
        module._ChunkedLogProbFunction = FusedLogProbs
    report = PatchReport(_trl_version(), FusedLogProbs.interface, backend, tile_budget_mb,
                         tuple(m.__name__ for m in _state["modules"]), schedule, eager_budget_mb)
    _log.info("dpo_kernels: TRL %s's fused LM head (%s) now runs dpo_kernels, backend=%r, tile_budget_mb=%s, "
              "schedule=%r, eager_budget_mb=%s, in %s", report.trl_version, report.interface, backend, tile_budget_mb,
              schedule, eager_budget_mb, ", ".join(report.modules) or "trl.trainer.utils")
    if FusedLogProbs.interface == "two_outputs" and not _state.get("warned_1_14"):
        _state["warned_1_14"] = True
        warnings.warn(
            "TRL 1.14's DPOTrainer and KTOTrainer take the fused LM head that patch() replaces only with "
            "use_liger_kernel=True in their config (TRL's switch for its chunked path; it needs liger-kernel installed "
            "and also has transformers apply Liger's kernels to the model, which liger_kernel_config can turn off); "
            "without it they compute full logits and dpo_kernels is not used.", stacklevel=2)
    return report


def unpatch() -> None:
    """Restore TRL's own chunked log-prob function."""
    if "original" in _state:
        original = _state.pop("original")
        for module in _state.pop("modules"):
            module._ChunkedLogProbFunction = original


def is_patched() -> bool:
    return "original" in _state


class FusedLogProbs:
    """Drop-in for TRL's ``ChunkedLogProbFunction``: the same ``apply`` arguments, and the result in the installed
    TRL's form (``(log_probs, entropy)`` for TRL 1.14; the 5-tuple of 1.15 and 1.16)."""

    backend = "auto"
    tile_budget_mb: float | None = None
    schedule = "auto"
    eager_budget_mb: float | None = None
    interface = "five_outputs"

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=_ALL_OUTPUTS):
        two_outputs = FusedLogProbs.interface == "two_outputs"
        if two_outputs:
            outputs = ("log_probs", "entropy")
        opts = TokenOptions(temperature=float(temperature), softcap=final_logit_softcapping,
                            logit_scale=float(logit_scale), tile_budget_mb=FusedLogProbs.tile_budget_mb)
        hidden, targets = hidden.unsqueeze(0), targets.unsqueeze(0)
        check_head(("hidden", hidden), ("weight", weight), ("bias", bias), targets)
        facts = check_label_range(targets, weight.shape[0], opts, name="targets", counts=True)  # the one host read
        wanted = set(outputs) - {"log_probs"}
        out = dispatch.linear_stats(LinearHead(hidden, weight, bias), None, targets, opts, FusedLogProbs.backend,
                                    logging=bool(wanted), head_context=_gather_lm_head_context(),
                                    kept_count=None if facts is None else facts.kept,
                                    schedule=FusedLogProbs.schedule, eager_budget_mb=FusedLogProbs.eager_budget_mb)
        log_probs = out.logp
        logged = {k: v.squeeze(0) for k, v in (out.logged or {}).items() if k in wanted}
        entropy = logged.get("entropy")
        if entropy is not None and (hidden.requires_grad or weight.requires_grad):
            # differentiable, as TRL's own: a trainer with an entropy term in its loss gets its gradient (one more
            # pass over the vocabulary in the backward, only then)
            entropy = differentiable_entropy(out.logged["entropy"], log_probs, LinearHead(hidden, weight, bias),
                                             targets, opts).squeeze(0)
        if two_outputs:
            return log_probs.squeeze(0), entropy
        return (log_probs.squeeze(0), entropy, logged.get("log_sum_sq_probs"), logged.get("mean_logits"),
                logged.get("is_top1"))


def _gather_lm_head_context():
    """TRL's context that gathers a ZeRO-3-partitioned head (the version was checked when the head was patched; this
    runs at every forward, so it is not checked again)."""
    import trl.trainer.utils as utils

    return utils.maybe_gather_lm_head_ctx


# --------------------------------------------------------------------------------------------- TDPO and layers


def _trainer_classes():
    _trl_utils()  # version check
    from trl import DPOConfig, DPOTrainer

    return DPOConfig, DPOTrainer


# How FusedDPOTrainer treats each field DPOConfig adds to TrainingArguments (the Trainer's own fields act as in
# DPOTrainer, whose training loop FusedDPOTrainer keeps; it replaces only the loss). A test walks DPOConfig's fields, so
# a field a new TRL adds fails it until it is classified here; at construction an unclassified field set away from its
# default is refused by name.
#   "loss":    passed to fused_dpo_loss with TRL's meaning (tested against stock DPOTrainer)
#   "trl":     acts through DPOTrainer's own __init__, data collation, training step or callbacks, kept as they are
#   "checked": honoured where FusedDPOTrainer can, refused by name before training where it cannot (_refuse_unsupported)
DPO_CONFIG_FIELDS = {
    "learning_rate": "trl", "model_init_kwargs": "trl", "trust_remote_code": "trl", "disable_dropout": "trl",
    "dataset_num_proc": "trl", "max_length": "trl", "truncation_mode": "trl", "pad_to_multiple_of": "trl",
    "pad_token": "trl", "precompute_ref_batch_size": "trl", "activation_offloading": "trl",
    "ref_model_mixup_alpha": "trl", "ref_model_sync_steps": "trl",
    "loss_type": "loss", "loss_weights": "loss", "beta": "loss", "ld_alpha": "loss", "f_divergence_type": "loss",
    "f_alpha_divergence_coef": "loss", "use_weighting": "loss", "discopop_tau": "loss",
    "router_aux_loss_coef": "loss", "label_smoothing": "checked", "padding_free": "checked",
    "precompute_ref_log_probs": "checked", "sync_ref_model": "checked",
}


def _dpo_config_fields(DPOConfig) -> dict:
    """DPOConfig's own fields (beyond TrainingArguments'), name -> dataclass field."""
    from transformers import TrainingArguments

    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {f.name: f for f in dataclasses.fields(DPOConfig) if f.name not in base}


# FusedDPOConfig's kernel fields: ``kernel_<name>`` is fused_dpo_loss's ``<name>`` (the prefix keeps them apart from
# TrainingArguments' own backends and schedules), with DPOLossConfig's default; the one table both directions use.
KERNEL_FIELDS = {"kernel_backend": "backend", "kernel_tile_budget_mb": "tile_budget_mb",
                 "kernel_schedule": "schedule", "kernel_eager_budget_mb": "eager_budget_mb"}
# an old field name still taken, with a FutureWarning: old name -> the field now
RENAMED_FIELDS = {"tdpo_alpha": "alpha"}


def check_kernel_fields(args) -> None:
    """``FusedDPOConfig``'s own fields, checked under the names the user set, when the config is made; a field set
    under its old name (:data:`RENAMED_FIELDS`) moves to its new one, with a ``FutureWarning``."""
    from ..dpo import SCHEDULES
    from ..validation import is_finite_number, is_positive_finite

    for old, new in RENAMED_FIELDS.items():
        value = getattr(args, old)
        if value is None:
            continue
        if not (is_finite_number(value) and value >= 0):
            raise ValueError(f"{old} (TDPO2's weight of the KL difference) must be a number >= 0, got {value!r}")
        warnings.warn(f"FusedDPOConfig.{old} is now {new} (fused_dpo_loss's name); {old} will be removed",
                      FutureWarning, stacklevel=4)
        setattr(args, new, value)
        setattr(args, old, None)

    if not isinstance(args.kernel_backend, str):
        raise TypeError(f"kernel_backend must be a string, got {type(args.kernel_backend).__name__}")
    try:
        require_backend(args.kernel_backend)
    except ValueError as err:
        raise ValueError(f"kernel_backend: {err}") from None
    if args.kernel_schedule not in SCHEDULES:
        raise ValueError(f"kernel_schedule must be one of {SCHEDULES}, got {args.kernel_schedule!r}")
    for name in ("kernel_eager_budget_mb", "kernel_tile_budget_mb"):
        value = getattr(args, name)
        if value is not None and not is_positive_finite(value):
            raise ValueError(f"{name} must be None (the default) or a number of MiB > 0, got {value!r}")
    names = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    if args.orpo_nll_over_prompt and ("orpo" not in names or args.intermediate_layers):
        raise ValueError("orpo_nll_over_prompt=True changes the NLL of loss_type 'orpo' (at the final layer): "
                         f"loss_type {names} with intermediate_layers={args.intermediate_layers} has none to change")
    if not (is_finite_number(args.alpha) and args.alpha >= 0):
        raise ValueError(f"alpha (TDPO2's weight of the KL difference) must be a number >= 0, got {args.alpha!r}")
    if args.kernel_schedule == "eager" and args.kernel_backend == "reference":
        raise ValueError("kernel_schedule='eager' runs on the tile kernels, which kernel_backend='reference' (the "
                         "oracle) does not have: use kernel_backend 'auto', 'torch', 'cpu', 'cuda' or 'triton', or "
                         "kernel_schedule='auto'")


def check_eager_budget(args, model, dataset, config) -> None:
    """With ``kernel_schedule='eager'``, refuse at construction a ``kernel_eager_budget_mb`` that cannot hold the
    longest pair of the tokenized training set (its two completions, each at most ``max_length`` tokens), instead
    of failing at the first training step that meets it. A dataset without ``chosen_ids`` / ``rejected_ids``
    columns (an iterable one) is not read."""
    from ..ops.linear.eager import EagerNeed
    from ..ops.linear.plan import kept_store_dtype
    from ..ops.linear.products import Products
    from ..options import statistics_dtype
    from .transformers import unwrap_causal_lm

    if args.kernel_schedule != "eager":
        return
    longest = _longest_pair(dataset, args.max_length)
    if longest is None:
        return
    weight = unwrap_causal_lm(model).get_output_embeddings().weight
    sdt = statistics_dtype(weight.dtype)
    # the products of a training step: in the autocast dtype under bf16 / fp16 mixed precision, else the head's
    compute = torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) else \
        weight.dtype
    operands = Products.in_dtype(compute, weight.device.type, sdt).operand_dtype
    need = EagerNeed(longest, weight.shape[0], weight.shape[1], sdt, keep_ref_tiles=config.uses_token_kl,
                     half_weight_grad=weight.requires_grad and weight.dtype != sdt,
                     store_dtype=kept_store_dtype(operands, sdt, config.token_options),
                     grad_itemsize=weight.element_size() if weight.requires_grad else 0)
    groups = need.groups(need.budget_bytes(args.kernel_eager_budget_mb, weight.device))
    if isinstance(groups, str):
        why = groups.replace("eager_budget_mb", "kernel_eager_budget_mb")
        raise ValueError(f"kernel_schedule='eager' cannot run the longest pair of the training set ({longest[0]} + "
                         f"{longest[1]} completion tokens): {why}. Raise kernel_eager_budget_mb, or set "
                         "kernel_schedule='auto'")


def _longest_pair(dataset, max_length: int | None) -> tuple[int, int] | None:
    """The completion lengths (chosen, rejected) of the pair with the most, each capped at ``max_length``."""
    names = getattr(dataset, "column_names", None) or ()
    if "chosen_ids" not in names or "rejected_ids" not in names or len(dataset) == 0:
        return None
    cap = max_length or float("inf")
    pairs = [(min(len(c), cap), min(len(r), cap)) for c, r in zip(dataset["chosen_ids"], dataset["rejected_ids"],
                                                                    strict=True)]
    return tuple(int(x) for x in max(pairs, key=sum))


def loss_config(args):
    """The :class:`~dpo_kernels.dpo.DPOLossConfig` a ``FusedDPOConfig`` trains with: every loss field of
    ``DPO_CONFIG_FIELDS`` with TRL's meaning, checked here, before training."""
    from ..dpo import DPOLossConfig
    from ..losses import objective

    check_kernel_fields(args)  # again: a field may have been set after the config was made
    names = list(args.loss_type)
    smoothing = args.label_smoothing
    if smoothing and "sigmoid" in names:
        raise ValueError(
            f"label_smoothing={smoothing} with loss_type 'sigmoid': TRL's DPOTrainer ignores label_smoothing for "
            "'sigmoid' while dpo_kernels applies it (conservative DPO), so FusedDPOTrainer would train another "
            "objective than DPOTrainer; it refuses. Set label_smoothing=0, or call dpo_kernels.fused_dpo_loss("
            "loss_type='sigmoid', label_smoothing=...) for conservative DPO.")
    # TRL applies label_smoothing to robust, exo_pair, aot and aot_unpaired (and dpo_kernels' simpo takes it) and
    # ignores it for every other loss type: so does FusedDPOTrainer
    takes_smoothing = any(objective(n).smoothing is not None for n in names)
    return DPOLossConfig(
        loss_type=names, loss_weights=args.loss_weights, beta=args.beta, alpha=args.alpha,
        label_smoothing=smoothing if takes_smoothing else 0.0, discopop_tau=args.discopop_tau,
        f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        use_weighting=args.use_weighting, ld_alpha=args.ld_alpha, cpo_alpha=args.cpo_alpha,
        alphapo_alpha=args.alphapo_alpha, shift=True,
        **{name: getattr(args, field) for field, name in KERNEL_FIELDS.items()})


def _refuse_unsupported(args, DPOConfig, config) -> None:
    """Refuse, naming the field, what FusedDPOTrainer cannot honour; run before DPOTrainer's ``__init__``."""
    _refuse_precomputed_reference(args)
    unknown = [name for name, f in _dpo_config_fields(DPOConfig).items() if name not in DPO_CONFIG_FIELDS
               and getattr(args, name) != (f.default_factory() if callable(f.default_factory) else f.default)]
    if unknown:
        raise ValueError(f"DPOConfig field(s) {unknown} of this TRL are not known to FusedDPOTrainer, which would "
                         "ignore them; leave them at their defaults or use DPOTrainer with dpo_kernels.integrations."
                         "trl.patch()")
    if args.sync_ref_model and not config.uses_reference:
        raise ValueError(f"sync_ref_model=True: loss_type {list(config.loss_types)} uses no reference model, so "
                         "there is none to synchronise; set sync_ref_model=False")


@contextlib.contextmanager
def _no_reference_model_loaded(trainer_module, model):
    """For objectives without a reference: DPOTrainer's ``__init__`` would load a reference copy of the policy from its
    config's model id (from the hub for a model built in code). Inside this context TRL's loader returns ``None`` for
    that copy, and only for it (a policy given by name is still loaded, by the first call)."""
    original = trainer_module.create_model_from_path
    calls = []

    def create(path, *args, **kwargs):
        calls.append(path)
        return original(path, *args, **kwargs) if isinstance(model, str) and len(calls) == 1 else None

    trainer_module.create_model_from_path = create
    try:
        yield
    finally:
        trainer_module.create_model_from_path = original


def _refuse_precomputed_reference(args) -> None:
    """TDPO's KL and the reference at intermediate layers need the reference model's hidden states: precomputed
    sequence log-probs do not hold them."""
    if not args.precompute_ref_log_probs:
        return
    tdpo = [t for t in args.loss_type if str(t).startswith("tdpo")]
    if tdpo:
        raise ValueError(f"loss_type {tdpo} needs the reference model's distribution at every token (TDPO's KL); "
                         "precompute_ref_log_probs=True keeps only its sequence log-probs. Set "
                         "precompute_ref_log_probs=False.")
    if args.intermediate_layers and args.reference_at_intermediate_layers:
        raise ValueError("reference_at_intermediate_layers=True reads the reference model at each intermediate layer; "
                         "precompute_ref_log_probs=True keeps only its final-layer log-probs. Set "
                         "reference_at_intermediate_layers=False (the precomputed reference for every layer) or "
                         "precompute_ref_log_probs=False.")


@functools.cache
def make_fused_dpo_classes():
    """``(FusedDPOConfig, FusedDPOTrainer)``, built once on the installed TRL's ``DPOConfig`` / ``DPOTrainer``; also
    importable by name from this module (``from dpo_kernels.integrations.trl import FusedDPOTrainer``)."""
    from dataclasses import dataclass, field

    DPOConfig, DPOTrainer = _trainer_classes()
    from ..dpo import DPOLossConfig, PreferenceInputs, compute_dpo_loss
    from ..ops.linear.plan import DEFAULTS_TEXT, EAGER_DEFAULTS_TEXT
    from ..intermediate import intermediate_dpo_loss
    from .transformers import add_hidden_states_forward, hidden_states_in_forward, loss_in_forward, unwrap_causal_lm

    @dataclass
    class FusedDPOConfig(DPOConfig):
        """``DPOConfig`` plus: every dpo_kernels ``loss_type`` (including ``tdpo1`` / ``tdpo2``, and the
        reference-free ``orpo`` and ``cpo``, for which no reference model is built), ``alpha`` (TDPO2's, as
        ``fused_dpo_loss``'s; ``tdpo_alpha`` is its old name, still taken with a ``FutureWarning``), ``cpo_alpha``,
        ``alphapo_alpha``, ``orpo_nll_over_prompt`` (TRL's ORPOTrainer's NLL), intermediate-layer DPO (``intermediate_layers``, ``intermediate_weight``,
        ``apply_final_norm``, ``reference_at_intermediate_layers``), and the kernel options ``kernel_<name>`` for
        ``fused_dpo_loss``'s ``<name>`` (:data:`KERNEL_FIELDS`: ``backend``, ``tile_budget_mb``, ``schedule``,
        ``eager_budget_mb``, with its defaults), checked under these names when the config is made."""

        alpha: float = field(default=DPOLossConfig.alpha,
                             metadata={"help": "TDPO2's alpha (weight of the KL difference)."})
        tdpo_alpha: float | None = field(default=None, metadata={"help": "Deprecated: the old name of alpha."})
        cpo_alpha: float = field(default=DPOLossConfig.cpo_alpha,
                                 metadata={"help": "CPO's weight of the chosen responses' NLL (loss_type 'cpo')."})
        alphapo_alpha: float = field(default=DPOLossConfig.alphapo_alpha,
                                     metadata={"help": "AlphaPO's alpha for loss_type 'cpo' (TRL CPOConfig.alpha)."})
        orpo_nll_over_prompt: bool = field(default=False, metadata={
            "help": "ORPO's NLL over prompt and completion tokens, as TRL's ORPOTrainer takes it (default: over the "
                    "completion tokens the log-probs score)."})
        intermediate_layers: list[int] | None = field(default=None, metadata={"help": "Layers for intermediate DPO."})
        intermediate_weight: float = field(default=0.5, metadata={"help": "lambda of intermediate-layer DPO."})
        apply_final_norm: bool = field(default=True, metadata={"help": "Final norm on intermediate hidden states."})
        reference_at_intermediate_layers: bool = field(
            default=True, metadata={"help": "Read the reference at the same layers (else at its final layer)."}
        )
        kernel_backend: str = field(default=DPOLossConfig.backend, metadata={"help": "dpo_kernels backend."})
        kernel_tile_budget_mb: float | None = field(default=DPOLossConfig.tile_budget_mb, metadata={
            "help": f"MiB of scratch for the fused head's tiles (default: {DEFAULTS_TEXT})."})
        kernel_schedule: str = field(default=DPOLossConfig.schedule, metadata={
            "help": "'eager' (the policy's gradients computed in the forward), 'recompute' or 'auto'."})
        kernel_eager_budget_mb: float | None = field(default=DPOLossConfig.eager_budget_mb, metadata={
            "help": f"MiB of kept tiles for the eager schedule (default: {EAGER_DEFAULTS_TEXT})."})

        def __post_init__(self):
            check_kernel_fields(self)  # before TRL's own checks, which know nothing of these fields
            super().__post_init__()

    class FusedDPOTrainer(DPOTrainer):
        """``DPOTrainer`` whose loss is :func:`dpo_kernels.fused_dpo_loss` (or the intermediate-layer loss) on the
        policy's and the reference's hidden states: log-probs, reference log-probs and TDPO's per-token KL in one
        fused pass, never the logits. Logs TRL's metric names plus ``kl/chosen``, ``kl/rejected`` (TDPO),
        ``logps/accuracies`` and ``loss/layer_<k>``. A PEFT policy without ``ref_model`` is its own reference with
        the adapters disabled."""

        _NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}

        def __init__(self, model, ref_model=None, args=None, *rest, **kwargs):
            if args is None:  # as DPOTrainer does
                name = model if isinstance(model, str) else model.config._name_or_path
                args = FusedDPOConfig(f"{name.split('/')[-1]}-DPO")
            if not isinstance(args, FusedDPOConfig):
                raise TypeError(f"args must be a FusedDPOConfig (DPOConfig plus the fused trainer's options), got "
                                f"{type(args).__name__}")
            self._loss_config = loss_config(args)
            _refuse_unsupported(args, DPOConfig, self._loss_config)
            skip_reference = (not self._loss_config.uses_reference and ref_model is None
                              and not args.precompute_ref_log_probs)
            loading = (_no_reference_model_loaded(sys.modules[DPOTrainer.__module__], model) if skip_reference
                       else contextlib.nullcontext())
            with loading:
                super().__init__(model, ref_model, args, *rest, **kwargs)
            check_eager_budget(args, self.model, self.train_dataset, self._loss_config)
            if getattr(self, "padding_free", False):  # TRL 1.14-1.16 turn it off themselves, with a warning
                raise ValueError("FusedDPOTrainer takes padded batches (one row a sequence); this TRL packed them "
                                 "(padding_free=True). Set padding_free=False.")
            # hidden states come out of each model's own forward, through whatever wraps it (DDP, FSDP, DeepSpeed)
            for model in (self.model, self.ref_model):
                if model is not None:
                    add_hidden_states_forward(unwrap_causal_lm(model))

        def _reference(self, model, model_kwargs, layers):
            """The reference's hidden states, and a head that stays valid after its forward (TDPO's backward reads
            it again). Under the accelerator's autocast, as TRL runs its reference: accelerate put that autocast
            around the reference's original forward, which the hidden-states forward does not go through."""
            options = dict(layers=layers, apply_final_norm=self.args.apply_final_norm, **model_kwargs)
            with torch.no_grad(), self.accelerator.autocast():
                if self.ref_model is not None:
                    return hidden_states_in_forward(self.ref_model, **options)
                unwrapped = self.accelerator.unwrap_model(model)
                if hasattr(unwrapped, "peft_config"):  # TRL's rule: the "ref" adapter if loaded, else no adapter
                    from trl.trainer.utils import use_adapter

                    with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                        return hidden_states_in_forward(model, **options)
                raise ValueError("FusedDPOTrainer needs a ref_model, a PEFT policy, or precompute_ref_log_probs")

        def _orpo_prompt_nll(self, policy, inputs, labels, out, config):
            """What turns ORPO's NLL over the chosen completions (``S_c / n_c``, inside ``out.loss``) into TRL's
            ORPOTrainer's, over their prompt and completion tokens (``(S_c + S_p) / (n_c + n_p)``), weighted as the
            ``orpo`` loss is: ``S_p`` from one more fused pass over the chosen rows' prompt tokens (the policy only)."""
            rows = labels.shape[0] // 2
            prompt = inputs["input_ids"].masked_fill((inputs["attention_mask"] == 0) | (inputs["completion_mask"] == 1),
                                                     -100)[:rows, 1:]
            prompt_logps = linear_token_logprobs(policy.final[:rows, :-1], policy.head_weight, prompt,
                                                 bias=policy.head_bias, backend=config.backend,
                                                 tile_budget_mb=config.tile_budget_mb, **policy.head_options())
            s_c, s_p = -out.chosen_logps.sum(), -prompt_logps.sum()
            n_c, n_p = (labels[:rows, 1:] != -100).sum(), (prompt != -100).sum()
            weight = config.weights[config.loss_types.index("orpo")]
            return weight * ((s_c + s_p) / (n_c + n_p).clamp(min=1) - s_c / n_c.clamp(min=1))

        def _compute_loss(self, model, inputs, return_outputs=False):
            args = self.args
            mode = "train" if self.model.training else "eval"
            model_kwargs = {k: v for k, v in inputs.items() if k not in self._NON_MODEL_KEYS}
            labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
            layers = tuple(args.intermediate_layers or ())
            tensors = dict(labels=labels)
            reference = None
            if not self._loss_config.uses_reference:
                pass  # SimPO, SFT: no reference is read, given or not
            elif self.precompute_ref_logps:
                tensors["ref_logps"] = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
            else:
                ref_layers = layers if args.reference_at_intermediate_layers else ()
                reference = self._reference(model, model_kwargs, ref_layers)
                tensors.update(ref_hidden=reference.final, ref_lm_head_weight=reference.head_weight,
                               ref_lm_head_bias=reference.head_bias)

            # a Mixture-of-Experts policy: its router's load-balancing loss, as DPOTrainer adds it (the reference's
            # routing is not asked for)
            policy_kwargs = dict(model_kwargs, output_router_logits=True) if self.aux_loss_enabled else model_kwargs

            def loss(policy):
                config = dataclasses.replace(self._loss_config, **policy.head_options())
                heads = dict(lm_head_weight=policy.head_weight, lm_head_bias=policy.head_bias)
                if not layers:
                    out = compute_dpo_loss(config, PreferenceInputs(policy_hidden=policy.final, **heads, **tensors))
                else:
                    ref_layer_hidden = None
                    if reference is not None and args.reference_at_intermediate_layers:
                        ref_layer_hidden = reference.layers
                    out = intermediate_dpo_loss(policy_hidden=policy.final, policy_layer_hidden=policy.layers,
                                                ref_layer_hidden=ref_layer_hidden,
                                                intermediate_weight=args.intermediate_weight, **heads, **tensors,
                                                **config.options())
                total = out.loss
                if args.orpo_nll_over_prompt:
                    total = total + self._orpo_prompt_nll(policy, inputs, labels, out, config)
                if self.aux_loss_enabled:
                    total = total + self.router_aux_loss_coef * policy.aux_loss
                return total, (out, policy.aux_loss)

            # inside the policy's forward and its head's, through whatever wraps them (DDP, FSDP2, ZeRO-3)
            loss_value, (out, aux_loss) = loss_in_forward(model, loss, layers=layers,
                                                          apply_final_norm=args.apply_final_norm, **policy_kwargs)
            for name, value in out.metrics.items():
                self._metrics[mode][name].append(value)
            if aux_loss is not None:
                self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
            if mode == "train":  # TRL's running count of the tokens trained on, over all ranks
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
                self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss_value, out) if return_outputs else loss_value

    return FusedDPOConfig, FusedDPOTrainer


def __getattr__(name: str):
    if name in ("FusedDPOConfig", "FusedDPOTrainer"):
        config_cls, trainer_cls = make_fused_dpo_classes()
        return config_cls if name == "FusedDPOConfig" else trainer_cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
