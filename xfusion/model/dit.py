"""The vision tower of x_fuse_dit: the image stream of a pretrained MMDiT (X-Fusion Sec. 7.2).

X-Fusion Sec. 7.2 ("X-Fusion (Pretrained DiT)", Fig. 7): since each tower processes the whole
sequence on its own, the vision tower need not copy the text layer; the paper initialises it
from a pretrained text-to-image DiT, with linear projections in the X-Fuse layer to align the
widths. We take diffusers' SD3Transformer2DModel (MMDiT): its image stream already has its own
weights and a joint attention over [image; text] tokens, which is what a vision tower does here.

Design (docs/INTERFACES.md, "x_fuse_dit"):
- Widths. The residual stream stays the LLM's width d_t for every token. A text layer that hosts
  vision blocks projects its image tokens down to the DiT width d_v (`down`), runs the blocks
  there, and adds the projected-up change (`up`): h_img + up(DiT(down h_img) - down h_img).
  `down` and `up` start as Q^T and Q of one fixed orthonormal Q (d_t, d_v), the same at every
  layer, so with d_v <= d_t down(up(x)) = x and the DiT's own residual chain runs unchanged on
  the image tokens at init. Text tokens reach the DiT's attention through `text_kv` (d_t -> d_v,
  also Q^T at init) and the context stream's key/value projections (add_k_proj, add_v_proj).
- Layer map. Vision block j sits at text layer ceil((j+1) n_t / n_v) - 1: spread evenly, the last
  one at the last layer; with n_v < n_t image tokens pass unchanged through layers without one,
  with n_v > n_t a layer runs several in a row (`layer_map`).
- Timestep modulation is kept: the DiT's own time_text_embed (sin features of t * 1000 + MLP)
  gives each row's conditioning from its image's t, with the pooled-text input at 0 (the
  DiT's dropped-caption input: text reaches it through attention instead), and each block's
  adaLN-Zero (shift, scale, gate) acts on the image tokens as in the DiT. Text tokens' keys and
  values take the context stream's LayerNorm without modulation: t-free, so a prompt's cached
  keys/values serve every sampling step.
- X-Fuse on image queries: both towers answer them (alpha * vision + beta * text, alpha = 1,
  beta = 0 at init); text queries are answered by the frozen text layer alone, so text-only
  input gives the base LLM's logits bitwise (VARIANTS: preserves_text).

References: Esser et al. 2024 (SD3, MMDiT); diffusers transformer_sd3.py (SD3Transformer2DModel),
attention.py (JointTransformerBlock), attention_processor.py (JointAttnProcessor2_0),
normalization.py (AdaLayerNormZero); Peebles & Xie 2023 (DiT, adaLN-Zero).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import (CombinedTimestepTextProjEmbeddings, TimestepEmbedding,
                                         Timesteps)
from torch import nn

from xfusion.config import DiTConfig, TinyDiTConfig
from xfusion.model.flow import to_timestep

LN_EPS = 1e-6  # the MMDiT's LayerNorms (AdaLayerNormZero, norm2, the context norm)
PROJECTION_SEED = 0  # the fixed orthonormal Q of the width projections


def layer_map(n_text: int, n_vision: int) -> list[list[int]]:
    """Text layer i -> the vision blocks it runs: block j at ceil((j+1) * n_text / n_vision) - 1."""
    hosts: list[list[int]] = [[] for _ in range(n_text)]
    for j in range(n_vision):
        hosts[-(-(j + 1) * n_text // n_vision) - 1].append(j)
    return hosts


def dit_shape(cfg: DiTConfig) -> TinyDiTConfig:
    """The vision tower's shape: `model.dit.tiny`, or the pretrained checkpoint's config.json."""
    if cfg.source == "tiny":
        return cfg.tiny
    from diffusers import SD3Transformer2DModel

    c = SD3Transformer2DModel.load_config(cfg.path, subfolder=cfg.subfolder)
    return TinyDiTConfig(c["num_layers"], c["num_attention_heads"], c["attention_head_dim"],
                         c["joint_attention_dim"], c["pooled_projection_dim"])


@functools.lru_cache(maxsize=4)
def orthonormal(d_text: int, d_vision: int) -> torch.Tensor:
    """(d_text, d_vision) Q with orthonormal columns (or rows, when d_vision > d_text), fixed;
    on the CPU whatever the default device (a model built on the meta device copies it)."""
    g = torch.Generator().manual_seed(PROJECTION_SEED)
    big, small = max(d_text, d_vision), min(d_text, d_vision)
    q, _ = torch.linalg.qr(torch.randn(big, small, generator=g, device="cpu"))  # (big, small)
    return q if d_text >= d_vision else q.T


class DiTTimeEmbedding(nn.Module):
    """The DiT's conditioning per row, (B,) t in [0, 1] -> (B, d_v): its time_text_embed with the
    pooled text at 0, i.e. the timestep MLP plus the pooled branch's constant output at 0
    (`null_text`, a learnable vector: a weight that only ever sees 0 would get no gradient)."""

    def __init__(self, shape: TinyDiTConfig):
        super().__init__()
        width = shape.num_attention_heads * shape.attention_head_dim
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=width)
        self.null_text = nn.Parameter(torch.zeros(width))

    @torch.no_grad()
    def load_from(self, embed: CombinedTimestepTextProjEmbeddings) -> None:
        self.timestep_embedder.load_state_dict(embed.timestep_embedder.state_dict())
        pooled = embed.text_embedder.linear_1.weight.new_zeros(1, embed.text_embedder.linear_1
                                                               .in_features)
        self.null_text.copy_(embed.text_embedder(pooled)[0])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.null_text.dtype
        return self.timestep_embedder(self.time_proj(to_timestep(t.float())).to(dtype)) \
            + self.null_text


class VisionBlock(nn.Module):
    """The image stream of one JointTransformerBlock (the context stream's own queries, output
    projection and MLP are not kept: text tokens are the LLM's)."""

    def __init__(self, shape: TinyDiTConfig):
        super().__init__()
        d = shape.num_attention_heads * shape.attention_head_dim
        self.heads, self.head_dim = shape.num_attention_heads, shape.attention_head_dim
        self.ada = nn.Linear(d, 6 * d)  # norm1.linear: shift, scale, gate (attn); same (mlp)
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.add_k_proj, self.add_v_proj = nn.Linear(d, d), nn.Linear(d, d)  # text tokens' K/V
        self.to_out = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"),
                                nn.Linear(4 * d, d))

    # Ours <- diffusers JointTransformerBlock state-dict names.
    SOURCE = {"ada": "norm1.linear", "to_q": "attn.to_q", "to_k": "attn.to_k",
              "to_v": "attn.to_v", "add_k_proj": "attn.add_k_proj",
              "add_v_proj": "attn.add_v_proj", "to_out": "attn.to_out.0",
              "ff.0": "ff.net.0.proj", "ff.2": "ff.net.2"}

    @torch.no_grad()
    def load_from(self, block: nn.Module) -> None:
        """Copy a diffusers JointTransformerBlock's image-stream weights into this block."""
        theirs = block.state_dict()
        for ours, name in self.SOURCE.items():
            for kind in ("weight", "bias"):
                self.get_submodule(ours).get_parameter(kind).copy_(theirs[f"{name}.{kind}"])

    def modulation(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(n, d_v) conditioning -> six (n, d_v): adaLN-Zero's shift, scale, gate (x2)."""
        return self.ada(F.silu(temb)).chunk(6, dim=-1)

    def heads_of(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.heads, self.head_dim)  # (n, d) -> (n, H, hd)

    def image_kv(self, x: torch.Tensor, mod) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image tokens (n, d_v) -> modulated-norm queries, keys, values, each (n, H, hd)."""
        shift, scale = mod[0], mod[1]
        xn = F.layer_norm(x, x.shape[-1:], eps=LN_EPS) * (1 + scale) + shift
        return self.heads_of(self.to_q(xn)), self.heads_of(self.to_k(xn)), \
            self.heads_of(self.to_v(xn))

    def text_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens (n, d_v) -> keys, values (n, H, hd): the context stream's projections
        after its LayerNorm, unmodulated (t-free, so cacheable across sampling steps)."""
        xn = F.layer_norm(x, x.shape[-1:], eps=LN_EPS)
        return self.heads_of(self.add_k_proj(xn)), self.heads_of(self.add_v_proj(xn))

    def finish(self, x: torch.Tensor, attn: torch.Tensor, mod) -> torch.Tensor:
        """Image tokens (n, d_v) and their attention output (n, d_v) -> the block's output."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_msa * self.to_out(attn)
        xn = F.layer_norm(x, x.shape[-1:], eps=LN_EPS) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.ff(xn)


def load_mmdit_(model: nn.Module, path: str, subfolder: str | None = None) -> int:
    """Load an SD3Transformer2DModel's image-stream blocks and time embedding into `model`'s
    x_fuse_dit vision tower (an XFusionModel). Returns the number of blocks loaded."""
    from diffusers import SD3Transformer2DModel

    dit = SD3Transformer2DModel.from_pretrained(path, subfolder=subfolder,
                                                torch_dtype=torch.float32)
    c = dit.config
    if c.qk_norm is not None or tuple(c.dual_attention_layers):
        raise ValueError(f"{path}: qk_norm={c.qk_norm}, dual_attention_layers="
                         f"{tuple(c.dual_attention_layers)}: only SD3.0-style MMDiT blocks "
                         "(no QK norm, no second attention) map onto the vision tower")
    ours = [v for block in model.blocks for v in getattr(block, "vision", ())]
    if len(ours) != len(dit.transformer_blocks):
        raise ValueError(f"{path} has {len(dit.transformer_blocks)} MMDiT blocks, the vision "
                         f"tower {len(ours)}: set model.dit to the checkpoint's shape")
    model.vision_time.load_from(dit.time_text_embed)
    for mine, theirs in zip(ours, dit.transformer_blocks):
        mine.load_from(theirs)
    return len(ours)


def load_dit_json_(model: nn.Module, dit_json: str | Path) -> int:
    """Load the DiT a dit_model.json names (xfusion.pretrain_dit) into `model`'s vision tower.
    A relative path is taken from the current directory first, then from the json's own."""
    dit_json = Path(dit_json)
    ref = json.loads(dit_json.read_text())
    if "path" not in ref:
        raise KeyError(f"{dit_json}: missing key 'path' (python -m xfusion.pretrain_dit writes it)")
    path = next((str(p.resolve()) for p in (Path(ref["path"]), dit_json.parent / ref["path"])
                 if p.exists()), ref["path"])  # else a hub id
    return load_mmdit_(model, path, ref.get("subfolder"))
