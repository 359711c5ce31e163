"""Training speed: target tokens/s of `nmt train` on the Bible corpus, 1 and 2 threads, optionally beside OpenNMT-py.

    python benchmarks/train_speed.py --config configs/base.yaml --data data/bible \\
        [--onmt-venv ~/onmt-venv] [--out benchmarks/results]

Each measurement runs in its own process pinned with taskset (thread count t uses cores 0..t-1). Ours: the
first `--warmup` updates are discarded, then `--steps` updates of the real training loop (Trainer.update,
same batches as training) are timed. The FLOPs of one update are counted with torch's FlopCounterMode (matmuls
and convolutions, forward and backward), giving the fraction of the machine's matmul peak (a 2048^3 matmul in
the row's precision, measured in the same process) and, for fp32, of the nominal FMA peak (two 256-bit FMA
pipes: 32 FLOP/cycle/core) the loop reaches.
Rows for each --precisions (fp32; bf16: train.amp_cpu) and --sampled-softmax K (0: the exact softmax over the
whole vocabulary; K > 0: train.sampled_softmax).
OpenNMT-py 3.5.1 (installed in a venv outside the repo, as README.md's "OpenNMT-py beside ours" says) trains
the reference architecture on the same SentencePiece pieces; its target tokens/s are averaged over its reports
after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nmt.cli import int_from
from nmt.device import cpu_has_bf16, cpu_name

ONMT_CONFIG = """\
save_data: {run}/samples
overwrite: true
src_vocab: {run}/vocab.src
tgt_vocab: {run}/vocab.tgt
data:
  corpus_1: {{path_src: {data}/train.sp.es, path_tgt: {data}/train.sp.en}}
  valid: {{path_src: {data}/dev.sp.es, path_tgt: {data}/dev.sp.en}}
src_vocab_size: 8100
tgt_vocab_size: 8100
src_seq_length: 200
tgt_seq_length: 200
save_model: {run}/model
save_checkpoint_steps: 100000
train_steps: {steps}
valid_steps: 100000
encoder_type: brnn
decoder_type: rnn
rnn_type: LSTM
layers: 1
word_vec_size: 256
enc_hid_size: 512
dec_hid_size: 512
global_attention: mlp
input_feed: 1
dropout: 0.3
optim: adam
learning_rate: 0.001
max_grad_norm: 5
batch_type: tokens
batch_size: 4096
bucket_size: 32768
num_workers: 0
report_every: {report}
"""


def cpu_mhz() -> float:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":", 1)[1])
    return 0.0


def _count_fused_rnn_flops() -> None:
    """Teach FlopCounterMode oneDNN's fused RNN layer (the encoder's path on CPU), which it would count as 0:
    forward 2 x steps x rows x (input + hidden) x gates, backward twice that (gradients of input and weights)."""
    import torch
    from torch.utils.flop_counter import register_flop_formula

    def forward_flops(input_shape, weight_ih, weight_hh, *args, **kwargs) -> int:
        return 2 * input_shape[0] * input_shape[1] * (weight_ih[1] + weight_hh[1]) * weight_ih[0]

    def backward_flops(input_shape, weight_ih, weight_hh, *args, **kwargs) -> int:
        return 2 * forward_flops(input_shape, weight_ih, weight_hh)

    register_flop_formula(torch.ops.aten.mkldnn_rnn_layer)(forward_flops)
    register_flop_formula(torch.ops.aten.mkldnn_rnn_layer_backward)(backward_flops)


def worker(args: argparse.Namespace) -> dict:
    """Measure our training loop in this (pinned) process."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nmt.config import load_config
    from nmt.train import Trainer

    _count_fused_rnn_flops()
    threads = args.threads[0]  # one value in a worker
    torch.set_num_threads(threads)
    cfg = load_config(args.config, [f"data.dir={args.data}", f"train.run_dir={args.run_dir}",
                                    f"train.threads={threads}", "train.device=cpu",
                                    f"train.sampled_softmax={args.sampled_softmax[0]}",
                                    f"train.amp_cpu={str(args.precisions[0] == 'bf16').lower()}"])
    trainer = Trainer(cfg)
    batches = trainer.data.epoch_batches(cfg.train.seed, 0)
    if len(batches) < args.warmup + 1 + args.steps:  # the warm-up, one probe for the FLOP count, the timed ones
        raise SystemExit(f"{args.data} gives {len(batches)} batches an epoch: too few for --warmup {args.warmup}, one "
                         f"update to count FLOPs and --steps {args.steps}; lower them or use a larger corpus")
    for b in batches[: args.warmup]:
        trainer.update([b])
    with FlopCounterMode(display=False) as counter:
        probe = batches[args.warmup]
        trainer.update([probe])
    flops_per_token = counter.get_total_flops() / trainer.data.batch(probe).ntokens
    timed = batches[args.warmup + 1: args.warmup + 1 + args.steps]
    tokens = 0
    start = time.perf_counter()
    for b in timed:
        tokens += trainer.update([b])[2]
    elapsed = time.perf_counter() - start
    a = torch.randn(2048, 2048, dtype=torch.bfloat16 if args.precisions[0] == "bf16" else torch.float32)
    a @ a
    t0 = time.perf_counter()
    for _ in range(3):
        a @ a
    gemm = 3 * 2 * 2048**3 / (time.perf_counter() - t0)
    tok_s = tokens / elapsed
    return {"system": "rnnsearch", "precision": args.precisions[0], "sampled_softmax": cfg.train.sampled_softmax,
            "threads": threads,
            "updates": len(timed), "tokens": tokens, "seconds": elapsed, "tgt_tok_s": tok_s,
            "flops_per_tgt_token": flops_per_token,
            "gflop_s": tok_s * flops_per_token / 1e9, "gemm_gflop_s": gemm / 1e9,
            "nominal_peak_gflop_s": cpu_mhz() * 1e6 * 32 * threads / 1e9 if args.precisions[0] == "fp32" else None}


