"""Per-rank memory model: parameter counts, model states under ZeRO 0-3, activations, loss.

Expected numbers are derived by hand below from the tiny preset's tensor shapes
(W = 32, M = 64, 2 + 2 blocks, 32 px images of 8 px patches, 16 tokens, vocab 64, E = 32).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from megaclip.config.model import load_preset
from megaclip.config.parallel import ParallelConfig
from megaclip.errors import ConfigError
from megaclip.model.blocks import ResidualBlock, run_blocks
from megaclip.model.clip import ClipModel
from megaclip.model.flops import block_params, model_cost
from megaclip.perf.memory import (
    BUCKET_ELEMS,
    alive_micro_batches,
    block_activation_bytes,
    default_stages,
    even_stages,
    layout_memory,
    loss_bytes,
    model_state_bytes,
    optimizer_wrapper,
    rank_model_states,
    stage_activation_bytes,
    stage_param_count,
    stage_params,
)
from megaclip.pipeline.partition import partition

TINY = load_preset("tiny")
W, M = 32, 64
# one block, every tensor listed: QKV w+b, out-proj w+b, fc1 w+b, fc2 w+b, ln_1, ln_2
BLOCK = (3 * W * W + 3 * W) + (W * W + W) + (W * M + M) + (M * W + W) + 2 * W + 2 * W  # 8544
# TP = 2: QKV, out-proj weight, fc1, fc2 weight halved; out-proj/fc2 biases and LNs whole
BLOCK_TP2 = (3 * W * W + 3 * W) // 2 + W * W // 2 + W + (W * M + M) // 2 + M * W // 2 + W + 4 * W
VISION_EMBED = 3 * 8 * 8 * W + W + (4 * 4 + 1) * W + 2 * W  # conv, class, positions, ln_pre
TEXT_EMBED = 64 * W + 16 * W  # token + positional embedding
HEADS = (2 * W + W * 32) + (2 * W + W * 32) + 1  # ln_post+proj, ln_final+text_proj, logit_scale


def test_hand_counts_are_what_we_think():
    assert BLOCK == 8544 and BLOCK_TP2 == 4368
    assert (VISION_EMBED, TEXT_EMBED, HEADS) == (6784, 2560, 2177)


def test_block_params():
    assert block_params(W, M, 1) == BLOCK
    assert block_params(W, M, 2) == BLOCK_TP2
    assert block_params(W, M, 4) == (BLOCK - 6 * W) // 4 + 6 * W


def test_whole_model_on_one_stage_equals_model_cost():
    n = stage_param_count(TINY, 1, (0, 2), (0, 2), first=True, last=True)
    assert n == VISION_EMBED + TEXT_EMBED + 4 * BLOCK + HEADS == 45697
    assert n == model_cost(TINY).params_total
    big = load_preset("ViT-G-14")
    assert stage_param_count(big, 1, (0, 48), (0, 32), True, True) == model_cost(big).params_total


def test_two_stages_tp2():
    stages = even_stages(TINY, 2)
    assert [(s.vision, s.text) for s in stages] == [((0, 1), (0, 1)), ((1, 2), (1, 2))]
    first = stage_param_count(TINY, 2, (0, 1), (0, 1), first=True, last=False)
    last = stage_param_count(TINY, 2, (1, 2), (1, 2), first=False, last=True)
    assert first == 2 * BLOCK_TP2 + VISION_EMBED + TEXT_EMBED == 18080
    assert last == 2 * BLOCK_TP2 + HEADS == 10913


def test_stage_count_matches_the_real_modules():
    """The pieces a stage holds, counted on a real (meta) ClipModel, tp = 1."""
    cfg = load_preset("ViT-B-32")
    with torch.device("meta"):
        model = ClipModel(cfg)

    def count(*mods: nn.Module) -> int:
        return sum(p.numel() for m in mods for p in m.parameters())

    vb, tb = list(model.visual.blocks.values()), list(model.text.blocks.values())

    first = count(model.visual.embed, model.text.embed, *vb[:5], *tb[:3])
    last = count(model.visual.head, model.text.head, *vb[5:], *tb[3:])
    last += model.logit_scale.numel()
    assert stage_param_count(cfg, 1, (0, 5), (0, 3), True, False) == first
    assert stage_param_count(cfg, 1, (5, 12), (3, 12), False, True) == last


def test_bad_ranges_and_tp_are_config_errors():
    with pytest.raises(ConfigError, match="vision block range"):
        stage_param_count(TINY, 1, (0, 3), (0, 2), True, True)
    with pytest.raises(ConfigError, match="tensor parallel size 3"):
        stage_param_count(TINY, 3, (0, 2), (0, 2), True, True)


def test_even_stages_balance_remainders():
    big = load_preset("ViT-G-14")  # 48 vision + 32 text blocks
    stages = even_stages(big, 5)
    nv = [s.vision[1] - s.vision[0] for s in stages]
    nt = [s.text[1] - s.text[0] for s in stages]
    assert nv == [9, 9, 10, 10, 10] and nt == [7, 7, 6, 6, 6]
    assert stages[0].first and stages[-1].last and stages[-1].vision[1] == 48
    with pytest.raises(ConfigError):
        even_stages(TINY, 5)


# ------------------------------------------------------------------ model states


def par(**kw) -> ParallelConfig:
    base = dict(tp=1, pp=1, dp=4, zero_stage=0, micro_batch_size=2, grad_accum_steps=3)
    return ParallelConfig(**{**base, "precision": "bf16", **kw})


def test_deepspeed_wrapper_choice():
    assert optimizer_wrapper(par(zero_stage=0, precision="fp32")) == "torch"
    assert optimizer_wrapper(par(zero_stage=0)) == "fp16_optimizer"
    assert optimizer_wrapper(par(zero_stage=0, pp=2)) == "bf16_optimizer"
    assert optimizer_wrapper(par(zero_stage=1, pp=2)) == "zero"
    assert optimizer_wrapper(par(zero_stage=1), grad_accum_fp32=True) == "bf16_optimizer"
    with pytest.raises(ConfigError, match="fp32 gradient accumulation"):
        optimizer_wrapper(par(zero_stage=0), grad_accum_fp32=True)


def test_model_states_zero_0_to_3_bf16():
    n = 45697  # the whole tiny model, pp = 1, tp = 1, dp = 4, m = 3
    z0 = model_state_bytes(n, par(zero_stage=0))
    assert (z0.params, z0.grads, z0.optimizer) == (2 * n, 2 * n, 12 * n)  # 16 bytes/param
    assert z0.step_transient == 4 * n + 2 * n  # fp32 flat grads + all-reduce buffer
    b = BUCKET_ELEMS
    z1 = model_state_bytes(n, par(zero_stage=1))
    # the reduced gradient partition only: DeepSpeed frees the full .grad as it reduces
    assert (z1.params, z1.grads, z1.optimizer) == (2 * n, 2 * n / 4, 3 * n)  # 12n / 4
    assert z1.buffers == 0
    assert z1.working == 2 * 2 * b + 2 * n  # two reduce buckets + full grads accumulated (m=3)
    assert z1.step_transient == n + 2 * n  # fp32 partition 4n/4 + all-gather bucket (n < 5e7)
    z1m1 = model_state_bytes(n, par(zero_stage=1, grad_accum_steps=1), overlap_comm=False)
    assert z1m1.working == 2 * b  # m = 1: no accumulation; one bucket without overlap_comm
    z2 = model_state_bytes(n, par(zero_stage=2))
    assert (z2.params, z2.grads, z2.optimizer) == (2 * n, 2 * n / 4, 3 * n)
    assert z2.working == 2 * 2 * b  # ZeRO-2 never holds full gradients
    live = 2 * BLOCK
    z3 = model_state_bytes(n, par(zero_stage=3), zero3_live_params=live, reduce_bucket_elems=7)
    assert (z3.params, z3.grads, z3.optimizer) == (2 * n / 4, 2 * n / 4, 3 * n)
    assert (z3.buffers, z3.working) == (2 * 7, 2 * live)  # persistent bucket; gathered blocks
    assert z3.model_states == z3.params + z3.grads + z3.optimizer
    # DeepSpeed's fp32 gradient buffer: the sub-group's full size (n < the 1e8 cap here)
    assert z3.grad_buffer == 4 * n
    assert z3.resident == z3.model_states + z3.buffers + z3.grad_buffer
    capped = model_state_bytes(n, par(zero_stage=3), zero3_sub_group_elems=1000)
    assert capped.grad_buffer == 4 * 1000


def test_rank_model_states_uses_the_pipeline_partition():
    p = par(zero_stage=1, pp=2, tp=2, precision="fp32")
    stages = partition(TINY, 2)
    for i, s in enumerate(stages):
        n = stage_params(TINY, 2, s)
        assert rank_model_states(TINY, p, i) == model_state_bytes(n, p)
    assert default_stages(TINY, 2) == tuple(stages)


def test_model_states_fp32_and_pipeline_bf16():
    n = 18080  # stage 0 of tp=2, pp=2
    fp32 = model_state_bytes(n, par(zero_stage=0, precision="fp32", tp=2, pp=2))
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4 * n, 4 * n, 8 * n)
    z1 = model_state_bytes(n, par(zero_stage=1, precision="fp32", tp=2, pp=2))
    assert (z1.params, z1.grads, z1.optimizer) == (4 * n, 4 * n / 4, 12 * n / 4)
    # BF16_Optimizer: bf16 params, lp grads + bf16 accumulation buffer, master+Adam over DP
    pipe = model_state_bytes(n, par(zero_stage=0, tp=2, pp=2))
    assert (pipe.params, pipe.grads, pipe.optimizer) == (2 * n, 4 * n, 3 * n)
    pipe32 = model_state_bytes(n, par(zero_stage=1, tp=2, pp=2), grad_accum_fp32=True)
    assert pipe32.params + pipe32.grads + pipe32.optimizer * 4 == 2 * n + 6 * n + 12 * n  # "20"


# ------------------------------------------------------------------ activations


def _saved_activation_bytes(fn, x: torch.Tensor, module: nn.Module) -> int:
    """Bytes of distinct storages autograd saves for backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_block_activation_formula_equals_saved_tensors(dtype, causal):
    width, mlp, heads, b, s = 64, 256, 4, 2, 17
    block = ResidualBlock(width, heads, mlp, causal=causal).to(dtype)
    x = torch.randn(b, s, width, dtype=dtype, requires_grad=True)
    measured = _saved_activation_bytes(block, x, block)
    a = torch.finfo(dtype).bits // 8
    # on CPU LayerNorm keeps mean/rstd in the input dtype (CUDA: fp32, the default)
    assert measured == block_activation_bytes(b * s, width, mlp, heads, 1, a, stats_bytes=a)


