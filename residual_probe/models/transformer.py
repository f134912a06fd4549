"""The reference Transformer: decoder-only LM, encoder-only, or encoder-decoder, any placement.

Read top to bottom: `Block` (sublayers + the placement's formula), `Stack` (embedding, blocks,
the placement's start and end), `Transformer` (one or two stacks and the output projection).
Module names follow fairseq (`encoder.layers.3.self_attn.q_proj`, `decoder.embed_tokens`,
`output_projection`) so that checkpoints map with few renames.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .init import initialize
from .layers import Attention, Embedding, FeedForward, make_norm
from .placements import Placement, make_placement


class Block(nn.Module):
    """Block k: self-attention, optional cross-attention, FFN, combined by the placement."""

    def __init__(self, cfg: ModelConfig, placement: Placement, k: int, causal: bool, cross: bool):
        super().__init__()
        self.k = k  # 0-based index in its stack
        self.placement = placement  # a plain object, not a module: it owns no parameters
        d, p_attn = cfg.d_model, cfg.attention_dropout_rate
        n_attn, n_ffn = (placement.sublayer_norm_count(kind, k) for kind in ("attn", "ffn"))
        qk, v, norm = (
            cfg.qk_norm or placement.qkv_norm,
            placement.qkv_norm,
            placement.norm or cfg.norm,
        )
        bias = placement.linear_bias
        self.self_attn = Attention(
            d, cfg.heads, cfg.dropout, causal, n_attn, norm, p_attn, qk, v, bias
        )
        self.cross_attn = (
            Attention(d, cfg.heads, cfg.dropout, False, n_attn, norm, p_attn, qk, v, bias)
            if cross
            else None
        )
        self.ffn = FeedForward(
            d, cfg.ffn, cfg.dropout, n_ffn, norm, cfg.activation_dropout_rate, bias
        )
        placement.add_parameters(self)

    def sublayers(self) -> list[nn.Module]:
        return [s for s in (self.self_attn, self.cross_attn, self.ffn) if s is not None]

    def forward(self, x, memory: torch.Tensor | None = None):
        subs = [(self.self_attn, self.self_attn)]
        if self.cross_attn is not None:
            subs.append((lambda h: self.cross_attn(h, memory), self.cross_attn))
        subs.append((self.ffn, self.ffn))
        return self.placement.block(x, subs, self)


class Stack(nn.Module):
    """Embedding, N blocks and the placement's stack-level norms: an encoder or a decoder."""

    def __init__(self, cfg: ModelConfig, role: str, depth: int):
        super().__init__()
        self.role = role
        self.placement = placement = make_placement(cfg, role)
        decoder_of_seq2seq = role == "decoder" and cfg.arch == "seq2seq"
        self.embed = Embedding(
            cfg.vocab_size, cfg.d_model, cfg.max_len, cfg.dropout, cfg.position_offset
        )
        norm = placement.norm or cfg.norm
        self.embed_norm = make_norm(norm, cfg.d_model) if placement.embed_norm else None
        self.layers = nn.ModuleList(
            Block(cfg, placement, k, causal=role == "decoder", cross=decoder_of_seq2seq)
            for k in range(depth)
        )
        self.final_norm = (
            make_norm(norm, cfg.d_model, placement.final_norm_eps) if placement.final_norm else None
        )

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.embed.embed_tokens

    def forward(
        self, tokens: torch.Tensor, memory: torch.Tensor | None = None, states: list | None = None
    ) -> torch.Tensor:
        """states: a list that receives each block's input state and the last block's output
        (N + 1 entries; ResiDual's are (x, d) pairs), for analyses that differentiate through them."""
        x = self.placement.begin(self.embed(tokens), self)  # (B, T, C), or ResiDual's (x, d)
        for block in self.layers:
            if states is not None:
                states.append(x)
            x = block(x, memory)
        if states is not None:
            states.append(x)
        return self.placement.end(x, self)  # (B, T, C)


class Transformer(nn.Module):
    """`model(tokens)` for the decoder-only and encoder-only archs, `model(src, tgt)` for seq2seq.

    Returns logits (B, T, vocab) over the target positions.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n_enc, n_dec = cfg.stack_depth("encoder"), cfg.stack_depth("decoder")
        self.encoder = Stack(cfg, "encoder", n_enc) if n_enc else None
        self.decoder = Stack(cfg, "decoder", n_dec) if n_dec else None
        if cfg.share_all_embeddings:  # fairseq --share-all-embeddings: one table for both stacks
            self.encoder.embed.embed_tokens = self.decoder.embed.embed_tokens
        head = (self.decoder or self.encoder).placement  # the stack the projection reads
        self.output_projection = head.output_head(cfg.d_model, cfg.vocab_size)
        initialize(self, cfg.init)
        if cfg.tie_embeddings:
            self.output_projection.weight = self.stacks()[-1][1].embed_tokens.weight

    def stacks(self) -> list[tuple[str, Stack]]:
        """(role, stack) pairs, encoder first."""
        return [
            (r, s)
            for r, s in (("encoder", self.encoder), ("decoder", self.decoder))
            if s is not None
        ]

    def forward(self, tokens: torch.Tensor, tgt: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.arch == "seq2seq":
            if tgt is None:
                raise ValueError("a seq2seq model takes (src, tgt)")
            h = self.decoder(tgt, memory=self.encoder(tokens))
        elif tgt is not None:
            raise ValueError(f"an {self.cfg.arch} model takes one token tensor")
        else:
            h = (self.encoder or self.decoder)(tokens)
        return self.output_projection(h)


def build_model(cfg: ModelConfig | None = None, **overrides) -> Transformer:
    cfg = (cfg or ModelConfig()).replace(**overrides) if overrides else (cfg or ModelConfig())
    return Transformer(cfg)
