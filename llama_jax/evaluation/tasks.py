"""The paper's zero-shot multiple-choice tasks, with lm-evaluation-harness's prompts.

Each task reads rows in the Hugging Face datasets' layout (the one lm-evaluation-harness
reads), from a local JSONL file, or from TFDS (converted to that layout on the way in), and
turns a row into a `Doc`: the context(s), the choices and the gold index. Local files are
looked for first: `{data_dir}/{task}/{split}.jsonl`, then `{data_dir}/{task}_{split}.jsonl`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable

import numpy as np

from llama_jax.data.config import DataError


@dataclasses.dataclass(frozen=True)
class Doc:
    contexts: tuple[str, ...]  # one per choice (WinoGrande's partial scoring) or one shared
    choices: tuple[str, ...]   # continuations, scored after a " " delimiter
    gold: int


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    to_doc: Callable[[dict], Doc]         # a row in Hugging Face layout -> Doc
    eval_split: str = "validation"       # lm-evaluation-harness's evaluation split
    train_split: str = "train"
    tfds_name: str | None = None
    tfds_splits: tuple[tuple[str, str], ...] = ()  # our split name -> TFDS split name, where they differ
    from_tfds: Callable[[dict], dict] | None = None
    paper_norm: bool = False              # BoolQ, OBQA: also divide by P(choice | "Answer:")
    paper_metric: str = "acc_norm"        # the metric the paper's Table 3 reports


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleanup: WikiHow's `[title]`-style artifacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _boolq(r):
    return Doc((f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",), ("no", "yes"), int(r["label"]))


def _piqa(r):
    return Doc((f"Question: {r['goal']}\nAnswer:",), (r["sol1"], r["sol2"]), int(r["label"]))


def _siqa(r):
    return Doc((f"Q: {r['context']} {r['question']}\nA:",), (r["answerA"], r["answerB"], r["answerC"]),
               int(r["label"]) - 1)


def _hellaswag(r):
    if "ctx_a" in r:
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    else:  # TFDS keeps only the joined `ctx`, so ctx_b's first letter cannot be capitalised
        ctx = r["ctx"]
    query = hellaswag_preprocess(r["activity_label"] + ": " + ctx)
    return Doc((query,), tuple(hellaswag_preprocess(e) for e in r["endings"]), int(r["label"]))


def _winogrande(r):
    s = r["sentence"]
    i = s.index("_")
    return Doc((s[:i] + r["option1"], s[:i] + r["option2"]), (s[i + 1:].strip(),), {"1": 0, "2": 1}[str(r["answer"])])


def _arc(r):
    labels = [str(x) for x in r["choices"]["label"]]
    return Doc((f"Question: {r['question']}\nAnswer:",), tuple(r["choices"]["text"]), labels.index(str(r["answerKey"])))


def _obqa(r):
    labels = [str(x) for x in r["choices"]["label"]]
    return Doc((r["question_stem"],), tuple(r["choices"]["text"]), labels.index(str(r["answerKey"]).lstrip()))


# TFDS rows -> Hugging Face layout. ClassLabels arrive as ints, Text as bytes (decoded before).
def _tfds_bool_q(r):
    return {"passage": r["passage"], "question": r["question"], "label": int(bool(r["answer"]))}


def _tfds_winogrande(r):
    return {**r, "answer": str(int(r["label"]) + 1)}


def _tfds_hellaswag(r):
    return {"ctx": r["context"], "activity_label": r["activity_label"], "endings": r["endings"], "label": r["label"]}


def _tfds_arc(r):
    return {"question": r["question"], "choices": {"text": r["choices"]["text"], "label": list(r["choices"]["label"])},
            "answerKey": r["answerKey"]}


def _tfds_obqa(r):
    q = r["question"]
    return {"question_stem": q["stem"], "choices": {"text": [q[f"choice_{c}"] for c in "ABCD"], "label": list("ABCD")},
            "answerKey": "ABCD"[int(r["answerKey"])]}


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("boolq", _boolq, tfds_name="bool_q", from_tfds=_tfds_bool_q, paper_norm=True, paper_metric="acc_paper"),
    Task("piqa", _piqa, tfds_name="piqa", from_tfds=dict),
    Task("siqa", _siqa),  # TFDS has no SIQA builder: local files only
    Task("hellaswag", _hellaswag, tfds_name="hellaswag", from_tfds=_tfds_hellaswag),
    Task("winogrande", _winogrande, tfds_name="winogrande", tfds_splits=(("train", "train_xl"),),
         from_tfds=_tfds_winogrande, paper_metric="acc"),
    Task("arc_easy", _arc, eval_split="test", tfds_name="ai2_arc/ARC-Easy", from_tfds=_tfds_arc),
    Task("arc_challenge", _arc, eval_split="test", tfds_name="ai2_arc/ARC-Challenge", from_tfds=_tfds_arc),
    Task("openbookqa", _obqa, eval_split="test", tfds_name="openbookqa", from_tfds=_tfds_obqa,
         paper_norm=True, paper_metric="acc_paper"),
)}
ALIASES = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "obqa": "openbookqa", "social_iqa": "siqa"}


def get_task(name: str) -> Task:
    """The task called `name` (or an alias); ValueError listing the known ones otherwise."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)} (aliases: {', '.join(ALIASES)})")
    return TASKS[key]


