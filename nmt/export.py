"""Model directories: export a training run to weights + tokenizers + card, and read the weights back.

A model directory holds `model.safetensors` (fp32 or fp16), `config.yaml`, `src.model`, `tgt.model`,
`card.json` and, when the training data was there to build it from, `shortlist.safetensors` (see
nmt/shortlist.py). It carries no optimizer state and no pickled code: safetensors holds only tensors.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from nmt import __version__
from nmt.checkpoint import load_checkpoint, step_checkpoints
from nmt.config import Config, apply_overrides, from_dict, save_config
from nmt.corpus import CORPUS_JSON, TRAIN_FILES, holds_other_pairs
from nmt.errors import NMTError
from nmt.evaluate import is_report
from nmt.files import make_dir, replace_dir, write_failure
from nmt.model import Seq2Seq
from nmt.run_log import METRICS_FILE, current, read_records, this_run
from nmt.shortlist import SHORTLIST_FILE, Shortlist, shortlist_from_corpus
from nmt.tokenizer import TOKENIZER_FILES, Tokenizer, check_trained_with

log = logging.getLogger(__name__)

FORMAT = "rnnsearch-model-1"
MODEL_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.yaml", "card.json"
EXPORT_FILES = {MODEL_FILE, CONFIG_FILE, CARD_FILE, SHORTLIST_FILE, *TOKENIZER_FILES}
TIED = {"decoder.out.weight": "decoder.embed.weight"}  # with model.tie_embeddings: stored once, re-tied on load


def is_model_dir(path: Path) -> bool:
    return (path / MODEL_FILE).is_file()


def _check_replaceable(outdir: Path, run: Path) -> None:
    """--force replaces an earlier export (or an empty directory), never anything else: not a file, not a
    directory of other things, not the run being exported nor one holding it."""
    target = outdir.resolve()
    if target == run.resolve() or target in run.resolve().parents:
        raise NMTError(f"{outdir} is (or holds) the run directory being exported, {run}: choose another output "
                       "directory")
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise NMTError(f"{outdir} is (or holds) the current directory: run `nmt export` from another one")
    if not target.is_dir() or not (is_model_dir(target) or not any(target.iterdir())):
        raise NMTError(f"{outdir} exists and is not an exported model directory (--force replaces only an earlier "
                       "export): choose another output directory")


def run_checkpoint(run: Path, which: str = "best") -> Path:
    """The checkpoint of a run directory: best.pt (falling back to last.pt when there is none yet) or last.pt."""
    if run.is_file():
        raise NMTError(f"{run} is a file: give the run directory that holds it (its best.pt is exported, or its "
                       "last.pt with --checkpoint last)")
    if not run.is_dir():
        raise NMTError(f"run directory not found: {run}")
    names = ["best.pt", "last.pt"] if which == "best" else ["last.pt"]
    for name in names:
        if (run / name).is_file():
            return run / name
    raise NMTError(f"{run} holds no {' or '.join(names)} (is it a run directory?)")


def weights_digest(weights: dict[str, torch.Tensor], tied: bool) -> str:
    """SHA-256 of a model's weights as float32, tied copies left out: the same for a checkpoint, its fp32 export
    and a model loaded from either (an fp16 export has its own), so a report can name the weights it scored."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        if tied and name in TIED:
            continue
        tensor = weights[name].detach().cpu()
        tensor = tensor.float() if tensor.is_floating_point() else tensor
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_weights(model: Seq2Seq, weights: dict[str, torch.Tensor], source: Path | str) -> None:
    """Copy weights into model (converting fp16 to the model's dtype); mismatches raise NMTError."""
    expected = set(model.state_dict())
    if model.cfg.tie_embeddings:
        weights = {k: v for k, v in weights.items() if k not in TIED}
        expected -= set(TIED)
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        detail = (f"missing {', '.join(missing[:5])}" if missing else "") + \
                 ("; " if missing and unexpected else "") + \
                 (f"unexpected {', '.join(unexpected[:5])}" if unexpected else "")
        raise NMTError(f"{source} does not hold this model's weights ({detail})")
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise NMTError(f"{source} does not fit its config: {first}") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of an rnnsearch model.safetensors; a corrupted or foreign file raises NMTError."""
    if not path.is_file():
        raise NMTError(f"model weights not found: {path}")
    path.open("rb").close()  # PermissionError as such: safetensors says "No such file or directory"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise NMTError(f"{path} is not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise NMTError(f"{path} is not an rnnsearch model (no '{FORMAT}' marker in its metadata)")
    return weights


def read_card(model_dir: Path) -> dict[str, Any]:
    path = model_dir / CARD_FILE
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NMTError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(card, dict):
        raise NMTError(f"{path} must hold a JSON object")
    return card


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NMTError(f"{path} is not a readable JSON file: {exc}") from None


def _training_metrics(records: list[dict[str, Any]], state: dict[str, Any]) -> dict[str, Any]:
    """Best dev BLEU, steps and the dev metrics at the exported step, from the checkpoint and metrics.jsonl's
    records; for an average, the steps averaged instead of dev metrics, which no validation measured."""
    pos = state.get("position", {})
    metrics: dict[str, Any] = {"steps": pos.get("step"), "epochs": pos.get("epoch"),
                               "best_dev_bleu": pos.get("best_bleu") if pos.get("best_bleu", -1) >= 0 else None,
                               "dev_bleu_decoding": "greedy"}
    if "averaged_steps" in state:
        metrics["averaged_steps"] = state["averaged_steps"]
        return metrics
    valid = [r for r in records if r.get("type") == "valid" and r.get("step") == pos.get("step")]
    if valid:
        metrics["dev"] = {k: v for k, v in valid[-1].items() if k.startswith("dev_")}
    return metrics


def _sessions(records: list[dict[str, Any]]) -> dict[str, Any]:
    """How the run was trained: its commands, hardware and wall time, from the session records of metrics.jsonl.

    A session killed without its end record counts up to its last metrics line; one that ended, not interrupted,
    where it began, with nothing logged between (a --resume of a run that had nothing left to train), does not
    count. An interrupted one does: it may have spent minutes on a validation that a stop abandoned."""
    sessions: list[dict[str, Any]] = []
    idle = False  # the last session has logged nothing since its start
    for r in records:
        if not isinstance(r.get("time"), (int, float)):
            continue
        if r.get("type") == "session" and r.get("event") == "start":
            sessions.append({"start": r["time"], "end": r["time"], "step": r.get("step"), **{k: r.get(k) for k in (
                "command", "hardware", "device", "threads", "ranks", "torch", "precision")}})
            idle = True
        elif (sessions and idle and r.get("type") == "session" and r.get("event") == "end"
              and r.get("reason") != "interrupted" and isinstance(r.get("step"), int)
              and r["step"] == sessions[-1]["step"]):
            sessions.pop()
            idle = False
        elif sessions:
            sessions[-1]["end"] = r["time"]
            idle = False
    seconds = sum(s["end"] - s["start"] for s in sessions)
    # In the order they first ran, so that the commands read as the recipe they were.
    unique = {k: list(dict.fromkeys(str(s[k]) for s in sessions if s.get(k) is not None))
              for k in ("command", "hardware", "precision")}
    return {"commands": unique["command"], "hardware": unique["hardware"], "precisions": unique["precision"],
            "sessions": len(sessions),
            "wall_seconds": round(seconds), "wall_hours": round(seconds / 3600, 2)}


def _evaluation(run: Path, checkpoint: str, report: Path | None, digests: set[str], step: int | None,
                dtype: str) -> dict[str, Any] | None:
    """Scores and sacrebleu signatures from an `nmt evaluate` report of the weights being exported (`digests`:
    theirs as trained and as stored): `report`, else the test report of the run (RUN/eval/test.json) or of the
    checkpoint file (RUN/eval/last/test.json); those of other weights, or not reports at all, are left out with a
    warning."""
    exported = f"{dtype}, {checkpoint}" if checkpoint.startswith("average") else f"{dtype}, step {step}"
    if report is not None:
        return _card_evaluation(_report_of(report, digests, exported))
    candidates = [run / "eval" / "test.json"]
    if checkpoint.endswith(".pt"):
        candidates.append(run / "eval" / Path(checkpoint).stem / "test.json")
    problems = []
    for path in (p for p in candidates if p.is_file()):
        try:
            return _card_evaluation(_report_of(path, digests, exported))
        except NMTError as exc:
            problems.append(str(exc))
    for problem in problems:
        log.warning("%s; the card carries no test scores from it", problem)
    return None


def _card_evaluation(data: dict[str, Any]) -> dict[str, Any]:
    """What the card keeps of a report, with no local paths."""
    card = {k: data[k] for k in ("metrics", "n", "src", "ref", "decode", "int8", "model", "step", "weights_sha256")
            if k in data}
    if isinstance(card.get("src"), str):
        card["src"] = _portable(card["src"])
    if isinstance(card.get("ref"), list):
        card["ref"] = [_portable(r) if isinstance(r, str) else r for r in card["ref"]]
    return card


def _report_of(path: Path, digests: set[str], exported: str) -> dict[str, Any]:
    """An `nmt evaluate` report that scored one of `digests` (the weights `exported` describes); NMTError saying
    why a file is not one."""
    if not path.is_file():
        raise NMTError(f"{path} is a directory, not an `nmt evaluate` report" if path.is_dir() else
                       f"evaluation report not found: {path}")
    data = _read_json(path)
    if not is_report(data):
        raise NMTError(f"{path} is not an `nmt evaluate` report (no 'metrics' of scores with their signatures)")
    digest = data.get("weights_sha256")
    if digest is None and "model" not in data:
        raise NMTError(f"{path} scores translations from a file (`nmt evaluate --hyp`), not this model's")
    if digest is None:
        raise NMTError(f"{path} does not say which weights it scored (a report from before `nmt evaluate` recorded "
                       "them): evaluate again")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise NMTError(f"{path}: its weights_sha256 is not a SHA-256 digest ({digest!r}; edited?): evaluate again")
    if digest not in digests:
        raise NMTError(f"{path} scored other weights than this export's ({exported}): those of "
                       f"{data.get('model_path')} at step {data.get('step')}. Give a report of these weights: for an "
                       "--average export, evaluate the export, then export again with --report and --force")
    return data


def _portable(path: str) -> str:
    """A path for a card that travels: relative ones as they are, absolute ones cut to their last two parts."""
    return str(Path(*Path(path).parts[-2:])) if Path(path).is_absolute() else path


def average_checkpoints(paths: list[Path]) -> dict[str, Any]:
    """The last checkpoint's state with its weights replaced by the mean of all paths' weights (Polyak averaging,
    as OpenNMT-py's average_models and fairseq's average_checkpoints do), and "averaged_steps" added: the steps
    of the checkpoints averaged."""
    states = [load_checkpoint(p) for p in paths]
    ref = states[-1]
    for path, state in zip(paths, states, strict=True):
        problem = _unlike(state, ref)
        if problem:
            raise NMTError(f"cannot average {path} with {paths[-1]}: {problem}")
    averaged = {}
    for name, tensor in ref["model"].items():
        if tensor.is_floating_point():
            total = sum(s["model"][name].double() for s in states)
            averaged[name] = (total / len(states)).to(tensor.dtype)
        else:
            averaged[name] = tensor
    return {**ref, "model": averaged, "averaged_steps": [s.get("position", {}).get("step") for s in states]}


def _unlike(state: dict[str, Any], ref: dict[str, Any]) -> str | None:
    """Why two checkpoints cannot be averaged (None: they can), as the states of one run can."""
    weights, ref_weights = state.get("model", {}), ref.get("model", {})
    if (set(weights) != set(ref_weights) or state.get("vocab") != ref.get("vocab")
            or any(weights[k].shape != t.shape for k, t in ref_weights.items())):
        return "they hold different models"
    if state.get("tokenizers_sha256") != ref.get("tokenizers_sha256"):
        return "they were trained with other tokenizers (of different runs)"
    if state.get("data_sha256") != ref.get("data_sha256"):
        return "they were trained on other pairs (of different runs)"
    return None


def _export_state(run: Path, checkpoint: str, average: int) -> tuple[dict[str, Any], str]:
    """The state to export (a checkpoint, or the mean of the last `average` kept ones) and its name for the card."""
    if average < 0:
        raise NMTError(f"--average must be a number of checkpoints (1 or more), not {average}")
    if average == 0:
        ckpt = run_checkpoint(run, checkpoint)
        return load_checkpoint(ckpt), ckpt.name
    if not run.is_dir():
        raise NMTError(f"run directory not found: {run}")
    paths = step_checkpoints(run)
    if len(paths) < average:
        raise NMTError(f"--average {average}: {run} holds {len(paths)} kept step checkpoints; train with "
                       f"train.keep_checkpoints >= {average} to keep enough of them")
    paths = paths[-average:]
    return average_checkpoints(paths), "average of " + ", ".join(p.name for p in paths)


def build_card(cfg: Config, state: dict[str, Any], run: Path, checkpoint: str, params: int, dtype: str,
               name: str, digests: tuple[str, str], report: Path | None = None,
               data_dir: Path | None = None) -> dict[str, Any]:
    """The card of an export; `digests` are the weights' as trained and as stored (equal unless fp16)."""
    data_dir = data_dir or Path(cfg.data.dir)
    corpus_json = data_dir / CORPUS_JSON
    data = _read_json(corpus_json) if corpus_json.is_file() else {"dir": _portable(str(data_dir))}
    if isinstance(data, dict) and isinstance(data.get("sources"), dict):  # a card travels: file names, no paths
        data["sources"] = {k: {**v, "path": Path(v["path"]).name}
                           if isinstance(v, dict) and isinstance(v.get("path"), str) else v
                           for k, v in data["sources"].items()}
    records = read_records(run / METRICS_FILE)
    return {
        "format": FORMAT,
        "name": name,
        "rnnsearch_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "languages": {"src": cfg.data.src_lang, "tgt": cfg.data.tgt_lang},
        "architecture": cfg.to_dict()["model"],
        "parameters": params,
        "dtype": dtype,
        "vocab": state.get("vocab"),
        "checkpoint": checkpoint,
        "weights_sha256": digests[1],
        "data_sha256": state.get("data_sha256"),  # the training pairs: `nmt evaluate --split` checks its corpus
        "data": data,
        "metrics": _training_metrics(current(records), state),
        "evaluation": _evaluation(run, checkpoint, report, set(digests), state.get("position", {}).get("step"),
                                  dtype),
        "training": _sessions(this_run(records)),  # lost updates took their time too
    }


