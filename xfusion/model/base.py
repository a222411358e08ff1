"""The frozen text tower: a Hugging Face LlamaForCausalLM, built tiny or loaded pretrained.

`base_model.json` (written by xfusion.pretrain_lm) names a base LLM: `{"path": HF dir or hub
id, "tokenizer": dir or hub id, "text_weight_hash": sha256 of its weights}`. The hash lets a
checkpoint refuse another base model and lets eval reuse one MMLU score for every variant whose
text weights are frozen.

References: transformers LlamaConfig / LlamaForCausalLM; Llama 3 (Dubey et al. 2024).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from xfusion.config import TinyLlamaConfig


def build_tiny_llama(tiny: TinyLlamaConfig, vocab_size: int, bos_token_id: int,
                     eos_token_id: int, pad_token_id: int) -> LlamaForCausalLM:
    """A randomly initialised Llama of the configured shape (float32, SDPA attention)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=tiny.max_position_embeddings,
        rope_theta=tiny.rope_theta,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=True,  # as Llama-3.2-1B
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(torch.float32)


def load_base_llm(base_model_json: str | Path):
    """(LlamaForCausalLM, tokenizer) named by a base_model.json. A relative path in it is taken
    from the current directory first, then from the json's own directory, and made absolute
    (the model's `name_or_path`, which a model directory saved later records)."""
    from xfusion.tokenizer import load_tokenizer  # the data stage's module; imported on use

    base_model_json = Path(base_model_json)
    ref = json.loads(base_model_json.read_text())
    for key in ("path", "tokenizer", "text_weight_hash"):
        if key not in ref:
            raise KeyError(f"{base_model_json}: missing key {key!r} (see docs/INTERFACES.md)")

    def resolve(p: str) -> str:
        for local in (Path(p), base_model_json.parent / p):
            if local.exists():
                return str(local.resolve())
        return p  # a hub id

    llm = LlamaForCausalLM.from_pretrained(resolve(ref["path"]), attn_implementation="sdpa")
    return llm, load_tokenizer(resolve(ref["tokenizer"]))


def text_weight_hash(llm: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every weight, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(llm.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
