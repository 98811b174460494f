"""`megaclip train`: the training loop around ClipEngine (data, logging, eval, checkpoints)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist
import yaml

from megaclip.checkpoint.atomic import complete_tags, read_latest
from megaclip.checkpoint.resume import check_checkpoint_inputs
from megaclip.config.train import RunConfig, ZeroShotSection, run_config_to_dict
from megaclip.data.stats import SkipTally, skip_record
from megaclip.data.stream import batch_fingerprint
from megaclip.errors import ConfigError, NumericalError
from megaclip.model.flops import model_cost
from megaclip.parallel import collectives
from megaclip.parallel.runtime import init_distributed, pin_memory_default
from megaclip.parallel.topology import Topology
from megaclip.train.engine import ClipEngine, StepResult
from megaclip.train.faults import TrainingGuard, exit_with_launcher  # see docs/reliability.md
from megaclip.train.memlog import PhaseLog
from megaclip.train.metrics import MetricsWriter, device_peak_tflops, peak_memory_gib
from megaclip.train.preflight import check_disk, check_memory, check_offload, check_output_dir
from megaclip.train.resolve import ResolvedRun, launched_world, resolve_run


def micro_batch_stream(
    cfg: RunConfig, topo: Topology, tokenizer, tally: SkipTally | None = None
) -> Iterator[tuple]:
    """Endless (images, tokens) micro-batches for this DP rank (same for its TP/PP peers).

    The stream has ``state_dict`` / ``load_state_dict`` (its data position, megaclip.data.stream).
    ``tally``: follows the stream's skipped-sample counts (webdataset only).
    """
    from megaclip.data.stream import SyntheticStream, TrainStream

    m, par = cfg.model, cfg.parallel
    seed = topo.data_seed(cfg.train.seed)
    if cfg.data.kind == "synthetic":
        from megaclip.data.synthetic import SyntheticConfig

        eot = m.text.vocab_size - 1
        synth = SyntheticConfig(
            batch_size=par.micro_batch_size,
            image_size=m.vision.image_size,
            context_length=m.text.context_length,
            vocab_size=m.text.vocab_size,
            sot_id=None if m.text.vocab_size < 3 else eot - 1,
            eot_id=eot,
            seed=seed,
        )
        return SyntheticStream(synth, dp_rank=topo.coords.dp, seed_rank=0)
    from megaclip.data import build_webdataset_loader

    loader = build_webdataset_loader(
        cfg.data.train,
        tokenizer,
        image_size=m.vision.image_size,
        batch_size=par.micro_batch_size,
        dp_rank=topo.coords.dp,
        dp_size=par.dp,
        workers=cfg.data.workers,
        mode=cfg.data.mode,
        seed=cfg.train.seed,
        train=True,
        shuffle_buffer=cfg.data.shuffle_buffer,
        max_skip_fraction=cfg.data.max_skip_fraction,
        pin_memory=pin_memory_default(),  # only when the accelerator is not the CPU
    )
    # epoch mode: each rank cycles its own share (ranks may hold unequal counts)
    stream = TrainStream(
        loader,
        f"data.train yields no batch of {par.micro_batch_size} on DP rank {topo.coords.dp}: "
        "use fewer ranks, a smaller micro_batch_size or more data",
    )
    if tally is not None:
        tally.watch(stream)
    return stream


def _tokenizer(cfg: RunConfig):
    from megaclip.tokenizer import build_tokenizer
    from megaclip.tokenizer.pooling import check_tokenizer

    if cfg.data.kind == "synthetic" and not cfg.zeroshot.data:
        return None
    tok = build_tokenizer(
        cfg.data.tokenizer, cfg.data.tokenizer_path, context_length=cfg.model.text.context_length
    )
    check_tokenizer(cfg.model.text, tok, cfg.data.tokenizer)  # vocabulary size, text pooling
    return tok


class _Progress:
    """tqdm bar on rank 0 (plain lines when stdout is not a terminal)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", leave=True)

    def update(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_training(cfg: RunConfig, ds_override: str | None = None) -> dict | None:
    """Train ``cfg`` on the launched processes; returns the final summary on rank 0."""
    return train_run(resolve_run(cfg, ds_override, world=launched_world()))


def train_run(run: ResolvedRun) -> dict | None:
    """Train a resolved run on the launched processes; the final summary on rank 0.

    Everything that can be wrong with the input is checked before any process group exists:
    the config and the DeepSpeed JSON by :func:`resolve_run`, memory, disks, data, output and
    checkpoint inputs here.
    """
    cfg, par = run.cfg, run.par
    if cfg.train.memory_check:  # before anything is allocated
        check_memory(
            cfg.model,
            par,
            ds=run.ds,
            budget=run.budget,
            loss_chunk=cfg.train.loss_chunk_size,
        )
    check_offload(cfg.model, par, run.ds)  # ZeRO-Infinity: the async_io op, the disk's room
    tokenizer = _tokenizer(cfg)
    if cfg.data.kind == "webdataset":
        from megaclip.data import resolve_shards

        resolve_shards(cfg.data.train)
    check_zeroshot_inputs(cfg.zeroshot)
    check_output_dir(cfg.train.out_dir)
    check_checkpoint_inputs(cfg)
    # room for the checkpoints (train.keep_last) and the export the run writes
    check_disk(cfg, par, len(complete_tags(Path(cfg.train.out_dir) / "checkpoints")))
    exit_with_launcher()  # reliability: no orphaned ranks when torchrun is SIGKILLed
    rank, world = init_distributed(cfg.train.dist_timeout_s)
    # reliability: sub-groups time out after dist_timeout_s too (megatron takes float minutes)
    topo = Topology(par, timeout_minutes=cfg.train.dist_timeout_s / 60)
    out = Path(cfg.train.out_dir)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        resolved = run_config_to_dict(cfg)
        resolved["deepspeed"] = run.ds_source
        text = yaml.safe_dump(resolved, sort_keys=False)
        (out / "config.yaml").write_text(text, encoding="utf-8")
        print("resolved config:\n" + text, flush=True)
    memory = PhaseLog()
    with memory.phase("build"):
        engine = ClipEngine.from_run(run, topo)
    # -- reliability (megaclip/train/faults.py): a lost or silent peer ends the run in one line
    with TrainingGuard(engine, out / "checkpoints", timeout_s=cfg.train.dist_timeout_s) as guard:
        return _train_steps(cfg, engine, topo, tokenizer, world, guard, memory)


def _train_steps(
    cfg: RunConfig,
    engine: ClipEngine,
    topo: Topology,
    tokenizer,
    world: int,
    guard: TrainingGuard,
    memory: PhaseLog,
) -> dict | None:
    """Resume, run the steps, finish (every rank); the final summary on rank 0."""
    par, t, out = cfg.parallel, cfg.train, Path(cfg.train.out_dir)
    is_main = dist.get_rank() == 0
    tally = SkipTally() if cfg.data.kind == "webdataset" else None
    # -- end of the reliability wrapper
    hooks = TrainHooks(cfg, engine, tokenizer, memory)
    with memory.phase("resume"):
        start = hooks.resume()
    stream = micro_batch_stream(cfg, topo, tokenizer, tally)
    hooks.skip_data(stream, start)
    flops_per_sample = model_cost(cfg.model).train_flops
    peak, peak_source = device_peak_tflops(par.precision)
    writer = MetricsWriter(out, t.tensorboard) if is_main else None
    progress = _Progress(t.steps, start, is_main)
    if is_main:
        progress.write(
            f"training {cfg.model.name} on {world} processes (tp={par.tp} pp={par.pp} "
            f"dp={par.dp}, ZeRO-{par.zero_stage}, {par.precision}, schedule {par.schedule}), "
            "global batch "
            f"{par.global_batch_size}, {t.steps} steps; peak {peak:.2f} TFLOP/s ({peak_source})"
        )
    last: StepResult | None = None
    bad_run = 0
    t_window, samples_window = time.perf_counter(), 0
    for _ in range(start, t.steps):
        if t.exit_after and last is not None and last.step - start >= t.exit_after:
            hooks.stopped_early = True
            break
        batches = [next(stream) for _ in range(par.grad_accum_steps)]
        fingerprint = batch_fingerprint(batches[0])  # reliability: data-stream check (soak)
        guard.step_begins()  # reliability: the watchdog's clock
        with memory.phase("steps"):
            last = engine.train_step(batches)
        samples_window += last.samples
        bad_run = bad_run + 1 if (last.skipped or not math.isfinite(last.loss)) else 0
        if bad_run:
            progress.write(
                f"step {last.step:>6}  non-finite loss or gradients ({last.loss}): step skipped, "
                f"parameters unchanged ({bad_run}/{t.max_bad_steps} in a row)"
            )
        if bad_run >= t.max_bad_steps:
            raise NumericalError(
                f"loss or gradients were non-finite for {bad_run} steps in a row (steps "
                f"{last.step - bad_run + 1}..{last.step}); nothing was saved after them. Lower "
                f"optim.lr, check the data, or resume from {hooks.ckpt_dir} with other settings"
            )
        progress.update(f"loss={last.loss:.4f} scale={last.logit_scale:.1f}")
        if last.step % t.log_every == 0 or last.step == t.steps:
            elapsed = time.perf_counter() - t_window
            sps = samples_window / elapsed
            tflops = sps * flops_per_sample / world / 1e12
            record = {
                "step": last.step,
                "samples_seen": last.step * par.global_batch_size,
                "loss": last.loss,
                "logit_scale": last.logit_scale,
                "lr": last.lr,
                "grad_norm": last.grad_norm,
                "acc_i2t": last.acc_i2t,
                "acc_t2i": last.acc_t2i,
                "samples_per_s": sps,
                "samples_per_s_per_device": sps / world,
                "tflops_per_device": tflops,
                "mfu": tflops / peak if peak == peak and peak > 0 else None,
                "step_time_s": last.step_time,
                "peak_memory_gib": peak_memory_gib(),
            }
            record["data_fingerprint"] = fingerprint  # compared by benchmarks/soak.py
            record.update(skip_record(tally, topo.dp_group))  # collective over DP
            t_window, samples_window = time.perf_counter(), 0
            if is_main:
                writer.write(record)
                progress.write(
                    f"step {last.step:>6}  loss {last.loss:.4f}  scale {last.logit_scale:6.2f}  "
                    f"lr {last.lr:.2e}  {sps:8.1f} samples/s  MFU {record['mfu'] or 0:.1%}"
                )
        hooks.after_step(last.step, writer, progress)
    progress.close()
    summary = hooks.finish(last, writer, progress)
    if writer is not None:
        writer.close()
    coords = {k: getattr(topo.coords, k) for k in ("pp", "dp", "tp")}
    memory.write(out, dist.get_rank(), coords)
    return summary


def check_zeroshot_inputs(zs: ZeroShotSection) -> None:
    """Read the class names and templates once up front so mistakes surface before training."""
    if not zs.data:
        return
    from megaclip.data import resolve_shards
    from megaclip.eval.zeroshot import read_classnames, read_templates

    if not (zs.classnames and zs.templates):
        raise ConfigError("zeroshot.data is set: zeroshot.classnames and zeroshot.templates too")
    read_classnames(zs.classnames)
    read_templates(zs.templates)
    if not Path(zs.data).is_dir():
        resolve_shards(zs.data)


class TrainHooks:
    """Periodic work around the step: zero-shot eval, checkpoints, final export."""

    def __init__(self, cfg: RunConfig, engine: ClipEngine, tokenizer, memory: PhaseLog) -> None:
        self.cfg, self.engine, self.tokenizer, self.memory = cfg, engine, tokenizer, memory
        self.out = Path(cfg.train.out_dir)
        self.zeroshot_history: list[dict] = []
        self.stopped_early = False

    # resume / data position -------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def resume(self) -> int:
        """Steps already done: from the latest checkpoint, else 0 (optionally from init_from)."""
        t = self.cfg.train
        client = self.engine.load_latest(str(self.ckpt_dir)) if t.resume else None
        if client is not None:
            step = int(client["next_step"])
            self.data_position = client.get("data")  # every DP rank's (megaclip.data.stream)
            if dist.get_rank() == 0:
                print(f"resumed from {self.ckpt_dir} at step {step}", flush=True)
            return step
        if t.init_from:
            self.engine.initialize_from(t.init_from, new_logit_bias=t.new_logit_bias)
            if dist.get_rank() == 0:
                print(f"initialised the weights from {t.init_from}", flush=True)
        return 0

    def skip_data(self, stream, steps_done: int) -> None:
        """Put ``stream`` at the data position of step ``steps_done``: a direct seek to the
        checkpoint's saved position; a checkpoint without one replays the stream."""
        self.data_stream = stream
        position = getattr(self, "data_position", None)
        if not steps_done or (position is not None and stream.load_state_dict(position)):
            return
        if dist.get_rank() == 0:
            print(f"the checkpoint holds no data position: replaying {steps_done} steps of data")
        for _ in range(steps_done * self.cfg.parallel.grad_accum_steps):
            next(stream)

    # periodic -----------------------------------------------------------------
    def save(self, step: int, progress) -> None:
        from megaclip.data.stream import gather_state

        data = gather_state(getattr(self, "data_stream", None), self.engine.topo.dp_group)
        with self.memory.phase("save"):
            path = self.engine.save(
                str(self.ckpt_dir),
                {"next_step": step, "data": data},
                keep_last=self.cfg.train.keep_last,
            )
        if dist.get_rank() == 0:
            progress.write(f"step {step:>6}  saved {path}")

    def after_step(self, step: int, writer, progress) -> None:
        t = self.cfg.train
        if t.save_every and step % t.save_every == 0:
            self.save(step, progress)
        zs = self.cfg.zeroshot
        if zs.every and zs.data and step % zs.every == 0 and step != self.cfg.train.steps:
            self.zeroshot(step, writer, progress)

    def zeroshot(self, step: int, writer, progress) -> dict | None:
        """Zero-shot accuracy through the training engine itself (collective)."""
        from megaclip.train.zeroshot import engine_zeroshot

        with self.memory.phase("zeroshot"):
            result = engine_zeroshot(self.engine, self.tokenizer, self.cfg.zeroshot)
        if dist.get_rank() == 0:
            record = {"step": step, **{f"zeroshot_{k}": v for k, v in result.items()}}
            self.zeroshot_history.append(record)
            if writer is not None:
                writer.write(record)
            progress.write(
                f"step {step:>6}  zero-shot top-1 {result['top1']:.2%}  top-5 "
                f"{result.get('top5') or float('nan'):.2%}  ({result['n']} images)"
            )
        return result

    def finish(self, last: StepResult | None, writer, progress) -> dict | None:
        """Final checkpoint, zero-shot and export (collective); the summary on rank 0.

        The export is converted from the final checkpoint by the streaming converter on rank 0,
        one tensor at a time: no process ever holds the whole model next to its training state.
        """
        final_zs = None
        t = self.cfg.train
        saved_now = bool(last and t.save_every and last.step % t.save_every == 0)
        if last is not None and not saved_now:
            self.save(last.step, progress)
        if self.stopped_early:
            if dist.get_rank() == 0:
                print(f"stopped after step {last.step} (train.exit_after); run again to resume")
            return None
        if self.cfg.zeroshot.data:
            final_zs = self.zeroshot(self.cfg.train.steps, writer, progress)
        export = self.out / "final_open_clip.pt"
        with self.memory.phase("export"):
            if dist.get_rank() == 0 and read_latest(self.ckpt_dir) is not None:
                from megaclip.checkpoint.export import export_open_clip

                export_open_clip(self.ckpt_dir, export, fp32_master=True)
            collectives.barrier()  # host group: rank 0's export may take minutes
        if dist.get_rank() != 0:
            return None
        summary = {
            "steps": last.step if last else 0,
            "final_loss": last.loss if last else None,
            "zeroshot": final_zs,
            "export": str(export),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        print(f"exported the trained model to {export} (open_clip keys)", flush=True)
        if final_zs is not None:
            print(f"final zero-shot top-1: {final_zs['top1']:.2%}", flush=True)
        return summary
