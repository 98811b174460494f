"""How much of each exactness bound the suite uses, across kernel families and thread counts.

    PYTHONPATH=. python benchmarks/tolerance_spread.py [--threads 1,2] [--caps default,avx2]
        [--tests tests/test_engine_layouts.py,...] [--out FILE]

Runs the exactness tests (layouts, loss, distributed loss, SigLIP) once per configuration:
``ATEN_CPU_CAPABILITY`` in {the CPU's own (``native``), ``avx2``, ``default`` (scalar kernels)}
and ``OMP_NUM_THREADS`` in {1, 2} (for the test process and every torchrun rank). Each run
records, through ``tests/spread.py``, every check's ``used`` = measured error / allowed error (a
check passes at ``used <= 1``). Prints one JSON line per check (``test``, ``check``, ``used``
per configuration, ``max_used``, ``margin`` = 1 / ``max_used``, the bound's headroom over the
largest measured spread), then one summary line
(``configs``, ``cpu``, ``checks``, ``failed_runs``, ``max_used``, ``tightest``). A bound is
justified where its ``margin`` is above 1 on every kernel family the machine kind has.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = (
    "tests/test_engine_layouts.py",
    "tests/test_loss.py",
    "tests/test_loss_dist.py",
    "tests/test_siglip.py",
)


def native_capability() -> str:
    """torch's kernel family on this CPU ('AVX512', 'AVX2', ...), lower-cased."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip().lower()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def run_config(cap: str, threads: int, tests: list[str], log: Path) -> tuple[int, float]:
    """(pytest's exit status, seconds) of the tests under one kernel family and thread count."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MEGACLIP_WORKER_THREADS": str(threads),  # torchrun ranks too (tests/mp_util.py)
        "MEGACLIP_SPREAD_LOG": str(log),
    }
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.pop("ATEN_CPU_CAPABILITY", None)
    if cap != "native":
        env["ATEN_CPU_CAPABILITY"] = cap
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL).returncode
    return rc, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--caps", default="", help="default: native, avx2 (if not native), default")
    ap.add_argument("--tests", default=",".join(TESTS))
    ap.add_argument("--out", default="", help="also write the JSON lines here")
    args = ap.parse_args()
    native = native_capability()
    caps = [c for c in args.caps.split(",") if c] or (
        ["native", "default"] if native == "avx2" else ["native", "avx2", "default"]
    )
    tests = [t for t in args.tests.split(",") if t]
    used: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    failed = []
    configs = []
    with tempfile.TemporaryDirectory() as tmp:
        for cap in caps:
            for threads in (int(t) for t in args.threads.split(",")):
                name = f"{native if cap == 'native' else cap}-t{threads}"
                configs.append(name)
                log = Path(tmp) / f"{name}.jsonl"
                rc, seconds = run_config(cap, threads, tests, log)
                print(f"# {name}: pytest rc {rc}, {seconds:.0f} s", file=sys.stderr, flush=True)
                if rc != 0:
                    failed.append(name)
                lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
                for line in lines:
                    r = json.loads(line)
                    key = (r["test"], r["check"])
                    used[key][name] = max(used[key].get(name, 0.0), r["used"])
    rows = []
    for (test, check), per in sorted(used.items()):
        top = max(per.values())
        rows.append(
            {
                "test": test,
                "check": check,
                "used": {k: float(f"{v:.3g}") for k, v in per.items()},
                "max_used": float(f"{top:.3g}"),
                "margin": float(f"{1 / top:.3g}") if top > 0 else None,
            }
        )
    tightest = max(rows, key=lambda r: r["max_used"]) if rows else None
    summary = {
        "configs": configs,
        "cpu": cpu_model(),
        "native": native,
        "checks": len(rows),
        "failed_runs": failed,
        "max_used": tightest["max_used"] if tightest else None,
        "tightest": f"{tightest['test']} [{tightest['check']}]" if tightest else None,
    }
    out = [json.dumps(r) for r in rows] + [json.dumps(summary)]
    print("\n".join(out))
    if args.out:
        Path(args.out).write_text("\n".join(out) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
