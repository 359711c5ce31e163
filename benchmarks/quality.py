"""The quality table of a model on a prepared corpus, every number from `nmt evaluate`.

    python benchmarks/quality.py models/es-en-bible [--data data/bible] [--out benchmarks/results]

Rows: the test split at greedy (beam 1), beam 5 and beam 10 (over the model's shortlist, the default), beam 5
over the whole target vocabulary (`--no-shortlist`), beam 5 in fp32 (`--no-int8`; the others decode with the
config's default, int8 on the CPU), the dev split at beam 5 (and in fp32),
and Apertium's rule-based spa->eng (Debian `apertium-eng-spa`) on the same test set, scored with
`nmt evaluate --hyp` (skipped with a note when `apertium` is not installed). Also --examples test verses (5)
picked with a fixed seed, next to their references. Writes quality.json, quality.md and each row's hypotheses and
`nmt evaluate` report (quality-NAME.hyp/.json) under --out (the committed results by default), and prints the
markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

from nmt.cli import int_from

ROWS = [  # (name, split, nmt evaluate options)
    ("greedy", "test", ["--beam", "1"]),
    ("beam 5", "test", ["--beam", "5"]),
    ("beam 10", "test", ["--beam", "10"]),
    ("beam 5, whole vocabulary", "test", ["--beam", "5", "--no-shortlist"]),
    ("beam 5, fp32", "test", ["--beam", "5", "--no-int8"]),
    ("beam 5 (dev)", "dev", ["--beam", "5"]),
    ("beam 5 (dev), fp32", "dev", ["--beam", "5", "--no-int8"]),
]


def nmt_evaluate(args: list[str], report: Path) -> dict:
    """Run `nmt evaluate` in a subprocess, its JSON report written to `report`, and return the report."""
    cmd = [sys.executable, "-m", "nmt", "evaluate", *args, "--report", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(report.read_text())


def apertium(src: Path, out: Path) -> Path | None:
    """Apertium's spa-eng translation of src, one line per line (None when apertium is not installed)."""
    if not shutil.which("apertium"):
        return None
    lines = src.read_text(encoding="utf-8").splitlines()
    # -u: no unknown-word marks (*word), which would otherwise count against it in BLEU
    proc = subprocess.run(["apertium", "-u", "spa-eng"], input="\n".join(lines) + "\n", capture_output=True,
                          text=True, check=True)
    hyps = proc.stdout.splitlines()
    if len(hyps) != len(lines):
        raise SystemExit(f"apertium returned {len(hyps)} lines for {len(lines)}")
    out.write_text("\n".join(h.strip() for h in hyps) + "\n", encoding="utf-8")
    return out


def row(name: str, report: dict) -> dict:
    m = report["metrics"]
    return {"system": name, "n": report["n"], "bleu": m["bleu"]["score"], "chrf": m["chrf"]["score"],
            "ter": m["ter"]["score"], "bleu_signature": m["bleu"]["signature"],
            "sentences_per_s": report.get("sentences_per_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--data", default="data/bible")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--threads", type=int_from(1), default=1)
    p.add_argument("--seed", type=int, default=1, help="seed that picks the example verses")
    p.add_argument("--examples", type=int_from(0), default=5, help="test verses shown (at most the test set's)")
    args = p.parse_args()
    data, out = Path(args.data), Path(args.out)
    missing = [name for name in ("dev.src", "dev.tgt", "test.src", "test.tgt") if not (data / name).is_file()]
    if missing:
        p.error(f"{data} lacks {', '.join(missing)}: prepare a corpus first (`make bible`, or `nmt prepare`)")
    out.mkdir(parents=True, exist_ok=True)
    rows, hyp_files = [], {}
    for name, split, options in ROWS:
        stem = out / f"quality-{name.replace(' ', '').replace(',', '-').replace('(', '').replace(')', '')}"
        hyp = stem.with_suffix(".hyp")
        report = nmt_evaluate([args.model, "--split", split, "--data", str(data), "--threads", str(args.threads),
                               *options, "--out", str(out)], stem.with_suffix(".json"))
        shutil.move(out / f"{split}.hyp", hyp)
        report["hyp"] = str(hyp.resolve())  # where the report's hypotheses are now
        stem.with_suffix(".json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        hyp_files[name] = hyp
        rows.append({**row(f"rnnsearch {name}", report), "split": split})
        print(json.dumps(rows[-1]), flush=True)
    ap = apertium(data / "test.src", out / "quality-apertium.hyp")
    if ap:
        report = nmt_evaluate(["--hyp", str(ap), "--ref", str(data / "test.tgt")], ap.with_suffix(".json"))
        rows.append({**row("Apertium spa-eng (rule-based)", report), "split": "test"})
    src = (data / "test.src").read_text(encoding="utf-8").splitlines()
    ref = (data / "test.tgt").read_text(encoding="utf-8").splitlines()
    # Where each verse is (Ruth 1:1), from `nmt prepare bible`; a corpus of `nmt prepare files` has no such file.
    refs = data / "test.ref"
    where = (refs.read_text(encoding="utf-8").splitlines() if refs.is_file()
             else [f"test line {i + 1}" for i in range(len(src))])
    hyp = hyp_files["beam 5"].read_text(encoding="utf-8").splitlines()
    picks = sorted(random.Random(args.seed).sample(range(len(src)), min(args.examples, len(src))))
    examples = [{"ref": where[i], "source": src[i], "reference": ref[i], "translation": hyp[i]} for i in picks]

    lines = ["| system | split | BLEU | chrF | TER | sentences/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['sentences_per_s']:.1f}" if r["sentences_per_s"] else ""
        lines.append(f"| {r['system']} | {r['split']} ({r['n']}) | {r['bleu']:.1f} | {r['chrf']:.1f} | "
                     f"{r['ter']:.1f} | {speed} |")
    if not ap:
        lines.append("\n(Apertium not installed: `apt-get install apertium-eng-spa` adds its row.)")
    lines += ["", f"BLEU signature: `{rows[0]['bleu_signature']}`; threads: {args.threads}", "",
              f"{len(picks)} test verses picked by `random.Random({args.seed}).sample` (beam 5):", ""]
    for e in examples:
        lines += [f"- **{e['ref']}**", f"  - source: {e['source']}", f"  - reference: {e['reference']}",
                  f"  - rnnsearch: {e['translation']}"]
    table = "\n".join(lines) + "\n"
    result = {"model": args.model, "command": " ".join(sys.argv), "threads": args.threads, "rows": rows,
              "examples": examples, "cpu_count": os.cpu_count()}
    (out / "quality.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "quality.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