def local_paths(task: Task, split: str, data_dir: str | None) -> list[str]:
    if not data_dir:
        return []
    return [os.path.join(data_dir, task.name, f"{split}.jsonl"), os.path.join(data_dir, f"{task.name}_{split}.jsonl")]


def read_jsonl_docs(task: Task, path: str) -> list[Doc]:
    """Docs from a JSONL file in Hugging Face layout; DataError naming file and line on a bad row."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                docs.append(task.to_doc(json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
            except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
                raise DataError(f"{path}:{n}: not a {task.name} row in Hugging Face layout "
                                f"({type(e).__name__}: {e})") from None
    if not docs:
        raise DataError(f"{path}: no rows")
    return docs


def _plain(x):
    """A TFDS value as plain Python: bytes -> str, arrays -> lists, dicts recursively."""
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return [_plain(v) for v in x.tolist()] if x.ndim else _plain(x.item())
    if isinstance(x, np.generic):
        return x.item()
    return x


def read_tfds_docs(task: Task, split: str, tfds_data_dir: str | None) -> list[Doc]:
    """Docs from TFDS through tfds.data_source (never downloads)."""
    tfds_split = dict(task.tfds_splits).get(split, split)
    where = f"TFDS {task.tfds_name}[{tfds_split}] in data_dir={tfds_data_dir or 'the TFDS default'}"
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"{where}: tensorflow_datasets is not installed") from None
    try:
        records = tfds.data_source(task.tfds_name, split=tfds_split, data_dir=tfds_data_dir, download=False)
    except Exception as e:  # not prepared, tfrecord format, bad split: all the same to the user
        raise DataError(f"{where}: {type(e).__name__}: {e}") from None
    return [task.to_doc(task.from_tfds(_plain(records[i]))) for i in range(len(records))]


def load_docs(task: Task, split: str | None = None, data_dir: str | None = None,
              tfds_data_dir: str | None = None) -> list[Doc]:
    """A task's docs: a local JSONL file if one exists, else TFDS; DataError saying where it looked."""
    split = split or task.eval_split
    paths = local_paths(task, split, data_dir)
    for p in paths:
        if os.path.isfile(p):
            return read_jsonl_docs(task, p)
    looked = f"looked for {paths}" if paths else "no --data_dir given for local files"
    if task.tfds_name is None:
        raise DataError(f"task {task.name} ({split}): no local file ({looked}); TFDS has no {task.name} builder")
    try:
        return read_tfds_docs(task, split, tfds_data_dir)
    except DataError as e:
        raise DataError(f"task {task.name} ({split}): no local file ({looked}), and TFDS failed: {e}") from None
