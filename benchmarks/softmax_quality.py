"""What a sampled softmax and bfloat16 cost in quality: the same training with each, side by side.

    python benchmarks/softmax_quality.py [--config configs/base.yaml] [--data data/bible] \\
        [--sampled 0 1024] [--precisions fp32 bf16] [--steps 600] [--valid-every 200] [--work DIR] \\
        [--out benchmarks/results]

Each pair of a --sampled K (0 = the exact softmax over the whole vocabulary, else train.sampled_softmax=K) and a
--precisions entry (fp32; bf16 = train.amp_cpu) is one `nmt train CONFIG` run from scratch with the same seed,
the same batches and the shipped model's SentencePiece models (--tokenizers), for --steps updates with a
validation every --valid-every. The runs go in parallel, one thread each, each pinned to its own core (run i on
core i mod the core count): quality does not depend on speed, so runs may share a machine (train_speed.py
measures speed). Validation is the same for every run: dev loss and perplexity over the whole vocabulary, and
greedy dev BLEU. A run directory under --work that already holds --steps updates of the same K and precision is
read, not trained again. Writes softmax_quality.json and .md under --out. Stopping the script (Ctrl-C, SIGTERM,
a failed run) stops its trainings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from nmt.cli import int_from
from nmt.device import cpu_has_bf16
from nmt.plot import read_metrics


def run_dir(work: Path, sampled: int, precision: str) -> Path:
    name = f"sampled-{sampled}" if sampled else "exact"
    return work / (name if precision == "fp32" else f"{name}-{precision}")


def label(sampled: int, precision: str) -> str:
    return (f"sampled, K={sampled}" if sampled else "exact") + ("" if precision == "fp32" else f", {precision}")


def validations(directory: Path) -> list[dict]:
    """The run's validation records by step (none before it has a metrics file)."""
    path = directory / "metrics.jsonl"
    return read_metrics(path)["valid"] if path.is_file() else []


def finished(directory: Path, steps: int, sampled: int, precision: str) -> bool:
    """Whether the run directory holds a run of this K and precision that reached `steps` updates."""
    config = directory / "config.yaml"
    if not (any(r["step"] >= steps for r in validations(directory)) and config.is_file()):
        return False
    train = yaml.safe_load(config.read_text()).get("train", {})
    return train.get("sampled_softmax") == sampled and train.get("amp_cpu", False) == (precision == "bf16")


def start(args: argparse.Namespace, sampled: int, precision: str, core: int) -> subprocess.Popen:
    directory = run_dir(Path(args.work), sampled, precision)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for name in ("src.model", "tgt.model"):
        shutil.copy(Path(args.tokenizers) / name, directory / name)
    cmd = ["taskset", "-c", str(core), sys.executable, "-m", "nmt", "train", args.config,
           "--set", f"data.dir={args.data}", "--set", f"train.run_dir={directory}",
           "--set", f"train.sampled_softmax={sampled}",
           "--set", f"train.amp_cpu={str(precision == 'bf16').lower()}", "--set", f"train.max_steps={args.steps}",
           "--set", f"train.valid_every={args.valid_every}", "--set", "train.threads=1",
           "--set", "train.keep_checkpoints=0"]
    log = (directory / "train.log").open("w")
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)


def markdown(rows: list[dict]) -> str:
    lines = ["| softmax, precision | update | dev loss | dev perplexity | dev BLEU (greedy) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['softmax']} | {r['step']} | {r['dev_loss']:.3f} | {r['dev_ppl']:.1f} | "
                     f"{r['dev_bleu']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/base.yaml")
    p.add_argument("--data", default="data/bible")
    p.add_argument("--tokenizers", default="models/es-en-bible", help="directory with src.model and tgt.model")
    p.add_argument("--sampled", type=int_from(0), nargs="+", default=[0, 1024], metavar="K")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                   help="fp32, and/or bf16: train.amp_cpu (bfloat16 autocast)")
    p.add_argument("--steps", type=int_from(1), default=600)  # 0 would be train.max_steps=0: no limit
    p.add_argument("--valid-every", type=int_from(1), default=200)
    p.add_argument("--work", default="runs/softmax_quality", help="run directories (kept, reused when finished)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    missing = [name for name in ("src.model", "tgt.model") if not (Path(args.tokenizers) / name).is_file()]
    if missing:
        raise SystemExit(f"softmax_quality.py: error: --tokenizers {args.tokenizers} has no {' or '.join(missing)}")
    work = Path(args.work)
    precisions = args.precisions
    if "bf16" in precisions and not cpu_has_bf16():
        print("skipping bf16: this CPU has no bfloat16 instructions, and train.amp_cpu trains in float32 there")
        precisions = [p for p in precisions if p != "bf16"]
    runs = [(k, precision) for precision in precisions for k in args.sampled]
    todo = [run for run in runs if not finished(run_dir(work, *run), args.steps, *run)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so that the runs below stop too
    procs: list[subprocess.Popen] = []
    try:
        for i, (k, precision) in enumerate(todo):
            procs.append(start(args, k, precision, i % len(os.sched_getaffinity(0))))
        for (k, precision), proc in zip(todo, procs, strict=True):
            if proc.wait() != 0:
                raise SystemExit(f"training {label(k, precision)} failed: see "
                                 f"{run_dir(work, k, precision) / 'train.log'}")
    finally:  # a failed run, Ctrl-C or SIGTERM: the other trainings stop with this script, not go on for nobody
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            proc.wait()
    rows = []
    for k, precision in runs:
        for r in validations(run_dir(work, k, precision)):
            rows.append({"softmax": label(k, precision), "sampled_softmax": k, "precision": precision,
                         **{key: r[key] for key in ("step", "dev_loss", "dev_ppl", "dev_bleu")}})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "softmax_quality.json").write_text(json.dumps({"config": args.config, "rows": rows}, indent=2) + "\n")
    table = markdown(rows)
    (out / "softmax_quality.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