def export_model(run: str | Path, outdir: str | Path, fp16: bool = False, checkpoint: str = "best",
                 report: str | Path | None = None, overwrite: bool = False, average: int = 0,
                 decode: list[str] | tuple[str, ...] = (), data: str | Path | None = None) -> Path:
    """Write the model directory of a run (its best or last checkpoint, or the average of its last `average`
    kept step checkpoints) to outdir, atomically; `decode` overrides (`decode.key=value`) set the model's
    decoding defaults. The shortlist and the card's corpus come from `data`, by default the run's data.dir
    (relative to the working directory, as `nmt train` read it)."""
    run, outdir = Path(run), Path(os.path.normpath(outdir))
    if outdir.exists() or outdir.is_symlink():
        if outdir.is_symlink() or not outdir.name:  # replace what a link names, keeping the link; "." has no name
            try:
                outdir = outdir.resolve(strict=True)
            except (OSError, RuntimeError):  # RuntimeError: a loop, before Python 3.13
                raise NMTError(f"{outdir} is a link that leads nowhere: remove it or choose another output "
                               "directory") from None
        _check_replaceable(outdir, run)  # before advising --force, which would be refused
        if not overwrite:
            raise NMTError(f"{outdir} already exists (use --force to replace it)")
    state, ckpt = _export_state(run, checkpoint, average)
    for name in TOKENIZER_FILES:
        if not (run / name).is_file():
            raise NMTError(f"{run / name} not found: a run directory holds the SentencePiece models")
    try:
        cfg = from_dict(apply_overrides(state["config"], decode, sections=("decode",)))
        vocab = state["vocab"]["src"], state["vocab"]["tgt"]
        model = Seq2Seq(cfg.model, *vocab)
    except (KeyError, TypeError) as exc:
        raise NMTError(f"{ckpt} lacks the config or vocabulary sizes of an rnnsearch run ({exc})") from None
    tokenizers = [Tokenizer(run / name) for name in TOKENIZER_FILES]
    check_trained_with(state, *tokenizers, run, ckpt)
    load_weights(model, state["model"], ckpt)
    dtype = torch.float16 if fp16 else torch.float32
    tensors = {k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in model.state_dict().items() if not (cfg.model.tie_embeddings and k in TIED)}
    data_dir = _export_corpus(Path(data) if data is not None else None, cfg, state, ckpt)
    digests = (weights_digest(model.state_dict(), cfg.model.tie_embeddings), weights_digest(tensors, False))
    card = build_card(cfg, state, run, ckpt, model.num_parameters(), str(dtype).removeprefix("torch."),
                      outdir.name, digests, Path(report) if report else None, data_dir)
    shortlist = shortlist_from_corpus(data_dir, *tokenizers)
    make_dir(outdir.parent)
    try:
        _write_model_dir(outdir, run, tensors, cfg, card, shortlist)
    except (OSError, SafetensorError) as exc:
        raise NMTError(f"cannot write {outdir} ({write_failure(outdir, exc)}); nothing there was changed") from None
    log.info("exported %s (%s, %d parameters) to %s", ckpt, card["dtype"], card["parameters"], outdir)
    return outdir


