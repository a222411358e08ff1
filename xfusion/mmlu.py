"""MMLU k-shot scoring in lm-evaluation-harness's format: data, prompt, log-likelihood scorer.

Shared by the tiny base LM's own check (xfusion.pretrain_lm) and the evaluation stage (eval.mmlu),
so the number a pretraining run reports is the number Table 1 shows for that model; the tiny
world's practice items (xfusion.data.world) are written with the same prompt functions.

References:
- Hendrycks et al., "Measuring Massive Multitask Language Understanding", ICLR 2021 (data,
  CSV layout `dev/<subject>_dev.csv`, `test/<subject>_test.csv`: question,A,B,C,D,answer).
- EleutherAI lm-evaluation-harness, task `mmlu` (lm_eval/tasks/mmlu/default): description
  "The following are multiple choice questions (with answers) about {subject}.\\n\\n",
  doc "{question.strip()}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:", target delimiter " ",
  few-shot delimiter "\\n\\n", shots = the first k dev items (`first_n` sampler), choices
  " A".." D" scored by summed log-likelihood (`acc`); `HFLM._encode_pair` (trailing spaces of
  the context move to the continuation; the continuation's tokens are those of
  context+continuation after the context's) and no BOS token (`add_bos_token=False`).

Inputs: the hendrycks CSV layout, or cais/mmlu saved per subject (`<subject>/` holding a
`datasets.save_to_disk` DatasetDict, or `dev-*.parquet` and `test-*.parquet`: columns question,
choices, answer index).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

LETTERS = "ABCD"
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"

# (contexts, continuations) token ids -> summed log p(continuation | context), (N,)
LogLikelihood = Callable[[Sequence[list[int]], Sequence[list[int]]], torch.Tensor]


@dataclass(frozen=True)
class Item:
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"


# --- data ---------------------------------------------------------------------------------------

def _csv_items(path: Path) -> list[Item]:
    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r]
    bad = [i for i, r in enumerate(rows) if len(r) != 6 or r[5].strip() not in LETTERS]
    if bad:
        raise SystemExit(f"{path}: row {bad[0] + 1} is not question,A,B,C,D,answer(A-D)")
    return [Item(r[0], tuple(r[1:5]), r[5].strip()) for r in rows]


def _hf_items(records: Sequence[dict]) -> list[Item]:
    return [Item(r["question"], tuple(r["choices"]), LETTERS[int(r["answer"])]) for r in records]


def _hf_split(subject_dir: Path, split: str) -> list[Item]:
    if (subject_dir / "dataset_dict.json").exists():
        try:
            from datasets import load_from_disk
        except ImportError:
            raise SystemExit(f"{subject_dir}: a datasets.save_to_disk directory needs the "
                             "`datasets` package; or save the splits as parquet") from None
        return _hf_items(list(load_from_disk(str(subject_dir))[split]))
    files = sorted(subject_dir.glob(f"{split}-*.parquet")) or sorted(
        subject_dir.glob(f"{split}/*.parquet"))
    if not files:
        raise SystemExit(f"{subject_dir}: no {split} split (dataset_dict.json or "
                         f"{split}-*.parquet)")
    import pandas as pd
    return _hf_items(pd.concat([pd.read_parquet(f) for f in files]).to_dict("records"))


def load_mmlu(root: str | Path) -> dict[str, tuple[list[Item], list[Item]]]:
    """{subject: (dev items, test items)} from the hendrycks or the HF layout."""
    root = Path(root)
    if (root / "test").is_dir() and (root / "dev").is_dir():
        out = {}
        for test in sorted((root / "test").glob("*_test.csv")):
            subject = test.name[: -len("_test.csv")]
            dev = root / "dev" / f"{subject}_dev.csv"
            if not dev.exists():
                raise SystemExit(f"{dev}: missing (needed for the few-shot examples)")
            out[subject] = (_csv_items(dev), _csv_items(test))
    else:  # cais/mmlu: one directory per subject ("all" and "auxiliary_train" aggregate others)
        out = {d.name: (_hf_split(d, "dev"), _hf_split(d, "test")) for d in sorted(root.iterdir())
               if d.is_dir() and d.name not in ("all", "auxiliary_train")}
    if not out:
        raise SystemExit(f"{root}: no MMLU subjects (expected dev/ and test/ CSVs or "
                         "one directory per subject)")
    return out


# --- prompt -------------------------------------------------------------------------------------

def description(subject: str) -> str:
    """The harness's description of a subject (underscores read as spaces), blank line included."""
    return ("The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}.\n\n")


