"""Real DeepSpeed checkpoints: resume == uninterrupted, killed saves, reshaping, conversion.

Five launches share two saved runs (module fixtures):
- run A: TP2 x PP2 x DP2, ZeRO-1 (8 processes): 2 steps, save, gather weights, 2 more steps;
- run Z: DP2 bf16 ZeRO-1 (1 step, save, gather), then DP2 ZeRO-3: 2 steps, save, gather,
  2 more steps, and a save of step 4 killed (rank 0 exits after writing its meta file).
The last 2 steps of a resumed / reshaped run must reproduce A's (Z's) losses.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from megaclip.checkpoint.atomic import read_latest
from megaclip.checkpoint.export import import_open_clip
from megaclip.checkpoint.openclip import from_open_clip, open_clip_model
from megaclip.checkpoint.openclip_io import load_open_clip_file
from megaclip.checkpoint.reader import read_checkpoint
from megaclip.cli.main import main as cli
from megaclip.config.model import load_preset, model_from_dict
from megaclip.loss.contrastive import clip_loss
from megaclip.model.clip import ClipModel
from tests.mp_util import torchrun
from tests.reference import global_batch

pytestmark = pytest.mark.multiproc

CFG = load_preset("tiny-pp")
A_LAYOUT = {"tp": 2, "pp": 2, "zero": 1, "micro": 2, "accum": 2}  # global batch 8
Z_LAYOUT = {"zero": 3, "micro": 4}  # DP2, global batch 8


def _launch(out, world, phases, *, expect_fault=False):
    spec = json.dumps({"model": "tiny-pp", "seed": 3, "phases": phases})
    try:
        torchrun(world, "tests/workers/ckpt_run.py", out, spec, timeout=400)
    except AssertionError as err:
        if not expect_fault or not re.search(r"exitcode\s*:\s*86", str(err)):
            raise
    else:
        assert not expect_fault, "the fault-injected save did not kill rank 0"
    return torch.load(out / "result.pt")["log"]


def _losses(log, phase):
    return [x for p, kind, payload in log if p == phase and kind == "train" for x in payload]


def _gathered(out, name):
    state = {}
    for path in sorted(out.glob(f"{name}_stage*.pt")):
        state.update(torch.load(path))
    return state


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_a")
    actions = [
        {"do": "train", "steps": 2},
        {"do": "save", "root": str(out / "ckpt")},
        {"do": "gather", "name": "step2"},
        {"do": "train", "steps": 2},
    ]
    log = _launch(out, 8, [{"layout": A_LAYOUT, "actions": actions}])
    return out, _losses(log, 0)


@pytest.fixture(scope="module")
def run_z(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_z")
    bf16 = {"zero": 1, "micro": 4, "precision": "bf16"}
    phases = [
        {
            "layout": bf16,
            "actions": [
                {"do": "train", "steps": 1},
                {"do": "save", "root": str(out / "bf16")},
                {"do": "gather", "name": "bf16"},
            ],
        },
        {
            "layout": Z_LAYOUT,
            "actions": [
                {"do": "train", "steps": 2},
                {"do": "save", "root": str(out / "ckpt")},
                {"do": "gather", "name": "step2"},
                {"do": "train", "steps": 2},
                {"do": "fault_save", "root": str(out / "ckpt"), "stage": "meta"},
            ],
        },
    ]
    log = _launch(out, 2, phases, expect_fault=True)
    return out, _losses(log, 1)


def _assert_same_losses(got, want, rtol):
    assert [s for s, _ in got] == [s for s, _ in want], (got, want)
    for (_, g), (_, w) in zip(got, want):
        assert abs(g - w) <= rtol * abs(w), (got, want)


def test_resume_tp2_pp2_dp2_equals_uninterrupted(run_a, tmp_path):
    """Fresh processes resume A's step-2 checkpoint and reproduce steps 3 and 4."""
    out_a, losses_a = run_a
    actions = [{"do": "load", "root": str(out_a / "ckpt")}, {"do": "train", "steps": 2}]
    log = _launch(tmp_path, 8, [{"layout": A_LAYOUT, "actions": actions}])
    assert log[0][2] == {"client": {"next_step": 2, "rank": 0}, "step": 2}
    _assert_same_losses(_losses(log, 0), losses_a[2:], 1e-6)


