"""`megaclip plot RUN_DIR [--out FILE.png]`: loss, throughput and zero-shot curves of a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megaclip.errors import DataError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot a run's metrics to PNG", description=__doc__)
    p.add_argument("run_dir", help="a `megaclip train` output directory (holds metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png)")
    p.set_defaults(func=run)


def read_metrics(run_dir: Path) -> list[dict]:
    """Records of RUN_DIR/metrics.jsonl; a malformed line is an error naming its number."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} not found: is {run_dir} a megaclip run directory?")
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise DataError(f"{path}:{i}: not a JSON object (file truncated?)") from None
    if not records:
        raise DataError(f"{path} is empty: the run has not logged a step yet")
    return records


def plot_run(run_dir: Path, out: Path) -> Path:
    """Write a 2x2 figure: loss, logit scale, samples/s per device + MFU, zero-shot top-1/5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    zs = [r for r in records if "zeroshot_top1" in r]

    def series(rows, key):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    fig.suptitle(f"megaclip run: {run_dir}", fontsize=12)
    ax = axes[0][0]
    ax.plot(*series(train, "loss"), color="tab:blue")
    ax.set(title="contrastive loss (global batch)", xlabel="step", ylabel="loss")
    ax = axes[0][1]
    ax.plot(*series(train, "logit_scale"), color="tab:purple")
    ax.set(title="logit scale (1 / temperature)", xlabel="step", ylabel="scale")
    ax = axes[1][0]
    ax.plot(*series(train, "samples_per_s_per_device"), color="tab:green", label="samples/s/device")
    ax.set(title="throughput", xlabel="step", ylabel="samples/s per device")
    mfu_steps, mfu = series(train, "mfu")
    if mfu:
        twin = ax.twinx()
        twin.plot(mfu_steps, [100 * m for m in mfu], color="tab:orange", ls="--", label="MFU")
        twin.set_ylabel("MFU (%)")
        twin.legend(loc="lower right")
    ax.legend(loc="lower left")
    ax = axes[1][1]
    if zs:
        ax.plot(*series(zs, "zeroshot_top1"), marker="o", label="top-1")
        if any("zeroshot_top5" in r for r in zs):
            ax.plot(*series(zs, "zeroshot_top5"), marker="s", label="top-5")
        ax.set_ylim(0, 1)
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no zero-shot evaluation logged", ha="center", va="center")
    ax.set(title="zero-shot accuracy", xlabel="step", ylabel="accuracy")
    for a in axes.flat:
        a.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "curves.png"
    print(f"wrote {plot_run(run_dir, out)}")
    return 0