def format_item(item: Item) -> str:
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    return f"{item.question.strip()}{options}\nAnswer:"


def format_example(item: Item) -> str:
    """A solved item as a few-shot example: the doc, then its gold continuation " X"."""
    return format_item(item) + TARGET_DELIMITER + item.answer


def build_prompt(subject: str, shots: Sequence[Item], item: Item) -> str:
    """The harness's k-shot context for `item` (the continuation " X" excluded)."""
    examples = "".join(format_example(s) + FEWSHOT_DELIMITER for s in shots)
    return description(subject) + examples + format_item(item)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness `_encode_pair`: trailing spaces of the context join the
    continuation; the continuation's ids are whole[len(context ids):]; no special tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


# --- scoring ------------------------------------------------------------------------------------

def causal_lm_loglik(logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     max_length: int, batch_size: int = 8,
                     dev: torch.device | None = None) -> LogLikelihood:
    """A LogLikelihood over a causal LM's `logits_fn(input_ids, attention_mask) -> (B, L, V)`.

    The input is (context + continuation)[:-1], left-truncated to `max_length` as the harness
    does; requests with the same input (the four one-token answers of a question) share one
    forward pass."""
    dev = dev or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @torch.no_grad()
    def loglik(contexts: Sequence[list[int]], continuations: Sequence[list[int]]) -> torch.Tensor:
        inputs = [tuple((c + k)[-(max_length + 1):][:-1]) for c, k in zip(contexts, continuations)]
        unique = sorted(set(inputs), key=len, reverse=True)  # long first: similar lengths batch
        where = {seq: i for i, seq in enumerate(unique)}
        rows: dict[int, torch.Tensor] = {}  # unique input -> log-probs at its last positions
        tail = max(len(k) for k in continuations)
        for s in range(0, len(unique), batch_size):
            chunk = unique[s:s + batch_size]
            width = len(chunk[0])
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, seq in enumerate(chunk):  # right padding: causal positions are unaffected
                ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
            logits = logits_fn(ids.to(dev), mask.to(dev)).float()
            for r, seq in enumerate(chunk):
                lo = max(0, len(seq) - tail)
                rows[s + r] = logits[r, lo:len(seq)].log_softmax(-1).cpu()  # (<= tail, V)
        out = []
        for seq, cont in zip(inputs, continuations):
            lp = rows[where[seq]][-len(cont):]  # positions predicting the continuation
            out.append(lp.gather(1, torch.tensor(cont)[:, None]).sum())
        return torch.stack(out)
    return loglik


def evaluate_mmlu(data: dict[str, tuple[list[Item], list[Item]]], tokenizer,
                  loglik: LogLikelihood, shots: int = 5) -> dict:
    """Accuracy overall (mean over questions), per subject and macro (mean over subjects)."""
    per_subject, correct_all, n_all = {}, 0, 0
    for subject, (dev, test) in tqdm(data.items(), desc="MMLU subjects"):
        if len(dev) < shots:
            raise SystemExit(f"MMLU {subject}: {len(dev)} dev items, fewer than {shots} shots")
        contexts, continuations = [], []
        for item in test:
            prompt = build_prompt(subject, dev[:shots], item)
            for letter in LETTERS:
                ctx, cont = encode_pair(tokenizer, prompt, TARGET_DELIMITER + letter)
                contexts.append(ctx)
                continuations.append(cont)
        scores = loglik(contexts, continuations).view(len(test), 4)
        predicted = scores.argmax(1).tolist()
        correct = sum(LETTERS[p] == item.answer for p, item in zip(predicted, test))
        per_subject[subject] = correct / len(test)
        correct_all, n_all = correct_all + correct, n_all + len(test)
    return {"accuracy": correct_all / n_all, "n": n_all, "per_subject": per_subject,
            "macro": sum(per_subject.values()) / len(per_subject)}
