"""Initializations: fairseq's (what the ResiDual paper trained with) and Xiong et al.'s analysis setting.

Both schemes give token embeddings N(0, d^-1/2) (scaled by sqrt(d) in the forward pass) and
an untied output projection N(0, d^-1/2), as fairseq's TransformerDecoderBase does when it
builds its own output projection; a tied one is the embedding itself.

Each placement's own initialization (DeepNorm's beta; ReZero's zero gate is zero on creation)
runs after the model's, through `Placement.init_`; then, once every stack is initialized, the part
that needs the whole model (Admin's profiling forward, nGPT's unit-norm rows, output projection
included) through `Placement.init_model_`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import Attention, FeedForward


@torch.no_grad()
def initialize(model: nn.Module, scheme: str) -> None:
    """Initialize a `Transformer` in place by `scheme` ("fairseq" or "xiong"), then each placement's."""
    for module in model.modules():
        if isinstance(module, Attention):
            (_init_attention_xiong if scheme == "xiong" else _init_attention_fairseq)(module)
        elif isinstance(module, FeedForward) and scheme == "xiong":
            for lin in (module.fc1, module.fc2):
                nn.init.xavier_uniform_(lin.weight)
                _zero_bias(lin)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=module.embedding_dim**-0.5)
    if not model.cfg.tie_embeddings:  # a tied projection is the embedding, initialized above
        proj = model.output_projection
        nn.init.normal_(proj.weight, mean=0.0, std=proj.in_features**-0.5)
    for _, stack in model.stacks():
        stack.placement.init_(stack)
    for _, stack in model.stacks():  # encoder first: Admin profiles the decoder on its output
        stack.placement.init_model_(stack, model)


def _zero_bias(lin: nn.Linear) -> None:
    if lin.bias is not None:  # nGPT's linear maps have none
        nn.init.zeros_(lin.bias)


def _init_attention_fairseq(attn: Attention) -> None:
    # fairseq MultiheadAttention.reset_parameters (qkv_same_dim): the FFN keeps PyTorch's default.
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        nn.init.xavier_uniform_(lin.weight, gain=1 / math.sqrt(2))
    nn.init.xavier_uniform_(attn.out_proj.weight)
    _zero_bias(attn.out_proj)


def _init_attention_xiong(attn: Attention) -> None:
    # Xiong et al. 2020, Sec. 3: W^Q = W^K = 0 makes attention uniform at init; Xavier elsewhere.
    for lin in (attn.q_proj, attn.k_proj):
        nn.init.zeros_(lin.weight)
        _zero_bias(lin)
    for lin in (attn.v_proj, attn.out_proj):
        nn.init.xavier_uniform_(lin.weight)
        _zero_bias(lin)
