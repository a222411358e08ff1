"""The block variants of X-Fusion Fig. 4 and Sec. 5, each wrapping one Llama decoder layer.

Every variant reuses the Llama layer's own modules (q/k/v/o projections, MLP, RMSNorms, the HF
attention function with its GQA handling); this file only routes tokens. Routing is by index:
a modality's tokens are gathered (a flat index over B*L), projected by that modality's weights,
and scattered back. No variant runs a tower on tokens whose output it then throws away.

References: X-Fusion (Mo et al. 2025) Sec. 4 (Dual Tower, X-Fuse), Sec. 5 (baselines, FLOPs);
LlamaFusion (Shi et al. 2024) Sec. 3 (modality-specific modules, one joint attention);
transformers/models/llama/modeling_llama.py (LlamaAttention.forward, LlamaDecoderLayer.forward).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, eager_attention_forward,
                                                      rotate_half)

from xfusion.config import VARIANTS, ModelConfig
from xfusion.model.dit import VisionBlock, dit_shape, layer_map, orthonormal

TXT, IMG = "txt", "img"


@dataclass
class Route:
    """The tokens of one modality in a (B, L) chunk."""

    flat: torch.Tensor  # (n,) index into the flattened B*L tokens, ascending
    rows: torch.Tensor  # (n,) batch row of each token
    slots: torch.Tensor  # (n,) rank of each token among the route's tokens of its row
    width: int  # most route tokens in one row: the query length of a dense attention call
    full: bool  # every token of the chunk, in order: gather and scatter are views

    @classmethod
    def select(cls, chosen: torch.Tensor) -> "Route":
        """chosen: (B, L) bool."""
        B, L = chosen.shape
        flat = chosen.reshape(-1).nonzero().squeeze(1)
        slots = (chosen.long().cumsum(1) - 1).reshape(-1)[flat]
        width = int(chosen.sum(1).max()) if flat.numel() else 0
        return cls(flat, flat // L, slots, width, full=flat.numel() == B * L)

    @property
    def n(self) -> int:
        return self.flat.numel()

    def to(self, device) -> "Route":
        return Route(self.flat.to(device), self.rows.to(device), self.slots.to(device),
                     self.width, self.full)


class KVCache:
    """Keys/values of the tokens seen so far, per (layer, tower), each (B, Hkv, L_past, hd), plus
    the layout (span ids, validity) of those tokens for the mask of later chunks.

    `frozen` reads the cache without extending it: T2I sampling caches the prompt once and reuses
    it at every flow step, where only the image tokens are recomputed. An extending cache stores
    every tower's keys/values of every new token, even a tower that asks no query then (the
    vision tower while a caption is decoded), so that every tower stays aligned with the mask."""

    def __init__(self):
        self.store: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.span_ids: torch.Tensor | None = None  # (B, L_past)
        self.valid: torch.Tensor | None = None  # (B, L_past)
        self.frozen = False

    @property
    def length(self) -> int:
        return 0 if self.span_ids is None else self.span_ids.shape[1]

    def extend(self, index: int, tower: str, k: torch.Tensor, v: torch.Tensor):
        past = self.store.get((index, tower))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if not self.frozen:
            self.store[(index, tower)] = (k, v)
        return k, v


@dataclass
class Context:
    """What every block of one forward pass shares: the chunk's routes, RoPE and mask."""

    B: int
    L: int  # tokens in this chunk (after the cached ones)
    routes: dict[str, Route]  # TXT, IMG and "all"
    cos: torch.Tensor  # (B*L, hd)
    sin: torch.Tensor  # (B*L, hd)
    mask: torch.Tensor | None  # (B, 1, L, L_past + L); None = plain causal, HF's own call
    cache: KVCache | None = None
    packed_masks: dict = field(default_factory=dict)  # route id -> its packed rows of `mask`
    temb: torch.Tensor | None = None  # (B, d_v) x_fuse_dit's timestep conditioning per row

    def packed_mask(self, route: Route) -> torch.Tensor:
        """(B, 1, width, L_past + L): the mask rows of a route's queries packed per row, built
        once per forward. Padded query slots attend to everything (never a fully masked row);
        their outputs are dropped."""
        if self.mask is None:
            raise ValueError("a partial set of queries needs an explicit attention mask")
        if id(route) not in self.packed_masks:
            m = self.mask.new_ones(self.B, route.width, self.mask.shape[-1])
            rows = self.mask[route.rows, 0, route.flat % self.L]  # (n, L_past + L)
            m = m.index_put((route.rows, route.slots), rows)
            self.packed_masks[id(route)] = m[:, None]
        return self.packed_masks[id(route)]