def test_checkpointed_blocks_save_only_their_inputs():
    width, b, s = 64, 2, 17
    blocks = nn.ModuleList(ResidualBlock(width, 4, 256) for _ in range(3)).to(torch.bfloat16)
    x = torch.randn(b, s, width, dtype=torch.bfloat16, requires_grad=True)
    measured = _saved_activation_bytes(lambda y: run_blocks(blocks, y, True), x, blocks)
    assert measured == 3 * b * s * width * 2


def test_stage_activations_by_hand():
    """tp = 1, pp = 1, b = 2, m = 3, bf16, the whole tiny model on one stage."""
    p = par(tp=1, pp=1, dp=1, activation_checkpointing=True, micro_batch_size=2)
    stage = even_stages(TINY, 1)[0]
    tv, tt = 2 * 17, 2 * 16  # tokens per micro-batch: 16 patches + class token, 16 text tokens
    in_v, in_t = 2 * tv * W, 2 * tt * W  # bf16 block inputs
    full_v = tv * (2 * (4 * W + 4 * W + 2 * M) + 4 * 4 + 16)
    full_t = tt * (2 * (4 * W + 4 * W + 2 * M) + 4 * 4 + 16)
    image = 4 * 2 * 3 * 32 * 32
    stored = 2 * in_v + 2 * in_t + image + 3 * in_v + in_t + 8 * tt
    work = max(full_v, full_t) + 2 * max(in_v, in_t)
    assert stage_activation_bytes(TINY, p, stage) == 3 * stored + work
    p0 = par(tp=1, pp=1, dp=1, activation_checkpointing=False, micro_batch_size=2)
    stored0 = 2 * full_v + 2 * full_t + image + 3 * in_v + in_t + 8 * tt
    assert stage_activation_bytes(TINY, p0, stage) == 3 * stored0 + 2 * max(in_v, in_t)


