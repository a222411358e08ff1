"""XFusionModel: a Hugging Face LlamaForCausalLM whose decoder layers are wrapped by one of the
block variants of towers.py, plus the image I/O, the losses, and checkpoints.

A forward pass: embed text tokens with the LLM's table and image latents with `ImageIO`, run the
wrapped layers over the mixed sequence (mask.py), then read text logits through the LLM's final
norm + lm_head and velocities through the vision side's norm + unpatchify.

References: X-Fusion Sec. 4 (training objective lambda_AR L_AR + lambda_DM L_DM) and Sec. 5;
LlamaFusion Sec. 5.1 (single tower with a text/image learning-rate ratio).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaForCausalLM
from transformers.masking_utils import create_causal_mask

from xfusion.config import RECIPE_FILE, VARIANTS, RunConfig, preserves_text, recipe_record
from xfusion.config import run_from_json
from xfusion.io import atomic_dir
from xfusion.model.base import load_base_llm, text_weight_hash
from xfusion.model.dit import DiTTimeEmbedding, dit_shape
from xfusion.model.image_io import ImageIO
from xfusion.model.mask import attention_mask, position_ids
from xfusion.model.repa import RepaHead
from xfusion.model.sequence import IGNORE, MultimodalBatch, Sample, SpecialIds, build_batch
from xfusion.model.towers import BLOCKS, IMG, TXT, Context, KVCache, Route

T_MIN = 0.05  # JiT's clip of t in v = (x_t - x0) / t (model.prediction: sample)


class LossOutput(NamedTuple):
    loss: torch.Tensor
    ar_loss: torch.Tensor
    dm_loss: torch.Tensor
    repa_loss: torch.Tensor


class CheckpointError(ValueError):
    """A model directory does not fit the requested variant or base model."""


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, on the CPU: what a model dir and a resume checkpoint store
    (frozen ones come from the base model; single_tower's include the full Llama weights)."""
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters()
            if p.requires_grad}


