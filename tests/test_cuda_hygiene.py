"""GPU hygiene that a CPU run can check: placement of collectives, pinned non-blocking copies,
TF32 for fp32 runs, SDPA's fused attention kernels for bf16, no device synchronisation in the
hot path outside the timing code.

Each test either patches the accelerator to look like a GPU (``parallel.device.device``) or
reads the code, so it fails on a CPU machine when the GPU behaviour would be wrong.
"""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megaclip.parallel import collectives, runtime
from megaclip.parallel import device as device_module

PACKAGE = Path(__file__).resolve().parents[1] / "megaclip"
GPU = torch.device("cuda", 0)


@pytest.fixture
def fake_gpu(monkeypatch):
    """The accelerator reports a CUDA device (no GPU needed to make a torch.device)."""
    monkeypatch.setattr(device_module, "device", lambda: GPU)  # what collectives ask
    monkeypatch.setattr(runtime, "device", lambda: GPU)  # runtime's re-export


# ---------------------------------------------------------------- collectives: placement


def test_nccl_collective_rejects_a_cpu_tensor(fake_gpu, monkeypatch):
    monkeypatch.setattr(collectives, "is_distributed", lambda: True)
    monkeypatch.setattr(collectives, "backend_of", lambda group=None: "nccl")
    called = []
    monkeypatch.setattr(collectives.dist, "all_reduce", lambda *a, **k: called.append(a))
    monkeypatch.setattr(collectives.dist, "broadcast", lambda *a, **k: called.append(a))
    with pytest.raises(ValueError, match="nccl collective, which needs it on cuda"):
        collectives.all_reduce(torch.zeros(4), "sum")
    with pytest.raises(ValueError, match="host_"):
        collectives.broadcast(torch.zeros(4, dtype=torch.float64), src=1)
    assert not called  # refused before NCCL would have seen it
    assert collectives.comm_device() == GPU  # where the host helpers put their values


def test_gloo_takes_cpu_tensors_and_names_the_device(fake_gpu):
    collectives.check_placement(torch.zeros(2), "gloo")  # the host group
    assert collectives.device_type_for("gloo") == "cpu"
    assert collectives.device_type_for("nccl") == "cuda"
    with pytest.raises(ValueError, match="unknown reduction"):
        collectives._op("mean")


def test_collectives_without_a_process_group_are_local():
    assert collectives.host_all_reduce([1, 2, 3]).tolist() == [1, 2, 3]
    assert collectives.all_gather_object({"a": 1}) == [{"a": 1}]
    assert collectives.broadcast_object("x") == "x"
    collectives.barrier()
    t = torch.ones(2)
    assert collectives.all_reduce(t, "max") is t


# ---------------------------------------------------------------- host-to-device copies


def test_pinning_only_when_the_accelerator_is_not_the_cpu(monkeypatch):
    assert runtime.pin_memory_default() is False  # this machine
    monkeypatch.setattr(runtime, "device", lambda: GPU)
    assert runtime.pin_memory_default() is True


def test_train_loader_pins_on_gpu(fake_gpu, monkeypatch):
    import megaclip.data
    from megaclip.train import loop

    seen = {}

    def fake_loader(*args, **kwargs):
        seen.update(kwargs)
        return SimpleNamespace()

    monkeypatch.setattr(megaclip.data, "build_webdataset_loader", fake_loader)
    monkeypatch.setattr(loop, "pin_memory_default", runtime.pin_memory_default)
    m = SimpleNamespace(vision=SimpleNamespace(image_size=32))
    cfg = SimpleNamespace(
        model=m,
        parallel=SimpleNamespace(micro_batch_size=2, dp=1),
        data=SimpleNamespace(
            kind="webdataset",
            train="x.tar",
            workers=0,
            mode="resampled",
            shuffle_buffer=0,
            max_skip_fraction=0.5,
        ),
        train=SimpleNamespace(seed=0),
    )
    topo = SimpleNamespace(data_seed=lambda s: s, coords=SimpleNamespace(dp=0))
    loop.micro_batch_stream(cfg, topo, tokenizer=None)
    assert seen["pin_memory"] is True


