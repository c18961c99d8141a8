"""The built-in GPT: a decoder-only transformer in one readable file, in the spirit of nanoGPT.

    input_ids (B, T) -> wte + wpe -> dropout -> n_layer x Block -> ln_f -> hidden (B, T, C)
    hidden -> lm_head (tied to wte) -> logits (B, T, V)

Each Block is pre-norm:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x)).

The model returns logits (or hidden states) and nothing else: the loss lives in ``nexttoken.loss``,
and the targets arrive already shifted, so nothing here shifts either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from nexttoken.models.masking import branch_mask, branch_positions, document_causal_mask, document_positions
from nexttoken.models.protocol import evaluating

# Named sizes; the vocabulary comes from the tokenizer, so it is not part of a preset. Comments give the
# total with a 4096-token vocab (non-embedding in brackets); exact counts are in GPTConfig.from_preset.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),  # 1.3M (0.8M): minutes on a CPU
    "mini": dict(n_layer=6, n_head=6, n_embd=192, block_size=256),  # 3.5M (2.7M)
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=512),  # 12M (10.6M)
    "medium": dict(n_layer=12, n_head=8, n_embd=512, block_size=1024),  # 40M (38M); not GPT-2 medium
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # GPT-2 124M with vocab 50257
}


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256  # longest context the model can see (size of the position table)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    attn_dropout: float | None = None  # of the attention weights; None: dropout
    bias: bool = False  # biases in Linear and LayerNorm; GPT-2 had them, they barely matter

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"GPTConfig.{name} must be in [0, 1), got {value!r}")

    @classmethod
    def from_preset(cls, name: str, vocab_size: int, **overrides) -> GPTConfig:
        """A config of a named size; ``overrides`` replace any field (e.g. ``block_size=128``).

        Parameters (tied head counted once, bias=False), for vocab 4096 / 50257:
        tiny 1,344,640 / 7,253,248; mini 3,492,288 / 12,355,200; small 12,391,296 / 30,117,120;
        medium 40,382,976 / 64,017,408; gpt2 88,886,016 / 124,337,664.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(vocab_size=vocab_size, **{**PRESETS[name], **overrides})


def attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float) -> Tensor:
    """``F.scaled_dot_product_attention``, causal unless ``attn_mask`` is given. On a CPU it runs in
    fp32 even under bf16 autocast: torch's bf16 attention kernel there is up to 4x slower than its fp32
    one at small heads (forward+backward at 12x4x64x32: 5.7 vs 1.35 ms) and no faster at large ones."""
    if q.device.type == "cpu" and q.dtype != torch.float32:
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(
                q.float(),
                k.float(),
                v.float(),
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=attn_mask is None,
            )
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=attn_mask is None
    )


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout if config.attn_dropout is None else config.attn_dropout
        # One matmul makes queries, keys and values for all heads at once.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim): each head attends independently.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # softmax(q k^T / sqrt(head_dim) + causal mask) v, with a fused kernel (flash / memory-efficient
        # where available). is_causal=True masks j > i, so position i never sees a later token.
        # Packed documents: attn_mask (B, 1, T, T) is causal AND block-diagonal (models/masking.py).
        y = attend(q, k, v, attn_mask, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-join the heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        # Pre-norm: the residual stream x itself is never normalized, which keeps deep stacks trainable.
        x = x + self.attn(self.ln_1(x), attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # learned position embedding
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the output projection IS the token embedding (one tensor, one gradient).
        # It saves V*C parameters and helps small models (Press & Wolf 2017).
        self.lm_head.weight = self.wte.weight

        self.apply(self._init_weights)
        # GPT-2: every block adds two projections onto the residual stream, so its variance grows with
        # depth; scaling those projections by 1/sqrt(2 * n_layer) keeps the stream's scale ~constant.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Small N(0, 0.02) weights make the initial logits nearly uniform: initial loss ~ ln(vocab_size).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def max_context(self) -> int:
        return self.config.block_size

    @property
    def logits_are_linear(self) -> bool:
        return True  # logits = ln_f(x) @ wte.T, nothing after

    def hidden(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        document_ids: Tensor | None = None,
        segments: Tensor | None = None,
    ) -> Tensor:
        """Final hidden states (B, T, C) after ``ln_f``: ``logits = hidden @ lm_head.weight.T``.

        This is what a fused linear + cross-entropy loss consumes, so (B, T, V) logits never exist.
        ``attention_mask`` may only mark right padding, which causal attention already keeps out of
        every real position, so it is not needed here. ``document_ids`` (B, T): packed documents
        (see :mod:`nexttoken.models.masking`): positions restart and attention stops at each one.
        ``segments`` (B, T): a shared context and branches after it (:func:`branch_mask`).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        T = input_ids.size(1)
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds the model's block_size {self.config.block_size}; "
                "crop the input or use a model with a larger block_size"
            )
        pos = torch.arange(T, device=input_ids.device)
        attn_mask = None
        if document_ids is not None:  # packed documents: own positions, block-diagonal causal mask
            if document_ids.shape != input_ids.shape:
                raise ValueError(
                    f"document_ids {tuple(document_ids.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
                )
            pos, attn_mask = document_positions(document_ids), document_causal_mask(document_ids)
        elif segments is not None:  # a shared context and its branches
            pos, attn_mask = branch_positions(segments), branch_mask(segments)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))  # (B, T, C) + (T, C) or (B, T, C)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.ln_f(x)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        logits_to_keep: int = 0,
        document_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, V); ``logits[:, t]`` predicts the token after ``input_ids[:, t]``.

        ``logits_to_keep=k > 0``: only the last ``k`` positions go through ``lm_head`` (B, k, V).
        ``document_ids``: packed documents kept apart (see :meth:`hidden`).
        """
        x = self.hidden(input_ids, document_ids=document_ids)
        return self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters; the tied wte/lm_head weight is counted once.

        ``exclude_embeddings`` drops wte and wpe (the "non-embedding" count of scaling-law papers).
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if exclude_embeddings:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in PaLM (Chowdhery et al. 2022, app. B):

            6 * N  +  12 * n_layer * n_embd * seq_len

        N = non-embedding parameters + the lm_head matmul (V * C; the tied weight is used as a matmul
        once, the embedding lookup costs no FLOPs). Each parameter costs 2 FLOPs (multiply + add)
        in the forward pass and 4 in the backward pass, hence 6N. The second term is attention's
        q@k^T and att@v, which have no parameters: 2 matmuls * 2 FLOPs * n_embd * seq_len per layer
        forward, x3 for forward + backward. ``seq_len`` defaults to block_size; the causal mask's
        saved half is not subtracted (the PaLM convention, used for MFU).
        """
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        n = self.num_parameters(exclude_embeddings=True) + c.vocab_size * c.n_embd
        return 6 * n + 12 * c.n_layer * c.n_embd * T

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Append up to ``max_new_tokens`` sampled tokens to ``input_ids`` (B, T); returns (B, T + n).

        The model only sees the last ``block_size`` tokens. ``temperature == 0`` is greedy (argmax);
        ``top_k`` keeps only the k most likely tokens before sampling. With ``eos_id``, a row that has
        produced it keeps emitting ``eos_id`` (rows stay rectangular), and generation stops once every
        row has. ``generator`` (on the same device as the model) makes sampling reproducible. Runs in eval
        mode (no dropout), then restores the previous mode.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
        with evaluating(self):
            done = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
            for _ in range(max_new_tokens):
                context = input_ids[:, -self.config.block_size :]
                # Only the last position's logits matter; hidden() is cheap to slice before lm_head.
                logits = self.lm_head(self.hidden(context)[:, -1, :]).float()  # (B, V)
                if temperature == 0:
                    next_id = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    probs = F.softmax(logits, dim=-1)
                    next_id = torch.multinomial(probs, num_samples=1, generator=generator)
                if eos_id is not None:
                    next_id = next_id.masked_fill(done.unsqueeze(1), eos_id)
                    done = done | (next_id.squeeze(1) == eos_id)
                input_ids = torch.cat([input_ids, next_id.to(input_ids.dtype)], dim=1)
                if eos_id is not None and bool(done.all()):
                    break
        return input_ids