def test_reshape_import_open_clip_and_reject_other_architecture(run_a, tmp_path):
    """4 processes, three phases: (2, 2, 2) -> (1, 2, 2) resume (weights and Adam moments
    carry over); a model of another architecture refuses A's checkpoint; a TP2 x PP2 engine
    started from an open_clip file has open_clip's loss at its first step."""
    out_a, losses_a = run_a
    torch.manual_seed(11)
    oc = open_clip_model(CFG)
    with torch.no_grad():
        for p in oc.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # not megaclip's init
    src = tmp_path / "open_clip.pt"
    torch.save(oc.state_dict(), src)
    init = import_open_clip(src, tmp_path / "init", model="tiny-pp", tp=2, pp=2)
    pp2dp2 = {"tp": 1, "pp": 2, "zero": 1, "micro": 2, "accum": 2}
    tp2pp2 = {"tp": 2, "pp": 2, "zero": 1, "micro": 2, "accum": 4}
    root = str(out_a / "ckpt")
    phases = [
        {"layout": pp2dp2, "actions": [{"do": "load", "root": root}, {"do": "train", "steps": 2}]},
        {"layout": pp2dp2, "model": "tiny", "actions": [{"do": "load_error", "root": root}]},
        {
            "layout": tp2pp2,
            "actions": [{"do": "init_from", "path": str(init)}, {"do": "train", "steps": 1}],
        },
    ]
    log = _launch(tmp_path, 4, phases)
    assert log[0][2]["step"] == 2
    _assert_same_losses(_losses(log, 0), losses_a[2:], 1e-5)
    (error,) = [payload for _, kind, payload in log if kind == "load_error"]
    assert error.startswith("CheckpointError") and "different architecture" in error, error
    assert (out_a / "ckpt" / "step-2" / "universal" / "megaclip_universal.json").is_file()
    images, tokens = global_batch(CFG, 8, seed=1000)
    with torch.no_grad():
        img = oc.encode_image(images, normalize=True)
        txt = oc.encode_text(tokens, normalize=True)
        scale = oc.logit_scale.reshape(1).clamp(0, CFG.max_logit_scale)
        want = clip_loss(img, txt, scale, chunk_size=None).loss.item()
    ((step, got),) = _losses(log, 2)
    assert step == 0 and abs(got - want) <= 1e-5 * abs(want), (got, want)


def test_zero3_resume_after_killed_save_and_reshapes(run_a, run_z, tmp_path):
    """Z's killed step-4 save left step-2 as latest; DP2 ZeRO-3 resumes it exactly. A is then
    reshaped into DP2 ZeRO-3, the bf16 optimizers (DP2 ZeRO-1 and ZeRO-0: re-saved and read back
    exactly) and (2, 1, 1) ZeRO-0. One launch: TP = 1 phases must come first (DeepSpeed keeps
    the first engine's mpu)."""
    out_z, losses_z = run_z
    out_a, losses_a = run_a
    assert read_latest(out_z / "ckpt") == "step-2"
    assert (out_z / "ckpt" / "tmp-step-4").is_dir()
    a_root = str(out_a / "ckpt")
    bf16 = {"micro": 4, "precision": "bf16"}

    def resume(root):
        return [{"do": "load", "root": root}, {"do": "train", "steps": 2}]

    def resave(name):
        return [{"do": "load", "root": a_root}, {"do": "save", "root": str(tmp_path / name)}]

    phases = [
        {"layout": Z_LAYOUT, "actions": resume(str(out_z / "ckpt"))},
        {"layout": Z_LAYOUT, "actions": resume(a_root)},
        {"layout": {"zero": 1, **bf16}, "actions": resave("bf16-zero1")},
        {"layout": {"zero": 0, **bf16}, "actions": resave("bf16-zero0")},
        {"layout": {"tp": 2, "zero": 0, "micro": 4, "accum": 2}, "actions": resume(a_root)},
    ]
    log = _launch(tmp_path, 2, phases)
    assert log[0][2] == {"client": {"next_step": 2, "rank": 0}, "step": 2}
    _assert_same_losses(_losses(log, 0), losses_z[2:], 1e-6)
    _assert_same_losses(_losses(log, 1), losses_a[2:], 1e-5)
    _assert_same_losses(_losses(log, 4), losses_a[2:], 1e-5)
    want = read_checkpoint(a_root, optimizer=True)
    for name in ("bf16-zero1", "bf16-zero0"):
        got = read_checkpoint(tmp_path / name, optimizer=True)
        assert got.meta.parallel["precision"] == "bf16" and got.lr_scheduler["last_epoch"] == 2
        assert got.adam_step == want.adam_step == 2
        for key in want.params:
            assert torch.equal(got.params[key], want.params[key]), (name, key)
            for m in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(got.moments[m][key], want.moments[m][key]), (name, m, key)