def gather(h: torch.Tensor, route: Route) -> torch.Tensor:
    """(B, L, D) -> (n, D), the route's tokens."""
    flat = h.reshape(-1, h.shape[-1])
    return flat if route.full else flat[route.flat]


def scatter(ctx: Context, parts: list[tuple[Route, torch.Tensor]]) -> torch.Tensor:
    """[(route, (n, D))] covering every token once -> (B, L, D)."""
    if len(parts) == 1 and parts[0][0].full:
        return parts[0][1].view(ctx.B, ctx.L, -1)
    out = parts[0][1].new_zeros(ctx.B * ctx.L, parts[0][1].shape[-1])
    for route, values in parts:
        out = out.index_copy(0, route.flat, values)
    return out.view(ctx.B, ctx.L, -1)


def pick(values: torch.Tensor, source: Route, target: Route) -> torch.Tensor:
    """Values laid out along `source` (the full chunk or `target` itself), restricted to
    `target`."""
    return values if source is target or target.full else values[target.flat]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's apply_rotary_pos_emb for one tensor: (n, heads, hd) with (n, hd) cos/sin.

    Queries and keys are rotated separately because they may cover different tokens."""
    return (x * cos[:, None]) + (rotate_half(x) * sin[:, None])


def _by_modality(h: torch.Tensor, ctx: Context, layers: dict[str, LlamaDecoderLayer], fn):
    """Run fn(layer, x (n, D), route) on each present modality's tokens with that modality's layer.

    Returns (route, values) with values laid out along the route covering those modalities; when
    one layer serves them all, it runs once on that route with no gather or scatter."""
    mods = [m for m in (TXT, IMG) if m in layers and ctx.routes[m].n]
    route = ctx.routes["all"] if len(mods) == 2 else ctx.routes[mods[0]]
    if len({id(layers[m]) for m in mods}) == 1:
        return route, fn(layers[mods[0]], gather(h, route), route)
    out = None
    for m in mods:
        r = ctx.routes[m]
        values = fn(layers[m], gather(h, r), r)
        out = values.new_zeros(ctx.B * ctx.L, *values.shape[1:]) if out is None else out
        out = out.index_copy(0, r.flat, values)
    return route, out


def _rope_tables(ctx: Context, route: Route):
    return (ctx.cos, ctx.sin) if route.full else (ctx.cos[route.flat], ctx.sin[route.flat])


def attend(h: torch.Tensor, ctx: Context, index: int, tower: str,
           queries: dict[str, LlamaDecoderLayer], keys: dict[str, LlamaDecoderLayer]):
    """One joint attention: `queries[m]` projects the queries of modality m's tokens, `keys[m]`
    the keys/values of m's tokens (every token has keys/values). Returns (route of the queries,
    (n_q, H*hd) attention output before o_proj), or None when no token asks a query here."""
    has_queries = any(ctx.routes[m].n for m in queries)
    if not has_queries and (ctx.cache is None or ctx.cache.frozen):
        return None

    def keys_values(layer, x, route):
        attn, x = layer.self_attn, layer.input_layernorm(x)
        k = attn.k_proj(x).view(x.shape[0], -1, attn.head_dim)  # (n, Hkv, hd)
        v = attn.v_proj(x).view(x.shape[0], -1, attn.head_dim)
        return torch.stack([_rope(k, *_rope_tables(ctx, route)), v], dim=1)  # (n, 2, Hkv, hd)

    _, kv = _by_modality(h, ctx, keys, keys_values)  # keys cover every token: the full route
    kv = kv.view(ctx.B, ctx.L, 2, -1, kv.shape[-1]).permute(2, 0, 3, 1, 4)  # (2, B, Hkv, L, hd)
    k, v = kv[0], kv[1]
    if ctx.cache is not None:
        k, v = ctx.cache.extend(index, tower, k, v)
    if not has_queries:
        return None

    def project_queries(layer, x, route):
        attn = layer.self_attn
        q = attn.q_proj(layer.input_layernorm(x)).view(x.shape[0], -1, attn.head_dim)
        return _rope(q, *_rope_tables(ctx, route))  # (n, H, hd)

    route, q = _by_modality(h, ctx, queries, project_queries)
    module = next(iter(queries.values())).self_attn  # GQA groups, scaling: equal in every copy
    if route.full:
        q = q.view(ctx.B, ctx.L, *q.shape[1:]).transpose(1, 2)  # (B, H, L, hd)
        mask = ctx.mask
    else:  # a subset of the tokens asks queries: pack them per row, pad to the longest row
        q = q.new_zeros(ctx.B, route.width, *q.shape[1:]).index_put((route.rows, route.slots), q)
        q = q.transpose(1, 2)  # (B, H, width, hd)
        mask = ctx.packed_mask(route)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation,
                                                      eager_attention_forward)
    out, _ = attention(module, q, k, v, mask, dropout=0.0, scaling=module.scaling)  # (B, Lq, H, hd)
    out = out.reshape(ctx.B, out.shape[1], -1)
    return route, (out.reshape(ctx.B * ctx.L, -1) if route.full else out[route.rows, route.slots])


def finish(x: torch.Tensor, attn_out: torch.Tensor, attn_layer: LlamaDecoderLayer,
           mlp_layer: LlamaDecoderLayer) -> torch.Tensor:
    """The rest of LlamaDecoderLayer.forward on (n, D) tokens: o_proj and residual, then the
    post-attention norm, MLP and residual. The o_proj and the MLP may come from different layers
    (shallow dual projection)."""
    x = x + attn_layer.self_attn.o_proj(attn_out)
    return x + mlp_layer.mlp(mlp_layer.post_attention_layernorm(x))


def vision_copy(text_layer: LlamaDecoderLayer, attention: bool = True) -> LlamaDecoderLayer:
    """The trainable vision layer: a deepcopy of the text layer (X-Fusion Sec. 4: "we initialize
    each vision block by copying the parameters in the corresponding language layer"), so at init
    every variant computes what the text layer computes. `attention=False` keeps the MLP half."""
    layer = copy.deepcopy(text_layer)
    if not attention:
        del layer.self_attn, layer.input_layernorm
    for p in layer.parameters():
        p.requires_grad_(True)  # the text layer is frozen; its copy is not
    return layer


class Block(nn.Module):
    """Base of the variants: holds the text layer by reference (it stays registered once, in the
    LLM) and its index for the KV cache. What a variant trains and whether it preserves the text
    path are facts of the registry, xfusion.config.VARIANTS."""

    def __init__(self, text_layer: LlamaDecoderLayer, index: int, cfg: ModelConfig):
        super().__init__()
        self._text = (text_layer,)  # a tuple: not registered as a submodule of the block
        self.index = index

    @property
    def text(self) -> LlamaDecoderLayer:
        return self._text[0]


class SingleTower(Block):
    """Fig. 4a: the Llama layer processes every token (Transfusion from a pretrained LLM)."""

    def forward(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        T = self.text
        route, a = attend(h, ctx, self.index, "text", {TXT: T, IMG: T}, {TXT: T, IMG: T})
        return scatter(ctx, [(route, finish(gather(h, route), a, T, T))])


class GatedTower(Block):
    """Fig. 4b: H_out = H_txt + gamma * H_gate, with a trainable copy and gamma = 0 at init."""

    def __init__(self, text_layer: LlamaDecoderLayer, index: int, cfg: ModelConfig):
        super().__init__(text_layer, index, cfg)
        self.gate = vision_copy(text_layer)
        # 0: the block starts as the frozen layer. Shape (1,), not (): DeepSpeed's broadcast of
        # parameters views them as bytes, which a 0-dim tensor cannot do.
        self.gamma = nn.Parameter(torch.zeros(1))
        self.gate_text = cfg.gate_text  # False: only image positions are gated

    def forward(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        T, G = self.text, self.gate
        route, a = attend(h, ctx, self.index, "text", {TXT: T, IMG: T}, {TXT: T, IMG: T})
        out = finish(gather(h, route), a, T, T)  # (B*L, D): the frozen layer on every token
        gated = {TXT: G, IMG: G} if self.gate_text else {IMG: G}
        res = attend(h, ctx, self.index, "gate", gated, {TXT: G, IMG: G})
        if res is not None:
            r, g = res
            g = self.gamma * finish(gather(h, r), g, G, G)  # (n_gated, D)
            out = out + g if r.full else out.index_add(0, r.flat, g)
        return out.view(ctx.B, ctx.L, -1)


class DualProjection(Block):
    """Fig. 4c / LlamaFusion: modality-specific q/k/v/o, MLP and norms, one joint attention.
    `model.shallow`: only the MLP (with its norm) is modality-specific (LlamaFusion Sec. 5.1)."""

    def __init__(self, text_layer: LlamaDecoderLayer, index: int, cfg: ModelConfig):
        super().__init__(text_layer, index, cfg)
        self.shallow = cfg.shallow
        self.vision = vision_copy(text_layer, attention=not cfg.shallow)

    def forward(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        T, V = self.text, self.vision
        A = T if self.shallow else V  # the image tokens' attention weights
        route, a = attend(h, ctx, self.index, "joint", {TXT: T, IMG: A}, {TXT: T, IMG: A})
        parts = []
        for m, attn_layer, mlp_layer in ((TXT, T, T), (IMG, A, V)):
            r = ctx.routes[m]
            if r.n:
                parts.append((r, finish(gather(h, r), pick(a, route, r), attn_layer, mlp_layer)))
        return scatter(ctx, parts)


class DualTower(Block):
    """Sec. 4 (Fig. 4d): frozen text layer for text tokens, trainable copy for image tokens; each
    tower asks queries for its own tokens only and makes keys/values for all tokens, so attention
    costs O(N(N+M)) + O(M(N+M)) = O((N+M)^2), as one tower (Sec. 5, FLOPs)."""

    def __init__(self, text_layer: LlamaDecoderLayer, index: int, cfg: ModelConfig):
        super().__init__(text_layer, index, cfg)
        self.vision = vision_copy(text_layer)

    def towers(self):
        return ((TXT, self.text, "text"), (IMG, self.vision, "vision"))

    def forward(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        parts = []
        for m, layer, tower in self.towers():
            res = attend(h, ctx, self.index, tower, {m: layer}, {TXT: layer, IMG: layer})
            if res is not None:
                route, a = res
                parts.append((route, finish(gather(h, route), a, layer, layer)))
        return scatter(ctx, parts)


class XFuse(DualTower):
    """Sec. 4 X-Fuse: both towers answer every token's query; per modality the output is
    alpha * h(own tower) + beta * h(other tower), learnable scalars per layer and modality,
    alpha = 1 and beta = 0 at init, so the block starts as the dual tower."""

    def __init__(self, text_layer: LlamaDecoderLayer, index: int, cfg: ModelConfig):
        super().__init__(text_layer, index, cfg)
        self.alpha = nn.Parameter(torch.ones(2))  # (text, image)
        self.beta = nn.Parameter(torch.zeros(2))

    def forward(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        outs = {}
        for _, layer, tower in self.towers():
            res = attend(h, ctx, self.index, tower, {TXT: layer, IMG: layer},
                         {TXT: layer, IMG: layer})
            if res is not None:
                route, a = res
                outs[tower] = (route, finish(gather(h, route), a, layer, layer))
        parts = []
        for i, (m, own, other) in enumerate(((TXT, "text", "vision"), (IMG, "vision", "text"))):
            r = ctx.routes[m]
            if r.n:
                mixed = (self.alpha[i] * pick(outs[own][1], outs[own][0], r)
                         + self.beta[i] * pick(outs[other][1], outs[other][0], r))
                parts.append((r, mixed))
        return scatter(ctx, parts)


class XFuseDiT(Block):
    """Sec. 7.2 "X-Fusion (Pretrained DiT)": the vision tower is a pretrained MMDiT's image
    stream of width d_v and depth n_v (xfusion/model/dit.py: layer map, projections, timestep
    modulation). Text queries: the frozen text layer over every token's keys/values (dual_tower's
    text half). Image queries, at a layer hosting vision blocks: alpha * h_vision + beta *
    h_text (X-Fuse, alpha = 1, beta = 0 at init), where h_vision = h + up(DiT blocks(down h) -
    down h); at a layer hosting none, image tokens pass unchanged."""

    def __init__(self, text_layer: LlamaDecoderLayer, index: int, cfg: ModelConfig):
        super().__init__(text_layer, index, cfg)
        llama = text_layer.self_attn.config
        shape = dit_shape(cfg.dit)
        self.vision = nn.ModuleList(
            VisionBlock(shape)
            for _ in layer_map(llama.num_hidden_layers, shape.num_layers)[index])
        if len(self.vision):
            d_t, d_v = llama.hidden_size, shape.num_attention_heads * shape.attention_head_dim
            q = orthonormal(d_t, d_v)  # (d_t, d_v), the same at every layer
            self.down, self.up = nn.Linear(d_t, d_v, bias=False), nn.Linear(d_v, d_t, bias=False)
            self.text_kv = nn.Linear(d_t, d_v, bias=False)  # text tokens into the DiT's attention
            with torch.no_grad():
                self.down.weight.copy_(q.T), self.text_kv.weight.copy_(q.T), self.up.weight.copy_(q)
            self.alpha = nn.Parameter(torch.ones(1))  # image queries: own tower
            self.beta = nn.Parameter(torch.zeros(1))  # image queries: the text tower

    def forward(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        T, img = self.text, ctx.routes[IMG]
        fuse = bool(len(self.vision)) and img.n > 0
        parts = []
        res = attend(h, ctx, self.index, "text", {TXT: T, IMG: T} if fuse else {TXT: T},
                     {TXT: T, IMG: T})
        if res is not None:
            route, a = res
            text_out = finish(gather(h, route), a, T, T)
            if ctx.routes[TXT].n:
                parts.append((ctx.routes[TXT], pick(text_out, route, ctx.routes[TXT])))
        vision = self._vision(h, ctx) if len(self.vision) else None
        if fuse:
            parts.append((img, self.alpha * vision + self.beta * pick(text_out, route, img)))
        elif img.n:
            parts.append((img, gather(h, img)))  # no vision block here: unchanged
        return scatter(ctx, parts)

    def _vision(self, h: torch.Tensor, ctx: Context) -> torch.Tensor | None:
        """(n_img, d_t) h_vision of the image tokens; extends the cache with every block's
        keys/values (text ones too, for later image queries); None without image queries."""
        img, txt = ctx.routes[IMG], ctx.routes[TXT]
        if not img.n and (ctx.cache is None or ctx.cache.frozen):
            return None
        if img.n and ctx.temb is None:
            raise ValueError("x_fuse_dit: image tokens need their timesteps (forward_chunk's t)")
        x_txt = self.text_kv(gather(h, txt)) if txt.n else None  # (n_txt, d_v)
        x0 = self.down(gather(h, img)) if img.n else None  # (n_img, d_v)
        temb = ctx.temb[img.rows] if img.n else None  # (n_img, d_v): each token's row
        x = x0
        for j, block in enumerate(self.vision):
            mod = block.modulation(temb) if img.n else None
            kv, q = None, None
            for m, x_m in ((TXT, x_txt), (IMG, x)):
                if x_m is None:
                    continue
                if m == IMG:
                    q, k, v = block.image_kv(x_m, mod)
                else:
                    k, v = block.text_kv(x_m)
                kv = (k.new_zeros(ctx.B * ctx.L, 2, *k.shape[1:]) if kv is None else kv)
                kv = kv.index_copy(0, ctx.routes[m].flat, torch.stack([k, v], dim=1))
            kv = kv.view(ctx.B, ctx.L, *kv.shape[1:]).permute(2, 0, 3, 1, 4)  # (2, B, H, L, hd)
            k, v = kv[0], kv[1]
            if ctx.cache is not None:
                k, v = ctx.cache.extend(self.index, f"vision{j}", k, v)
            if not img.n:
                continue
            q = q.new_zeros(ctx.B, img.width, *q.shape[1:]).index_put((img.rows, img.slots), q)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v,
                                                 attn_mask=ctx.packed_mask(img))  # (B, H, w, hd)
            out = out.transpose(1, 2)[img.rows, img.slots].reshape(img.n, -1)  # (n_img, d_v)
            x = block.finish(x, out, mod)
        return None if x is None else gather(h, img) + self.up(x - x0)


# Architecture name -> block class, from the registry (xfusion.config.VARIANTS names the classes).
BLOCKS: dict[str, type[Block]] = {name: globals()[v.block] for name, v in VARIANTS.items()}
