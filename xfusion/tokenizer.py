"""The text tokenizer with the image delimiters BOI/EOI.

Tiny scale: a byte-level BPE trained offline with the `tokenizers` library on the world corpus and
the training captions (`data.tokenizer_vocab_size`), saved as a transformers
`PreTrainedTokenizerFast` directory. Like Llama-3's tokenizer it prepends the BOS token when
encoding, and it has bos/eos/pad plus the special tokens `BOI_TOKEN` / `EOI_TOKEN`.
Paper scale (`data.tokenizer_path` set): the base LLM's own tokenizer. Llama-3 reserves unused
special tokens that already have embedding rows, so BOI/EOI are `<|reserved_special_token_0|>` /
`_1|>` and the embedding matrix keeps its size; other tokenizers get BOI/EOI added (the model
must then resize its embeddings, which `image_token_ids` makes visible as ids >= the old size).

`python -m xfusion.tokenizer --config C --corpus R/world/corpus.txt --captions R/captions/train.jsonl --out R/tokenizer`

The captions are user data (`data.bad_input_policy`, xfusion.data): an undecodable or incomplete
line or an empty caption is left out and named in `<out>.bad_inputs.json` beside the tokenizer
dir (skip), or stops the job naming it (stop).

MMLU scoring needs the log-likelihood of " A" .. " D" after "Answer:", so each letter after a
space must be one token: the byte-level pre-tokenizer splits " A" off as its own word and the
corpus's practice items make the merge "Ġ" + "A" frequent; `check_answer_letters` verifies it.

References: Llama 3 (Dubey et al., 2024) tokenizer special tokens; lm-evaluation-harness MMLU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from xfusion.config import load_run
from xfusion.data import BadInputs, captioned_records, report_path
from xfusion.io import atomic_dir

BOI_TOKEN = "<|begin_of_image|>"
EOI_TOKEN = "<|end_of_image|>"
BOS_TOKEN = "<|begin_of_text|>"  # Llama-3's names, so both scales read alike
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
LLAMA3_IMAGE_TOKENS = ("<|reserved_special_token_0|>", "<|reserved_special_token_1|>")
LLAMA3_PAD_TOKEN = "<|finetune_right_pad_id|>"
ANSWER_LETTERS = (" A", " B", " C", " D")


def train_bpe(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE over `texts` (no normaliser, no prefix space)."""
    specials = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, BOI_TOKEN, EOI_TOKEN]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer=trainer)
    bos_id = bpe.token_to_id(BOS_TOKEN)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, extra_special_tokens=[BOI_TOKEN, EOI_TOKEN])


def adapt_pretrained(path: str) -> PreTrainedTokenizerBase:
    """The base LLM's tokenizer with a pad token and the image delimiters registered."""
    tok = AutoTokenizer.from_pretrained(path)
    vocab = tok.get_vocab()
    if tok.pad_token is None:
        tok.pad_token = LLAMA3_PAD_TOKEN if LLAMA3_PAD_TOKEN in vocab else tok.eos_token
    if not all(t in vocab for t in LLAMA3_IMAGE_TOKENS):
        n_old = len(tok)
        tok.add_special_tokens({"extra_special_tokens": [BOI_TOKEN, EOI_TOKEN]},
                               replace_extra_special_tokens=False)
        print(f"{path}: no reserved special tokens; added {BOI_TOKEN} {EOI_TOKEN} as ids "
              f"{n_old}, {n_old + 1}: resize the base model's embeddings to {len(tok)}")
    return tok


def image_token_ids(tok: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(boi_id, eoi_id): our own tokens when present, else Llama-3's reserved ones."""
    vocab = tok.get_vocab()
    for boi, eoi in ((BOI_TOKEN, EOI_TOKEN), LLAMA3_IMAGE_TOKENS):
        if boi in vocab and eoi in vocab:
            return vocab[boi], vocab[eoi]
    raise ValueError(f"tokenizer {tok.name_or_path!r} has neither {BOI_TOKEN}/{EOI_TOKEN} nor "
                     f"{'/'.join(LLAMA3_IMAGE_TOKENS)}; build it with python -m xfusion.tokenizer")


def check_answer_letters(tok: PreTrainedTokenizerBase) -> None:
    """MMLU scores " A".." D" after "Answer:": each must be a single token there."""
    for letter in ANSWER_LETTERS:
        context = tok("Answer:", add_special_tokens=False)["input_ids"]
        full = tok("Answer:" + letter, add_special_tokens=False)["input_ids"]
        alone = tok(letter, add_special_tokens=False)["input_ids"]
        if len(alone) != 1 or full != context + alone:
            raise ValueError(f"tokenizer {tok.name_or_path!r}: {letter!r} after 'Answer:' is "
                             f"{full[len(context):]} (want one token); add MMLU practice items to "
                             "the corpus or raise data.tokenizer_vocab_size")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A tokenizer directory written by this module (checks the image tokens are there)."""
    tok = AutoTokenizer.from_pretrained(str(path))
    image_token_ids(tok)
    return tok


def build_tokenizer(config: str | Path, corpus: Path, captions: Path,
                    out: Path) -> PreTrainedTokenizerBase:
    """Train (tiny) or adapt (paper) the tokenizer, check the answer letters, save to `out`."""
    cfg = load_run(config)
    bad = BadInputs(cfg.data.bad_input_policy)
    if cfg.data.tokenizer_path:
        tok = adapt_pretrained(cfg.data.tokenizer_path)
    else:
        texts = [line for line in corpus.read_text().splitlines() if line.strip()]
        texts += [row["caption"] for _, row in captioned_records(captions, bad)]
        tok = train_bpe(texts, cfg.data.tokenizer_vocab_size)
    check_answer_letters(tok)
    with atomic_dir(out) as tmp:
        tok.save_pretrained(tmp)
    bad.finish(report_path(out))
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description="Train (tiny) or adapt (paper) the tokenizer.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--corpus", required=True, type=Path, help="R/world/corpus.txt")
    parser.add_argument("--captions", required=True, type=Path, help="R/captions/train.jsonl")
    parser.add_argument("--out", required=True, type=Path, help="R/tokenizer")
    args = parser.parse_args()
    tok = build_tokenizer(args.config, args.corpus, args.captions, args.out)
    print(f"wrote {args.out} (vocab {len(tok)}, image tokens {image_token_ids(tok)})")


if __name__ == "__main__":
    main()