class XFusionModel(nn.Module):
    def __init__(self, cfg: RunConfig, llm: LlamaForCausalLM, ids: SpecialIds, base_ref: dict):
        super().__init__()
        self.cfg, self.ids, self.base_ref = cfg, ids, dict(base_ref)
        if llm.config._attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation {llm.config._attn_implementation!r}: the "
                             "mixed causal/bidirectional mask needs 'sdpa' or 'eager'")
        vocab = llm.get_input_embeddings().num_embeddings
        if max(ids.boi, ids.eoi) >= vocab:
            raise ValueError(f"BOI/EOI ids {ids.boi}/{ids.eoi} exceed the LLM's {vocab} embedding "
                             "rows: resize the base model's embeddings to the tokenizer")
        block = BLOCKS[cfg.model.architecture]
        self.llm = llm
        # frozen text weights: requires_grad=False only
        llm.requires_grad_(VARIANTS[cfg.model.architecture].trains_text)
        # Each block wraps one Llama layer; vision copies are deepcopies of it (towers.vision_copy).
        self.blocks = nn.ModuleList(block(layer, i, cfg.model)
                                    for i, layer in enumerate(llm.model.layers))
        boi_eoi = llm.get_input_embeddings().weight[[ids.boi, ids.eoi]]  # (2, D)
        self.image_io = ImageIO(llm.config.hidden_size, cfg.model.codec.latent_channels,
                                cfg.model.patch_size, boi_eoi, llm.model.norm,
                                cfg.model.image_pos_embed)
        self.repa = (RepaHead(cfg.model.repa, llm.config.hidden_size, len(self.blocks))
                     if cfg.model.repa.enabled else None)
        # x_fuse_dit: the DiT's timestep conditioning of its vision blocks (xfusion/model/dit.py)
        self.vision_time = (DiTTimeEmbedding(dit_shape(cfg.model.dit))
                            if VARIANTS[cfg.model.architecture].dit else None)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_base(cls, cfg: RunConfig, base_llm: LlamaForCausalLM, tokenizer,
                  base_ref: dict | None = None) -> "XFusionModel":
        """Wrap `base_llm` as `cfg.model.architecture`. `tokenizer` gives the special ids (a
        SpecialIds works too); `base_ref` is the base_model.json content (else derived)."""
        ids = (tokenizer if isinstance(tokenizer, SpecialIds)
               else SpecialIds.from_tokenizer(tokenizer))
        if base_ref is None:
            base_ref = {"path": base_llm.config._name_or_path,
                        "tokenizer": getattr(tokenizer, "name_or_path", None),
                        "text_weight_hash": text_weight_hash(base_llm)}
        model = cls(cfg, base_llm, ids, base_ref)
        model.tokenizer = None if isinstance(tokenizer, SpecialIds) else tokenizer  # for sampling
        return model

    @property
    def architecture(self) -> str:
        return self.cfg.model.architecture

    @property
    def preserves_text(self) -> bool:
        """Text-only outputs equal the base LLM's at any point of training (MMLU can be reused)."""
        return preserves_text(self.cfg.model)

    def param_groups(self, lr: float) -> list[dict]:
        """Trainable parameters only: new image modules at lr; single_tower's pretrained Llama
        weights at lr * training.lr_text_ratio (LlamaFusion Sec. 5.1: 0, 0.1, 1)."""
        text = [p for p in self.llm.parameters() if p.requires_grad]
        image = [p for n, p in self.named_parameters()
                 if p.requires_grad and not n.startswith("llm.")]
        groups = [{"name": "image", "params": image, "lr": lr}]
        if text:
            ratio = self.cfg.training.lr_text_ratio
            groups.append({"name": "text", "params": text, "lr": lr * ratio})
        return groups

    def build_batch(self, samples: list[Sample], generator: torch.Generator | None = None,
                    noise: torch.Tensor | None = None):
        return build_batch(samples, self.ids, self.cfg.model.patch_size, generator, noise,
                           self.cfg.training.i2t_denoise_loss).to(self.device)

    @property
    def device(self) -> torch.device:
        return self.image_io.unpatch.weight.device

    # -- forward -------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_mask: torch.Tensor | None = None,
              image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) ids -> (B, L, D); image slots take `image_tokens` (B, P, D), BOI/EOI their
        learned embeddings. Text-only input reads the LLM's table and nothing else."""
        e = self.llm.get_input_embeddings()(input_ids)  # (B, L, D)
        if image_mask is None:
            return e
        for j, token in enumerate((self.ids.boi, self.ids.eoi)):
            learned = self.image_io.boi_eoi[j].to(e.dtype)  # (D,)
            e = torch.where((input_ids == token)[..., None], learned, e)
        if image_tokens is not None:
            B, L, D = e.shape
            flat = image_mask.reshape(-1).nonzero().squeeze(1)
            e = e.reshape(B * L, D).index_copy(0, flat, image_tokens.reshape(-1, D).to(e.dtype))
            e = e.view(B, L, D)
        return e

    def embed_sources(self, embeds: torch.Tensor, source_mask: torch.Tensor,
                      source_latents: torch.Tensor) -> torch.Tensor:
        """`embeds` (B, L, D) with the slots of `source_mask` (B, L), P per row that has any,
        holding the tokens of those rows' clean `source_latents` (B, C, h, w) at t = 0."""
        rows = source_mask.any(1)
        latents = source_latents[rows]
        tokens = self.image_io.encode(latents, latents.new_zeros(len(latents)))  # (n, P, D)
        return embeds.masked_scatter(source_mask[..., None], tokens.to(embeds.dtype))

    def _context(self, embeds, image_mask, positions, mask, cache=None, t=None) -> Context:
        B, L, _ = embeds.shape
        cos, sin = self.llm.model.rotary_emb(embeds, positions)  # (B or 1, L, hd)
        hd = cos.shape[-1]
        # Routes from the layout alone (a CPU layout may drive a model on the meta device).
        routes = {TXT: Route.select(~image_mask), IMG: Route.select(image_mask),
                  "all": Route.select(torch.ones_like(image_mask))}
        routes = {k: r.to(embeds.device) for k, r in routes.items()}
        temb = (self.vision_time(t.to(embeds.device))
                if self.vision_time is not None and t is not None else None)  # (B, d_v)
        return Context(B, L, routes, cos.expand(B, L, hd).reshape(B * L, hd),
                       sin.expand(B, L, hd).reshape(B * L, hd), mask, cache, temb=temb)

    def _layers(self, h: torch.Tensor, ctx: Context, capture=()):
        """Every block; returns the last hidden states and {layer (1-based): (B, L, D)}."""
        captured = {}
        recompute = self.cfg.training.activation_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks, start=1):
            # Non-reentrant checkpointing: the reentrant one drops gradients when a block's
            # input needs none and its weights are frozen, cutting the vision tower off.
            h = (torch.utils.checkpoint.checkpoint(block, h, ctx, use_reentrant=False)
                 if recompute else block(h, ctx))
            if i in capture:
                captured[i] = h
        return h, captured

    def forward_chunk(self, embeds: torch.Tensor, image_mask: torch.Tensor, span_ids: torch.Tensor,
                      valid: torch.Tensor, cache: KVCache | None = None, capture=(),
                      t: torch.Tensor | None = None):
        """Hidden states (B, L, D) of a chunk of tokens following those in `cache` (if any).
        `t` (B,): each row's image time, read by x_fuse_dit's timestep modulation only."""
        if cache is not None and cache.length:
            span_ids = torch.cat([cache.span_ids, span_ids], dim=1)
            valid = torch.cat([cache.valid, valid], dim=1)
        L = embeds.shape[1]
        mask = attention_mask(span_ids, valid, q_start=span_ids.shape[1] - L)  # (B, 1, L, L_all)
        if self.llm.config._attn_implementation == "eager":  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=embeds.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(embeds.dtype).min)
        positions = position_ids(valid)[:, -L:]
        ctx = self._context(embeds, image_mask, positions, mask, cache, t)
        out = self._layers(embeds, ctx, capture)
        if cache is not None and not cache.frozen:
            cache.span_ids, cache.valid = span_ids, valid
        return out

    def _forward_batch(self, batch: MultimodalBatch, capture=()):
        tokens = self.image_io.encode(batch.noisy_latents, batch.t)  # (B, P, D)
        embeds = self.embed(batch.input_ids, batch.target_mask, tokens)
        if batch.source_mask is not None:  # I2I: the clean source images' tokens (t = 0)
            embeds = self.embed_sources(embeds, batch.source_mask, batch.source_latents)
        return self.forward_chunk(embeds, batch.image_mask, batch.span_ids, batch.valid,
                                  capture=capture, t=batch.t)

    def text_head(self, h: torch.Tensor) -> torch.Tensor:
        """Text side of the output: the LLM's final norm + lm_head, (..., D) -> (..., V)."""
        return self.llm.lm_head(self.llm.model.norm(h))

    def _unused_text_head(self, h: torch.Tensor) -> torch.Tensor:
        """0 that still runs the text head: a micro-batch without I2T captions must give every
        trainable parameter a gradient (zeros), or ZeRO ranks with different task mixes reduce
        gradient buckets of different sizes (single_tower's lm_head and final norm; gloo aborts
        with "Received data size doesn't match expected size")."""
        return 0.0 * self.text_head(h[:1, :1]).float().sum()

    def text_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """(B, L) -> (B, L, V) for text-only input (MMLU). It issues the same calls as
        LlamaForCausalLM.forward (the same mask from create_causal_mask, positions 0..L-1, the
        same SDPA call), so a variant that preserves text gives the base logits bitwise."""
        embeds = self.embed(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        mask = create_causal_mask(config=self.llm.config, inputs_embeds=embeds,
                                  attention_mask=attention_mask, past_key_values=None,
                                  position_ids=positions)
        no_image = torch.zeros_like(input_ids, dtype=torch.bool)
        h, _ = self._layers(embeds, self._context(embeds, no_image, positions, mask))
        return self.text_head(h)

    def image_hidden_states(self, batch: MultimodalBatch, layers) -> dict[int, torch.Tensor]:
        """{layer l (1-based): (B, P, D)} hidden states of the image tokens after layer l."""
        bad = [l for l in layers if not 1 <= l <= len(self.blocks)]
        if bad:
            raise ValueError(f"layers {bad}: the model has layers 1..{len(self.blocks)}")
        _, captured = self._forward_batch(batch, capture=tuple(layers))
        B = batch.input_ids.shape[0]
        return {l: captured[l][batch.target_mask].view(B, -1, captured[l].shape[-1])
                for l in layers}

    def velocity(self, h_image: torch.Tensor, latent_hw: tuple[int, int], x_t: torch.Tensor,
                 t: torch.Tensor) -> torch.Tensor:
        """(B, P, D) last hidden states of image tokens at noisy latents `x_t` (B, C, h, w) and
        times `t` (B,) -> (B, C, h, w) velocity.

        `model.prediction` says what the output layer predicts. "velocity" (SD3, the paper): the
        output is v. "sample" (JiT, Li & He 2025): the output is the clean x0 and
        v = (x_t - x0) / t. A token wider than the model (a 2x2 patch of the tiny pixel codec's
        48 channels is 192 values, the tiny Llama 128 wide) cannot carry the noise that v holds,
        so v-prediction leaves per-pixel noise in every sample; clean images lie on a
        low-dimensional manifold that such a token can carry. t is clipped at `T_MIN` there, as
        in JiT, so that the division stays bounded near clean images."""
        out = self.image_io.decode(h_image, *latent_hw)
        if self.cfg.model.prediction == "velocity":
            return out
        t = t.clamp(min=T_MIN).view(-1, *([1] * (out.dim() - 1))).to(out.dtype)
        return (x_t.to(out.dtype) - out) / t

    def compute_loss(self, batch: MultimodalBatch) -> LossOutput:
        """lambda_AR * CE(I2T caption tokens) + lambda_DM * MSE(velocity of the batch's
        denoising images: T2I, and noisy I2T with training.i2t_denoise_loss)
        [+ repa.weight * (1 - cos)]; each term is a mean over its own tokens/samples."""
        t = self.cfg.training
        repa_layer = (self.repa.layer,) if self.repa is not None else ()
        h, captured = self._forward_batch(batch, capture=repa_layer)
        B = h.shape[0]
        zero = h.new_zeros(())  # absent terms (the DM term always keeps the graph connected)
        # Autoregressive loss on I2T caption tokens (text positions only reach the LM head).
        has_target = batch.text_targets != IGNORE  # (B, L)
        ar = (F.cross_entropy(self.text_head(h[has_target]).float(), batch.text_targets[has_target])
              if has_target.any() else self._unused_text_head(h))
        # Flow-matching loss on the images dm_weight marks (T2I, I2I targets; noisy I2T when
        # switched on); an I2I source image is context only.
        target = batch.target_mask
        v = self.velocity(h[target].view(B, -1, h.shape[-1]),
                          tuple(batch.noisy_latents.shape[-2:]), batch.noisy_latents, batch.t)
        mse = (v.float() - batch.velocity_target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
        dm = (batch.dm_weight * mse).sum() / batch.dm_weight.sum().clamp(min=1.0)
        repa = zero
        if self.repa is not None:
            if batch.target_feats is None:
                raise ValueError("model.repa.enabled but the batch has no target_feats")
            hidden = captured[self.repa.layer][target].view(B, -1, h.shape[-1])
            repa = self.repa(hidden, batch.target_feats)
        loss = t.lambda_ar * ar + t.lambda_dm * dm
        if self.repa is not None:
            loss = loss + self.cfg.model.repa.weight * repa
        return LossOutput(loss, ar.detach(), dm.detach(), repa.detach())

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> None:
        """config.json + recipe.json (the train recipe hash) + trainable.safetensors +
        base_model.json, written atomically."""
        with atomic_dir(out_dir) as tmp:
            (tmp / "config.json").write_text(self.cfg.to_json() + "\n")
            (tmp / RECIPE_FILE).write_text(json.dumps(recipe_record(self.cfg), indent=2) + "\n")
            save_file(trainable_state(self), str(tmp / "trainable.safetensors"),
                      metadata={"architecture": self.architecture})
            (tmp / "base_model.json").write_text(json.dumps(self.base_ref, indent=2) + "\n")

    @classmethod
    def load(cls, model_dir: str | Path, base_llm: LlamaForCausalLM | None = None,
             tokenizer=None, architecture: str | None = None) -> "XFusionModel":
        """A saved model on its base LLM (loaded from base_model.json unless given). Refuses a
        directory of another variant than `architecture`, and a base LLM of another hash."""
        model_dir = Path(model_dir)
        cfg = run_from_json((model_dir / "config.json").read_text())
        if architecture is not None and cfg.model.architecture != architecture:
            raise CheckpointError(f"{model_dir} holds a {cfg.model.architecture} model, "
                                  f"not {architecture}")
        ref = json.loads((model_dir / "base_model.json").read_text())
        if base_llm is None:
            base_llm, tokenizer = load_base_llm(model_dir / "base_model.json")
        elif tokenizer is None:
            from xfusion.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(ref["tokenizer"])
        found = text_weight_hash(base_llm)
        if found != ref["text_weight_hash"]:
            raise CheckpointError(
                f"{model_dir} was trained on base model {ref['path']} (text weights "
                f"{ref['text_weight_hash'][:12]}…), but the given base model hashes to "
                f"{found[:12]}…: load the base model named in {model_dir / 'base_model.json'}")
        model = cls.from_base(cfg, base_llm, tokenizer, base_ref=ref)
        from xfusion.checkpoint import CheckpointMismatch, load_trainable_  # imports this module

        try:
            load_trainable_(model, load_file(str(model_dir / "trainable.safetensors")))
        except CheckpointMismatch as err:
            raise CheckpointError(f"{model_dir}/trainable.safetensors does not fit a "
                                  f"{cfg.model.architecture} model: {err}") from None
        return model