def _export_corpus(data: Path | None, cfg: Config, state: dict[str, Any], ckpt: str) -> Path:
    """The corpus the shortlist and the card come from: `data` (which must be one), else the run's data.dir. A
    data.dir that holds other pairs than the run trained on is refused; a `data` that does is warned about."""
    data_dir = data if data is not None else Path(cfg.data.dir)
    if data is not None:  # named by the user, so it must hold what it is for (the run's own may be gone)
        if not data_dir.is_dir():
            raise NMTError(f"--data {data_dir}: not a directory")
        missing = [name for name in TRAIN_FILES if not (data_dir / name).is_file()]
        if missing:
            raise NMTError(f"--data {data_dir}: no {' or '.join(missing)} (a corpus made by `nmt prepare`)")
    if not holds_other_pairs(data_dir, state.get("data_sha256")):
        return data_dir
    if data is None:  # the run's data.dir, prepared again since: the card would say these pairs trained the model
        raise NMTError(f"{data_dir} (the run's data.dir) holds other training pairs than {ckpt} was trained on "
                       "(prepared again?): name the corpus it trained on with --data DIR, or the corpus to take the "
                       "shortlist from")
    log.warning("%s holds other training pairs than %s was trained on (prepared again?): the card's data and "
                "the shortlist describe them all the same", data_dir, ckpt)
    return data_dir


def _write_model_dir(outdir: Path, run: Path, tensors: dict[str, torch.Tensor], cfg: Config, card: dict[str, Any],
                     shortlist: Shortlist | None) -> None:
    """Write the files in a temporary directory beside outdir, then put it in outdir's place."""
    tmp = Path(tempfile.mkdtemp(dir=outdir.parent, prefix=f".{outdir.name}."))
    try:
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": FORMAT, "dtype": card["dtype"]})
        save_config(cfg, tmp / CONFIG_FILE)
        for name in TOKENIZER_FILES:
            shutil.copyfile(run / name, tmp / name)
        if shortlist is not None:
            shortlist.save(tmp / SHORTLIST_FILE)
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        # What the export did not write (its eval/, the user's notes) stays: nothing of the user's is deleted.
        replace_dir(outdir, tmp, keep=lambda name: name not in EXPORT_FILES)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
