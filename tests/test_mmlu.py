"""xfusion.mmlu + eval.mmlu: lm-evaluation-harness's 5-shot prompt, log-likelihood scoring, both
data layouts."""

from __future__ import annotations

import csv
import json

import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eval import mmlu
from xfusion import mmlu as scorer


class CharTokenizer:
    """One token per character: enough to check prompt handling without a vocabulary."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    @staticmethod
    def decode(ids):
        return "".join(map(chr, ids))


def make_data(n_test: int = 12) -> dict:
    dev = [scorer.Item(f"dev q{i}?", ("w", "x", "y", "z"), "ABCD"[i % 4]) for i in range(5)]
    test = [scorer.Item(f"test q{i}?", ("w", "x", "y", "z"), "ABCD"[(i * 7) % 4])
            for i in range(n_test)]
    return {"toy_subject": (dev, test)}


def oracle_loglik(data, letter_of=None):
    """A LogLikelihood that prefers the gold letter (or `letter_of(question)`)."""
    gold = {it.question: it.answer for _, test in data.values() for it in test}
    tok = CharTokenizer()

    def loglik(contexts, continuations):
        out = []
        for c, k in zip(contexts, continuations):
            question = tok.decode(c).rsplit("\n\n", 1)[-1].split("\n", 1)[0]
            want = letter_of(question) if letter_of else gold[question]
            out.append(0.0 if tok.decode(k).strip() == want else -5.0)
        return torch.tensor(out)
    return loglik


def test_gold_answerer_scores_100():
    data = make_data()
    result = scorer.evaluate_mmlu(data, CharTokenizer(), oracle_loglik(data))
    assert result["accuracy"] == 1.0 and result["per_subject"]["toy_subject"] == 1.0


def test_constant_answerer_scores_that_letters_share():
    data = make_data()
    share = sum(it.answer == "C" for it in data["toy_subject"][1]) / 12
    result = scorer.evaluate_mmlu(data, CharTokenizer(), oracle_loglik(data, lambda q: "C"))
    assert result["accuracy"] == pytest.approx(share) and 0 < share < 1


def test_prompt_matches_the_harness_format_exactly():
    shot = scorer.Item("What is 1 + 1?", ("1", "2", "3", "4"), "B")
    item = scorer.Item("  Which colour is the sky? ", ("red", "blue", "green", "pink"), "B")
    expected = ("The following are multiple choice questions (with answers) about high school "
                "physics.\n\n"
                "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                "Which colour is the sky?\nA. red\nB. blue\nC. green\nD. pink\nAnswer:")
    assert scorer.build_prompt("high_school_physics", [shot], item) == expected


def test_encode_pair_moves_trailing_space_to_the_continuation():
    ctx, cont = scorer.encode_pair(CharTokenizer(), "Answer: ", "A")
    assert CharTokenizer.decode(ctx) == "Answer:" and CharTokenizer.decode(cont) == " A"


def test_causal_loglik_equals_summed_log_softmax_and_shares_contexts():
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)).eval()
    calls = []

    def logits_fn(ids, mask):
        calls.append(ids.shape[0])
        return lm(input_ids=ids, attention_mask=mask).logits
    contexts = [[1, 5, 7, 9], [1, 5, 7, 9], [3, 4], [1, 5, 7, 9]]
    continuations = [[11], [12], [13, 14], [15, 16, 17]]
    got = scorer.causal_lm_loglik(logits_fn, max_length=64, batch_size=2,
                                dev=torch.device("cpu"))(contexts, continuations)
    for c, k, g in zip(contexts, continuations, got):
        with torch.no_grad():
            lp = lm(input_ids=torch.tensor([c + k])).logits[0].log_softmax(-1)
        want = sum(lp[len(c) - 1 + i, tok] for i, tok in enumerate(k))
        assert g.item() == pytest.approx(want.item(), abs=1e-4)
    assert sum(calls) == 3  # the two one-token answers of the same context share a forward


def write_csv(path, items):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([[it.question, *it.choices, it.answer] for it in items])


def test_hendrycks_csv_and_hf_parquet_layouts_read_alike(tmp_path):
    dev, test = make_data(4)["toy_subject"]
    write_csv(tmp_path / "csv" / "dev" / "toy_subject_dev.csv", dev)
    write_csv(tmp_path / "csv" / "test" / "toy_subject_test.csv", test)
    sub = tmp_path / "hf" / "toy_subject"
    sub.mkdir(parents=True)
    for split, items in (("dev", dev), ("test", test)):
        pd.DataFrame({"question": [i.question for i in items], "subject": "toy_subject",
                      "choices": [list(i.choices) for i in items],
                      "answer": ["ABCD".index(i.answer) for i in items]}).to_parquet(
            sub / f"{split}-00000-of-00001.parquet")
    assert scorer.load_mmlu(tmp_path / "csv") == scorer.load_mmlu(tmp_path / "hf") \
        == {"toy_subject": (dev, test)}


def test_cli_scores_a_base_lm_on_the_world_benchmark(tmp_path, monkeypatch):
    data = make_data()
    dev, test = data["toy_subject"]
    write_csv(tmp_path / "mmlu" / "dev" / "toy_subject_dev.csv", dev)
    write_csv(tmp_path / "mmlu" / "test" / "toy_subject_test.csv", test)
    (tmp_path / "base_model.json").write_text(json.dumps({"path": "x", "tokenizer": "x",
                                                          "text_weight_hash": "abc"}))
    monkeypatch.setattr(mmlu, "base_lm_scorer",
                        lambda path, bs: (CharTokenizer(), oracle_loglik(data)))
    out = tmp_path / "mmlu.json"
    mmlu.main(["--config", "config/tiny.yaml", "--base-lm", str(tmp_path / "base_model.json"),
               "--data", str(tmp_path / "mmlu"), "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["metric"] == "mmlu" and record["value"] == 1.0 and record["n"] == 12
    assert record["details"]["text_weight_hash"] == "abc"
    assert record["details"]["per_subject"] == {"toy_subject": 1.0}


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory):
    """A tiny base LLM + tokenizer on disk, and dual_tower / single_tower model dirs on it."""
    from xfusion.config import TinyLlamaConfig, load_yaml, resolve_run
    from xfusion.model import XFusionModel
    from xfusion.model.base import build_tiny_llama, load_base_llm, text_weight_hash
    from xfusion.tokenizer import train_bpe
    root = tmp_path_factory.mktemp("mmlu_runs")
    tok = train_bpe(["Answer: A B C D", "What is one? one two three"] * 4, vocab_size=300)
    tok.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    tiny = TinyLlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64)
    llm = build_tiny_llama(tiny, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    llm.save_pretrained(root / "hf")
    base_json = root / "base_model.json"
    base_json.write_text(json.dumps({"path": str(root / "hf"),
                                     "tokenizer": str(root / "tokenizer"),
                                     "text_weight_hash": text_weight_hash(llm)}))
    raw = load_yaml("config/tiny.yaml")
    for run in ("dual_tower", "single_tower"):
        base, tokenizer = load_base_llm(base_json)
        XFusionModel.from_base(resolve_run(raw, run), base, tokenizer,
                               base_ref=json.loads(base_json.read_text())).save(root / run)
    data = make_data(4)
    write_csv(root / "mmlu" / "dev" / "toy_subject_dev.csv", data["toy_subject"][0])
    write_csv(root / "mmlu" / "test" / "toy_subject_test.csv", data["toy_subject"][1])
    return root


def test_frozen_text_run_reuses_the_base_score_and_others_recompute(saved_runs):
    root = saved_runs
    base = mmlu.main(["--config", "config/tiny.yaml", "--base-lm", str(root / "base_model.json"),
                      "--data", str(root / "mmlu"), "--out", str(root / "base.json")])
    common = ["--config", "config/tiny.yaml", "--data", str(root / "mmlu"), "--base-result",
              str(root / "base.json")]
    frozen = mmlu.main(common + ["--run", "dual_tower", "--model", str(root / "dual_tower"),
                                 "--out", str(root / "dual.json")])
    assert frozen["details"]["reused_from"] == str(root / "base.json")
    assert frozen["value"] == base["value"] and frozen["run"] == "dual_tower"
    trained = mmlu.main(common + ["--run", "single_tower", "--model", str(root / "single_tower"),
                                  "--out", str(root / "single.json")])
    assert "reused_from" not in trained["details"]
    # untrained single_tower still has the base weights: recomputed, the same accuracy
    assert trained["value"] == base["value"]
