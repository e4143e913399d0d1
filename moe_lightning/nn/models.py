"""Networks built from MoE feed-forward layers: ``MLPMoE`` (the controlled setting) and ``TransformerMoE`` (a
decoder-only language model). Pure PyTorch, no Lightning.

Shape legend: ``B`` batch, ``T`` sequence length, ``D`` model dim, ``V`` vocabulary, ``N = B * T`` tokens.

Both take any routing (``"dense" | "topk" | "soft"``) through config alone, and return a :class:`ModelOutput`
whose ``aux`` list holds one :class:`~moe_lightning.nn.router.MoEAux` per routed layer (empty for dense models).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lightning.common import check_positive
from moe_lightning.nn.config import MoEConfig
from moe_lightning.nn.layer import MoELayer, build_ffn
from moe_lightning.nn.router import MoEAux


@dataclass
class MLPMoEConfig(MoEConfig):
    """MLP-MoE: input projection, ``num_blocks`` residual pre-norm MoE blocks, output head."""

    input_dim: int = 32
    """Input feature dimension."""
    output_dim: int = 32
    """Output dimension (targets for regression, classes for classification)."""
    num_blocks: int = 1
    """Number of residual MoE blocks."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("input_dim", "output_dim", "num_blocks"):
            check_positive(name, getattr(self, name))


@dataclass
class TransformerMoEConfig(MoEConfig):
    """Decoder-only transformer with an MoE feed-forward in every ``moe_every``-th block."""

    vocab_size: int = 8192
    """Vocabulary size V (tied input and output embeddings)."""
    num_layers: int = 3
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads; ``dim`` must be divisible by it."""
    max_seq_len: int = 256
    """Longest sequence (learned positional embeddings)."""
    moe_every: int = 1
    """Use the MoE feed-forward in every n-th block (1: all); the others get a dense FFN of equal active FLOPs."""
    dropout: float = 0.0
    """Dropout on attention and residual branches."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("vocab_size", "num_layers", "num_heads", "max_seq_len", "moe_every"):
            check_positive(name, getattr(self, name))
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


@dataclass
class ModelOutput:
    output: Tensor  # predictions (B, output_dim) or logits (B, T, V)
    aux: list[MoEAux] = field(default_factory=list)  # one per routed MoE layer

    def aux_losses(self) -> dict[str, Tensor]:
        """Load-balancing and z-loss, each averaged over layers (0 for a dense model)."""
        if not self.aux:
            zero = self.output.new_zeros(())
            return {"load_balance": zero, "z_loss": zero}
        return {
            "load_balance": torch.stack([a.load_balance for a in self.aux]).mean(),
            "z_loss": torch.stack([a.z_loss for a in self.aux]).mean(),
        }


def _collect(aux: MoEAux | None, into: list[MoEAux]) -> None:
    if aux is not None:
        into.append(aux)