def test_keep_holds_every_micro_batch_recompute_does_not():
    p = par(pp=2, dp=2, zero_stage=1, grad_accum_steps=8)
    assert [alive_micro_batches(p, s, "keep") for s in (0, 1)] == [8, 8]
    assert [alive_micro_batches(p, s, "recompute") for s in (0, 1)] == [2, 1]
    stage = even_stages(TINY, 2)[1]
    one = stage_activation_bytes(TINY, p, stage, 1)
    two = stage_activation_bytes(TINY, p, stage, 2)
    eight = stage_activation_bytes(TINY, p, stage, 8)
    assert eight - one == 7 * (two - one)
    with pytest.raises(ConfigError, match="unknown schedule"):
        alive_micro_batches(p, 0, "1f1b")


def test_loss_memory_and_peak():
    p = par(tp=2, pp=2, dp=4, zero_stage=1, micro_batch_size=2, grad_accum_steps=3)
    n_global = 2 * 3 * 4
    assert loss_bytes(TINY, p) == 2 * (2 * n_global * 32 * 4) + 2 * 6 * n_global * 4
    first, last = layout_memory(TINY, p)
    assert first.loss == 0 and last.loss == loss_bytes(TINY, p)
    assert first.params_count == 18080 and last.params_count == 10913
    for m in (first, last):
        resident = m.params + m.grads + m.optimizer + m.buffers
        assert m.peak == resident + max(m.activations + m.loss + m.working, m.step_transient)
