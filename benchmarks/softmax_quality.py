"""What a sampled softmax costs in quality: the same training with the exact and with sampled softmaxes, side by side.

    python benchmarks/softmax_quality.py [--config configs/base.yaml] [--data data/bible] \
        [--sampled 0 1024] [--steps 600] [--valid-every 200] [--work DIR] [--out benchmarks/results]

Each --sampled K (0 = the exact softmax over the whole vocabulary, else train.sampled_softmax=K) is one
`nmt train CONFIG` run from scratch with the same seed, the same batches and the shipped model's SentencePiece
models (--tokenizers), for --steps updates with a validation every --valid-every. The runs go in parallel, one
thread each, each pinned to its own core (run i on core i mod the core count): quality does not depend on speed,
so runs may share a machine (train_speed.py measures speed). Validation is the same for every run: dev loss and
perplexity over the whole vocabulary, and greedy dev BLEU. A run directory under --work that already holds
--steps updates of the same K is read, not trained again. Writes softmax_quality.json and .md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def run_dir(work: Path, sampled: int) -> Path:
    return work / (f"sampled-{sampled}" if sampled else "exact")


def records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished(directory: Path, steps: int, sampled: int) -> bool:
    """Whether the run directory holds a run of this K that reached `steps` updates."""
    lines = records(directory / "metrics.jsonl")
    config = directory / "config.yaml"
    done = any(r.get("type") == "valid" and r["step"] >= steps for r in lines)
    return done and config.is_file() and f"sampled_softmax: {sampled}" in config.read_text()


def start(args: argparse.Namespace, sampled: int, core: int) -> subprocess.Popen:
    directory = run_dir(Path(args.work), sampled)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for name in ("src.model", "tgt.model"):
        shutil.copy(Path(args.tokenizers) / name, directory / name)
    cmd = ["taskset", "-c", str(core), sys.executable, "-m", "nmt", "train", args.config,
           "--set", f"data.dir={args.data}", "--set", f"train.run_dir={directory}",
           "--set", f"train.sampled_softmax={sampled}", "--set", f"train.max_steps={args.steps}",
           "--set", f"train.valid_every={args.valid_every}", "--set", "train.threads=1",
           "--set", "train.keep_checkpoints=0"]
    log = (directory / "train.log").open("w")
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)


def markdown(rows: list[dict]) -> str:
    lines = ["| softmax | update | dev loss | dev perplexity | dev BLEU (greedy) |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['softmax']} | {r['step']} | {r['dev_loss']:.3f} | {r['dev_ppl']:.1f} | "
                     f"{r['dev_bleu']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/base.yaml")
    p.add_argument("--data", default="data/bible")
    p.add_argument("--tokenizers", default="models/es-en-bible", help="directory with src.model and tgt.model")
    p.add_argument("--sampled", type=int, nargs="+", default=[0, 1024], metavar="K")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--valid-every", type=int, default=200)
    p.add_argument("--work", default="runs/softmax_quality", help="run directories (kept, reused when finished)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    work = Path(args.work)
    todo = [k for k in args.sampled if not finished(run_dir(work, k), args.steps, k)]
    procs = [start(args, k, i % (os.cpu_count() or 1)) for i, k in enumerate(todo)]
    for k, proc in zip(todo, procs, strict=True):
        if proc.wait() != 0:
            raise SystemExit(f"training with sampled_softmax={k} failed: see {run_dir(work, k) / 'train.log'}")
    rows = []
    for k in args.sampled:
        for r in records(run_dir(work, k) / "metrics.jsonl"):
            if r.get("type") == "valid":
                rows.append({"softmax": f"sampled, K={k}" if k else "exact", "sampled_softmax": k,
                             **{key: r[key] for key in ("step", "dev_loss", "dev_ppl", "dev_bleu")}})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "softmax_quality.json").write_text(json.dumps({"config": args.config, "rows": rows}, indent=2) + "\n")
    table = markdown(rows)
    (out / "softmax_quality.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