def run_ours(args: argparse.Namespace, threads: int, sampled: int, precision: str, tokenizers: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        for name in ("src.model", "tgt.model"):
            shutil.copy(tokenizers / name, run_dir / name)
        cores = ",".join(str(i) for i in range(threads))
        cmd = ["taskset", "-c", cores, sys.executable, __file__, "--worker", "--threads", str(threads),
               "--config", args.config, "--data", args.data, "--run-dir", str(run_dir),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--sampled-softmax", str(sampled),
               "--precisions", precision]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"training ({precision}, sampled softmax {sampled}, {threads} thread(s)) failed:\n"
                             f"{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def write_pieces(data: Path, tokenizers: Path, out: Path) -> None:
    """The corpus as space-separated SentencePiece pieces, the input OpenNMT-py reads."""
    from nmt.tokenizer import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    for side, lang in (("src", "es"), ("tgt", "en")):
        tok = Tokenizer(tokenizers / f"{side}.model")
        for split in ("train", "dev"):
            lines = (data / f"{split}.{side}").read_text(encoding="utf-8").splitlines()
            pieces = [" ".join(tok.to_pieces(line)) for line in lines]
            (out / f"{split}.sp.{lang}").write_text("\n".join(pieces) + "\n", encoding="utf-8")


def run_onmt(args: argparse.Namespace, tokenizers: Path) -> dict:
    venv_bin = Path(args.onmt_venv).expanduser() / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_pieces(Path(args.data), tokenizers, tmp / "data")
        config = tmp / "config.yaml"
        config.write_text(ONMT_CONFIG.format(run=tmp / "run", data=tmp / "data", steps=args.onmt_steps,
                                             report=args.onmt_report_every))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{venv_bin}:{os.environ['PATH']}"}
        subprocess.run([str(venv_bin / "onmt_build_vocab"), "-config", str(config), "-n_sample", "-1"],
                       env=env, check=True, capture_output=True, text=True)
        proc = subprocess.run(["taskset", "-c", "0", str(venv_bin / "onmt_train"), "-config", str(config)],
                              env=env, capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        rates = [int(m.group(2)) for m in re.finditer(r"(\d+)/\s*(\d+) tok/s", log)]
        if proc.returncode != 0 or len(rates) < 2:
            raise SystemExit(f"onmt_train failed or reported too little:\n{log[-3000:]}")
        later = rates[1:]
        return {"system": "OpenNMT-py 3.5.1", "threads": 1, "reports": len(later),
                "tgt_tok_s": sum(later) / len(later)}


def markdown(rows: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}", "",
             "| system | precision | sampled softmax | threads | target tokens/s | GFLOP/s "
             "| % of matmul peak (same precision) | % of nominal fp32 peak |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "gflop_s" in r:
            lines.append(f"| {r['system']} | {r['precision']} | {r['sampled_softmax'] or 'off'} | {r['threads']} | "
                         f"{r['tgt_tok_s']:.0f} | "
                         f"{r['gflop_s']:.1f} | "
                         f"{100 * r['gflop_s'] / r['gemm_gflop_s']:.0f}% | "
                         + (f"{100 * r['gflop_s'] / r['nominal_peak_gflop_s']:.0f}% |"
                            if r["nominal_peak_gflop_s"] else " |"))
        else:
            lines.append(f"| {r['system']} | fp32 | off | {r['threads']} | {r['tgt_tok_s']:.0f} | | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/base.yaml")
    p.add_argument("--data", default="data/bible")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int_from(1), default=20, help="timed updates")
    p.add_argument("--warmup", type=int_from(0), default=3)
    p.add_argument("--sampled-softmax", type=int, nargs="+", default=[0, 1024], metavar="K",
                   help="train.sampled_softmax settings to measure (0 = the exact softmax; default 0 1024)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                   help="fp32, and/or bf16: train.amp_cpu (bfloat16 autocast; needs AVX512_BF16 or AMX to pay)")
    p.add_argument("--onmt-venv", help="virtual env with OpenNMT-py 3.5.1, to measure it side by side")
    p.add_argument("--onmt-steps", type=int, default=50, help="OpenNMT-py updates (its first report is dropped)")
    p.add_argument("--onmt-report-every", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from nmt.config import load_config
    from nmt.errors import NMTError
    from nmt.tokenizer import ensure_tokenizers

    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = Path(tmp)
        try:  # every setting and the corpus are checked before the first (long) run starts
            for sampled in args.sampled_softmax:
                load_config(args.config, [f"train.sampled_softmax={sampled}"])
            ensure_tokenizers(Path(args.data), tokenizers, load_config(args.config).tokenizer)
        except NMTError as exc:
            raise SystemExit(f"train_speed.py: error: {exc}") from None
        rows = []
        if args.onmt_venv:
            rows.append(run_onmt(args, tokenizers))
            print(json.dumps(rows[-1]), flush=True)
        for precision in args.precisions:
            if precision == "bf16" and not cpu_has_bf16():
                print("skipping bf16: this CPU has no bfloat16 instructions, and train.amp_cpu trains in float32 "
                      "there", flush=True)
                continue
            for sampled in args.sampled_softmax:
                for threads in args.threads:
                    rows.append(run_ours(args, threads, sampled, precision, tokenizers))
                print(json.dumps(rows[-1]), flush=True)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {__import__('torch').__version__}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_speed.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    table = markdown(rows, machine)
    onmt = next((r for r in rows if r["system"].startswith("OpenNMT")), None)
    if onmt:
        table += "\n"
        for ours in (r for r in rows if r["system"] == "rnnsearch" and r["threads"] == 1):
            softmax = f"sampled softmax {ours['sampled_softmax']}" if ours["sampled_softmax"] else "exact softmax"
            table += (f"rnnsearch ({ours['precision']}, {softmax}) / OpenNMT-py at 1 thread: "
                      f"{ours['tgt_tok_s'] / onmt['tgt_tok_s']:.2f}x\n")
    (out / "train_speed.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
