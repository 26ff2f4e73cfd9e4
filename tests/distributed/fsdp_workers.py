"""What each rank of ``test_fsdp.py`` runs: one DPO step of a tiny Llama sharded with FSDP2 (``fully_shard`` on the
head, every decoder layer and the root; the reference sharded too), through the helpers ``FusedDPOTrainer`` calls
(``hidden_states_in_forward`` for the reference, ``loss_in_forward`` for the policy), on this rank's half of the
global batch. The gathered gradients must equal one process's on the whole batch; FSDP2's warnings are errors."""

from __future__ import annotations

import copy
import warnings

import torch
import torch.distributed as dist

PAIRS, SEQ = 4, 12


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 200, (2 * PAIRS, SEQ), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompts
    return ids, labels


def _pairs(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's share of the pairs: its chosen rows, then its rejected rows."""
    per = PAIRS // world
    chosen, rejected = x[:PAIRS], x[PAIRS:]
    return torch.cat([chosen[rank * per:(rank + 1) * per], rejected[rank * per:(rank + 1) * per]])


def _loss(model, ref, ids, labels, loss_type: str):
    from dpo_kernels import fused_dpo_loss
    from dpo_kernels.integrations.transformers import hidden_states_in_forward, loss_in_forward

    with torch.no_grad():
        reference = hidden_states_in_forward(ref, input_ids=ids)

    def loss(policy):
        out = fused_dpo_loss(labels=labels, policy_hidden=policy.final, lm_head_weight=policy.head_weight,
                             ref_hidden=reference.final, ref_lm_head_weight=reference.head_weight,
                             loss_type=loss_type, beta=0.2, shift=True, backend="torch")
        return out.loss, out

    return loss_in_forward(model, loss, input_ids=ids)[0]


def fsdp_step_checks(rank: int, world: int, loss_type: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from dpo_kernels.integrations.synthetic import tiny_causal_lm
    from dpo_kernels.integrations.transformers import add_hidden_states_forward, head_is_sharded

    warnings.filterwarnings("error", module="torch.distributed.fsdp")  # e.g. "returned a view tensor"

    ids, labels = _batch()
    model = tiny_causal_lm("llama")
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    # one process, the whole batch
    single, single_ref = copy.deepcopy(model), copy.deepcopy(ref)
    for m in (single, single_ref):
        add_hidden_states_forward(m)
    _loss(single, single_ref, ids, labels, loss_type).backward()
    expected = {n: p.grad for n, p in single.named_parameters()}

    # FSDP2 over the group, half the pairs each
    mesh = init_device_mesh("cpu", (world,))
    for m in (model, ref):
        add_hidden_states_forward(m)
        fully_shard(m.lm_head, mesh=mesh)
        for layer in m.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
    assert head_is_sharded(model) and head_is_sharded(ref) and not head_is_sharded(single)
    loss = _loss(model, ref, _pairs(ids, rank, world), _pairs(labels, rank, world), loss_type)
    loss.backward()
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor()
        e = expected[name]
        err = (grad - e).abs().max().item() / max(e.abs().max().item(), 1e-12)
        assert err <= 1e-5, f"rank {rank}: FSDP2 gradient of {name} differs from one process by {err:.2e}"
    assert isinstance(model.lm_head.weight, DTensor), "the head is sharded again after the step"
    dist.barrier()
