import json
from pathlib import Path

import pytest

from bad_files import assert_stops_naming, jsonl_with, report_items
from xfusion.caption import scene_caption
from xfusion.config import load_run
from xfusion.data.world import sample_scene, write_text_data
from xfusion.io import read_jsonl
from xfusion.tokenizer import (ANSWER_LETTERS, BOI_TOKEN, EOI_TOKEN, LLAMA3_IMAGE_TOKENS,
                               build_tokenizer, image_token_ids, load_tokenizer)


@pytest.fixture
def inputs(tiny_config, tmp_path) -> tuple[Path, Path, Path]:
    """(config, corpus.txt, captions.jsonl) of a small world."""
    import random
    config = tiny_config({"data.n_corpus_facts": 400})
    cfg = load_run(config)
    write_text_data(tmp_path / "world", cfg.data, cfg.seed)
    rng = random.Random(0)
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(
        json.dumps({"id": f"i{i}", "image": "x.png",
                    "caption": scene_caption(f"i{i}", sample_scene(rng, 3))}) + "\n"
        for i in range(50)))
    return config, tmp_path / "world" / "corpus.txt", captions


def test_tiny_tokenizer_has_special_tokens_and_prepends_bos(inputs, tmp_path):
    build_tokenizer(*inputs, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    boi, eoi = image_token_ids(tok)
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, boi, eoi}
    assert None not in ids and len(ids) == 5
    encoded = tok(f"a red circle.{BOI_TOKEN}{EOI_TOKEN}")["input_ids"]
    assert encoded[0] == tok.bos_token_id and encoded[-2:] == [boi, eoi]
    assert tok.decode(encoded, skip_special_tokens=True) == "a red circle."


def test_answer_letter_after_space_is_one_token(inputs, tmp_path):
    build_tokenizer(*inputs, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    context = tok("Answer:", add_special_tokens=False)["input_ids"]
    letter_ids = set()
    for letter in ANSWER_LETTERS:
        full = tok("Answer:" + letter, add_special_tokens=False)["input_ids"]
        assert len(full) == len(context) + 1 and full[:len(context)] == context
        letter_ids.add(full[-1])
    assert len(letter_ids) == 4


def test_training_is_deterministic(inputs, tmp_path):
    build_tokenizer(*inputs, tmp_path / "a")
    build_tokenizer(*inputs, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == \
        (tmp_path / "b" / "tokenizer.json").read_bytes()


def fake_pretrained(path: Path, reserved: bool) -> str:
    """A stand-in for a hub tokenizer, optionally with Llama-3's reserved special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    texts = [f"Q{i}\nA. x\nB. y\nC. z\nD. w\nAnswer: {'ABCD'[i % 4]}" for i in range(200)]
    specials = ["<s>", "</s>"] + (list(LLAMA3_IMAGE_TOKENS) if reserved else [])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)
    return str(path)


def test_llama3_tokenizer_reuses_reserved_tokens_without_growing(tiny_config, tmp_path):
    source = fake_pretrained(tmp_path / "llama3", reserved=True)
    n_before = len(load_tokenizer(source))
    config = tiny_config({"data.tokenizer_path": source})
    tok = build_tokenizer(config, tmp_path / "unused.txt", tmp_path / "unused.jsonl",
                          tmp_path / "tok")
    reloaded = load_tokenizer(tmp_path / "tok")
    vocab = reloaded.get_vocab()
    assert len(reloaded) == len(tok) == n_before
    assert image_token_ids(reloaded) == tuple(vocab[t] for t in LLAMA3_IMAGE_TOKENS)


def test_other_pretrained_tokenizer_gets_new_image_tokens(tiny_config, tmp_path):
    source = fake_pretrained(tmp_path / "other", reserved=False)
    config = tiny_config({"data.tokenizer_path": source})
    build_tokenizer(config, tmp_path / "unused.txt", tmp_path / "unused.jsonl", tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    vocab = tok.get_vocab()
    assert image_token_ids(tok) == (vocab[BOI_TOKEN], vocab[EOI_TOKEN])


@pytest.mark.parametrize("kind", ["empty caption", "undecodable line"])
def test_bad_caption_lines_are_skipped_and_named_or_stop(inputs, tiny_config, tmp_path, kind):
    config, corpus, captions = inputs
    rows = read_jsonl(captions)
    record = {"id": "bad", "image": "x.png", "caption": "" if kind == "empty caption" else "CAFE"}
    captions.write_bytes(jsonl_with(rows, record, kind))
    tok = build_tokenizer(config, corpus, captions, tmp_path / "tok")
    assert report_items(tmp_path / "tok.bad_inputs.json") == {("captions.jsonl", 3, kind)}
    clean = tmp_path / "clean.jsonl"  # the same file without the bad line
    clean.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert build_tokenizer(config, corpus, clean, tmp_path / "clean").get_vocab() == tok.get_vocab()
    stop = tiny_config({"data.n_corpus_facts": 400, "data.bad_input_policy": "stop"}, "stop.yaml")
    assert_stops_naming(lambda: build_tokenizer(stop, corpus, captions, tmp_path / "tok2"),
                        f"{captions}:3")
    assert not (tmp_path / "tok2").exists()