def _features(encode_image, encode_text):
    """L2-normalised image and text features of a fixed batch."""
    images, tokens = global_batch(CFG, 6, seed=77)
    with torch.no_grad():
        return encode_image(images, normalize=True), encode_text(tokens, normalize=True)


def _reference_features(state):
    net = ClipModel(CFG)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    net.load_state_dict({k: v.reshape(shapes[k]) for k, v in from_open_clip(state).items()})
    return _features(net.encode_image, net.encode_text)


@pytest.mark.parametrize("run, suffix", [("a", ".safetensors"), ("a", ".pt"), ("z", ".pt")])
def test_convert_to_open_clip_matches_sharded_model(run_a, run_z, tmp_path, run, suffix):
    """TP2xPP2xDP2 ZeRO-1 (A) and DP2 ZeRO-3 (Z) -> one open_clip file, strict load, same
    features as the engine's gathered weights."""
    out = (run_a if run == "a" else run_z)[0]
    target = tmp_path / f"model{suffix}"
    assert cli(["convert", str(out / "ckpt"), "--to", "open_clip", "--out", str(target)]) == 0
    config, state = load_open_clip_file(target)
    cfg = model_from_dict(config)
    assert cfg == CFG
    oc = open_clip_model(cfg)
    oc.load_state_dict(state, strict=True)
    oc.eval()
    got = _features(oc.encode_image, oc.encode_text)
    want = _reference_features(_gathered(out, "step2"))
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-5


def test_convert_bf16_module_and_fp32_master(run_z, tmp_path):
    out = run_z[0]
    gathered = _gathered(out, "bf16")  # bf16 module weights, cast to fp32
    for flags, dtype in (([], torch.bfloat16), (["--fp32-master"], torch.float32)):
        target = tmp_path / f"m{len(flags)}.pt"
        rc = cli(["convert", str(out / "bf16"), "--to", "open_clip", "--out", str(target), *flags])
        assert rc == 0
        _, state = load_open_clip_file(target)
        assert all(v.dtype == dtype for v in state.values())
        # The module weights are the masters rounded to bf16.
        for key, want in gathered.items():
            got = state[key].to(torch.bfloat16).float().reshape(want.shape)
            assert torch.equal(got, want), key
    master = load_open_clip_file(tmp_path / "m1.pt")[1]
    assert any(not torch.equal(v, v.bfloat16().float()) for v in master.values())


def test_universal_and_damaged_checkpoints(run_a, tmp_path, capsys):
    out = run_a[0]
    universal = tmp_path / "universal"
    assert cli(["convert", str(out / "ckpt"), "--to", "universal", "--out", str(universal)]) == 0
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert cli(["convert", str(out / "ckpt"), "--to", "open_clip", "--out", str(a)]) == 0
    assert cli(["convert", str(universal), "--to", "open_clip", "--out", str(b)]) == 0
    sa, sb = load_open_clip_file(a)[1], load_open_clip_file(b)[1]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    capsys.readouterr()
    damaged = tmp_path / "damaged"
    shutil.copytree(out / "ckpt" / "step-2", damaged)
    victim = damaged / "zero_pp_rank_1_mp_rank_02_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:1000])
    assert cli(["convert", str(damaged), "--to", "open_clip", "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert f"{victim} has 1000 bytes" in err and "truncated" in err
    (damaged / "layer_01-model_00-model_states.pt").unlink()
    assert cli(["convert", str(damaged), "--to", "open_clip", "--out", str(tmp_path / "x.pt")]) == 2
    assert "layer_01-model_00-model_states.pt is missing" in capsys.readouterr().err
