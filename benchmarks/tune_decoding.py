"""Choose a model's decoding settings on the dev split: beam-5 BLEU over length penalties x n-gram blocking.

    python benchmarks/tune_decoding.py runs/base [--alphas 0 0.5 1 1.5] [--ngrams 0 3 4] [--out DIR]

Every number comes from `nmt evaluate MODEL --split dev`; the test split is never looked at, so the settings
chosen here can be put in the config's decode section (decode.length_penalty, decode.no_repeat_ngram) and the
test score stays an honest estimate. Prints a markdown table (BLEU, chrF, output/reference length ratio) and
writes it with a JSON copy to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import nmt_evaluate  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="run directory, checkpoint or exported model directory")
    ap.add_argument("--data", help="prepared corpus directory (default: the model config's data.dir)")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5])
    ap.add_argument("--ngrams", type=int, nargs="+", default=[0, 3, 4])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--out", default="benchmarks/results", help="directory for tune_decoding.md/.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="tune-decoding-"))  # nmt evaluate's hypotheses, not the model's eval/
    for ngram in args.ngrams:
        for alpha in args.alphas:
            options = [args.model, "--split", "dev", "--beam", str(args.beam), "--length-penalty", str(alpha),
                       "--no-repeat-ngram", str(ngram), "--threads", str(args.threads), "--out", str(scratch)]
            if args.data:
                options += ["--data", args.data]
            report = nmt_evaluate(options, scratch / "report.json")
            bleu = report["metrics"]["bleu"]
            rows.append({"length_penalty": alpha, "no_repeat_ngram": ngram, "bleu": bleu["score"],
                         "chrf": report["metrics"]["chrf"]["score"], "ratio": bleu["ratio"]})
            print(f"alpha {alpha} no_repeat_ngram {ngram}: BLEU {bleu['score']:.2f}", file=sys.stderr)
    shutil.rmtree(scratch, ignore_errors=True)
    best = max(rows, key=lambda r: r["bleu"])
    lines = [f"Dev split, beam {args.beam}, model `{args.model}` (`nmt evaluate --split dev`):", "",
             "| length penalty | no-repeat n-gram | BLEU | chrF | length ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['length_penalty']} | {r['no_repeat_ngram'] or 'off'} | {r['bleu']:.2f} | {r['chrf']:.2f} | "
              f"{r['ratio']:.3f} |" for r in rows]
    lines += ["", f"Best: length penalty {best['length_penalty']}, no-repeat n-gram "
                  f"{best['no_repeat_ngram'] or 'off'} ({best['bleu']:.2f} BLEU)."]
    (out / "tune_decoding.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "tune_decoding.json").write_text(json.dumps({"model": args.model, "beam": args.beam, "rows": rows,
                                                        "best": best}, indent=2) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