class MLPBlock(nn.Module):
    """``x + ffn(LayerNorm(x))``."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.dim)
        self.ffn = build_ffn(config)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux | None]:
        y, aux = self.ffn(self.norm(x))
        return x + y, aux


class MLPMoE(nn.Module):
    """The controlled setting of the papers: ``x (B, input_dim) -> (B, output_dim)``.

    Example:
        >>> model = MLPMoE(MLPMoEConfig(input_dim=8, output_dim=3, dim=16, expert_hidden=16, num_experts=4))
        >>> model(torch.randn(5, 8)).output.shape
        torch.Size([5, 3])
    """

    def __init__(self, config: MLPMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.input_proj = nn.Linear(config.input_dim, config.dim)
        self.blocks = nn.ModuleList(MLPBlock(config) for _ in range(config.num_blocks))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.output_dim)

    def forward(self, x: Tensor) -> ModelOutput:
        if x.shape[-1] != self.config.input_dim:
            raise ValueError(f"MLPMoE expects inputs (B, {self.config.input_dim}), got shape {tuple(x.shape)}")
        h, aux = self.input_proj(x), []
        for block in self.blocks:
            h, block_aux = block(h)
            _collect(block_aux, aux)
        return ModelOutput(self.head(self.norm(h)), aux)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerMoEConfig) -> None:
        super().__init__()
        self.num_heads, self.dropout = config.num_heads, config.dropout
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(LN(x))``, then ``x + ffn(LN(x))``."""

    def __init__(self, config: TransformerMoEConfig, use_moe: bool) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.dim)
        self.attn = CausalSelfAttention(config)
        self.ffn_norm = nn.LayerNorm(config.dim)
        if use_moe:
            ffn_config = config
        else:  # dense FFN of equal active FLOPs in the non-MoE blocks
            ffn_config = MoEConfig(
                dim=config.dim,
                expert_hidden=config.expert_hidden,
                num_experts=config.num_experts,
                top_k=config.top_k,
                routing="dense",
                activation=config.activation,
                capacity_match="active",
                num_shared_experts=config.num_shared_experts,
                shared_expert_hidden=config.shared_expert_hidden,
            )
        self.ffn = build_ffn(ffn_config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux | None]:
        x = x + self.drop(self.attn(self.attn_norm(x)))
        y, aux = self.ffn(self.ffn_norm(x))
        return x + self.drop(y), aux


class TransformerMoE(nn.Module):
    """Decoder-only LM: token + learned position embeddings, pre-norm blocks with causal SDPA attention and an
    MoE feed-forward, final LayerNorm, output head tied to the token embedding.

    Example:
        >>> model = TransformerMoE(TransformerMoEConfig(vocab_size=50, dim=16, num_heads=2, expert_hidden=16))
        >>> model(torch.randint(0, 50, (2, 7))).output.shape
        torch.Size([2, 7, 50])
    """

    def __init__(self, config: TransformerMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.position_embedding = nn.Embedding(config.max_seq_len, config.dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(config, use_moe=(i % config.moe_every == config.moe_every - 1))
            for i in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # tied embeddings
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, tokens_BT: Tensor) -> ModelOutput:
        if tokens_BT.dim() != 2:
            raise ValueError(f"TransformerMoE expects token ids (B, T), got shape {tuple(tokens_BT.shape)}")
        T = tokens_BT.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.config.max_seq_len}")
        positions = torch.arange(T, device=tokens_BT.device)
        h, aux = self.token_embedding(tokens_BT) + self.position_embedding(positions), []
        for block in self.blocks:
            h, block_aux = block(h)
            _collect(block_aux, aux)
        return ModelOutput(self.head(self.norm(h)), aux)


# Checkpoints store these configs in their hyper-parameters; allow them under torch.load(weights_only=True), by
# their names and by the names 0.1 pickled them under (its modules moved: moe_lightning.common.moved).
torch.serialization.add_safe_globals(
    [
        MoEConfig,
        MLPMoEConfig,
        TransformerMoEConfig,
        (MoEConfig, "moe_lightning.moe.MoEConfig"),
        (MLPMoEConfig, "moe_lightning.models.MLPMoEConfig"),
        (TransformerMoEConfig, "moe_lightning.models.TransformerMoEConfig"),
    ]
)


def param_counts(model: nn.Module) -> dict[str, int]:
    """Total parameters of ``model`` and parameters active per token (routed experts counted ``top_k`` times, or
    all for soft routing; shared experts, always on, in both). Tied weights are counted once; the aux-free bias is a
    buffer, not a parameter."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for module in model.modules():
        if isinstance(module, MoELayer):
            config = module.config
            active = config.num_experts if config.routing == "soft" else config.top_k
            expert_params = module.w_in.numel() + module.w_out.numel()  # routed experts only
            inactive += expert_params * (config.num_experts - active) // config.num_experts
    return {"total": total, "active": total - inactive}