def test_engine_copies_batches_without_blocking(monkeypatch):
    calls = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("non_blocking"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    out = runtime.host_to_device([(torch.zeros(2), torch.zeros(2, dtype=torch.long))] * 3, "cpu")
    assert len(out) == 3 and calls == [True] * 6
    # the engine uses it for every host batch: features (engine.py) and training (steps.py)
    engine = (PACKAGE / "train/engine.py").read_text(encoding="utf-8")
    steps = (PACKAGE / "train/steps.py").read_text(encoding="utf-8")
    assert engine.count("host_to_device(") == 1 and steps.count("host_to_device(") == 1
    assert steps.count("_to_device(mb, h.device)") == 2  # the first and the replayed forwards
    for src in (engine, steps):
        assert ".to(self.device)" not in src and ".to(h.device)" not in src


# ---------------------------------------------------------------- matmul / attention backends


@pytest.fixture
def restore_backends():
    keep = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
    )
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = keep[:2]
    torch.backends.cuda.enable_flash_sdp(keep[2])
    torch.backends.cuda.enable_mem_efficient_sdp(keep[3])


def test_tf32_for_fp32_runs_only(restore_backends, monkeypatch):
    monkeypatch.delenv("MEGACLIP_TF32", raising=False)
    assert runtime.configure_backends("fp32")["tf32"] is True
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert runtime.configure_backends("bf16")["tf32"] is False
    monkeypatch.setenv("MEGACLIP_TF32", "0")  # exactness checks against an fp32 reference
    assert runtime.configure_backends("fp32")["tf32"] is False


def test_fused_attention_kernels_are_allowed(restore_backends):
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    got = runtime.configure_backends("bf16")
    assert got["flash_sdp"] and got["mem_efficient_sdp"]


def test_engine_sets_backends_in_one_place():
    tree = ast.parse((PACKAGE / "train/engine.py").read_text(encoding="utf-8"))
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "configure_backends"
    ]
    assert len(calls) == 1
    for path in PACKAGE.rglob("*.py"):  # nobody else flips the switches
        if path.name == "runtime.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert "allow_tf32 =" not in text and "enable_flash_sdp(" not in text, path


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attention_is_fused_sdpa_without_a_mask(monkeypatch, precision):
    """Every block calls F.scaled_dot_product_attention with no explicit mask (the text tower
    through ``is_causal``), q/k/v in the run's dtype and a head size the fused kernels take."""
    from megaclip.config.model import load_preset
    from megaclip.model.clip import ClipModel
    from megaclip.model.init import init_parameters

    seen = []
    original = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        seen.append((q.dtype, q.shape[-1], attn_mask, is_causal))
        return original(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    cfg = load_preset("tiny")
    model = ClipModel(cfg)
    init_parameters(model, cfg, 0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model.to(dtype)
    images = torch.randn(2, 3, 32, 32, dtype=dtype)
    tokens = torch.randint(1, 60, (2, cfg.text.context_length))
    model(images, tokens)
    assert len(seen) == cfg.vision.layers + cfg.text.layers
    assert all(mask is None for _, _, mask, _ in seen)
    assert [c for *_, c in seen].count(True) == cfg.text.layers  # text: causal via is_causal
    assert all(d == dtype and hd % 8 == 0 and hd <= 256 for d, hd, _, _ in seen)


# ---------------------------------------------------------------- no synchronize in the hot path

TIMING_CODE = {("train/engine.py", "_sync")}  # the one wait per step, for step_time


def _synchronize_calls():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "synchronize"
                ):
                    yield rel, fn.name, node.lineno


def test_no_device_synchronize_outside_timing_code():
    # megaclip/bench measures time and may synchronise; everything else only in TIMING_CODE
    strays = [
        f"megaclip/{rel}:{line} in {fn}()"
        for rel, fn, line in _synchronize_calls()
        if (rel, fn) not in TIMING_CODE and not rel.startswith("bench/")
    ]
    assert not strays, strays


def test_train_step_waits_for_the_device_once_for_timing():
    tree = ast.parse((PACKAGE / "train/engine.py").read_text(encoding="utf-8"))
    step = next(
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "train_step"
    )
    syncs = [
        n
        for n in ast.walk(step)
        if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "_sync"
    ]
    assert len(syncs) == 1
