"""Text to training blocks: the byte-level BPE tokenizer, documents encoded into one token stream, and the stream
cut into fixed-length next-token blocks (steps 2-4 of :mod:`moe_lightning.data.wikitext`'s pipeline).

Shape legend:
    B  batch size
    T  block size (tokens per training example)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import Dataset

__all__ = ["END_OF_TEXT", "TokenBlocks", "collate_blocks", "encode_documents", "train_bpe_tokenizer"]

END_OF_TEXT = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) whose ids are all below ``vocab_size``.

    Args:
        texts: Training documents.
        vocab_size: Target vocabulary size, including the 256 byte symbols and ``<|endoftext|>`` (id 0).

    Returns:
        The trained tokenizer; on a small text it may have fewer than ``vocab_size`` tokens.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode_documents(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """Encode documents into one int32 stream, each document followed by ``<|endoftext|>``.

    Blank lines (WikiText separates paragraphs with them) are skipped.
    """
    eot_id = tokenizer.token_to_id(END_OF_TEXT)
    documents = [text for text in texts if text.strip()]
    chunks = [torch.zeros(0, dtype=torch.int32)]
    # Chunks bound the size of the intermediate Python lists on large corpora (WikiText-103 has ~100M tokens).
    for start in range(0, len(documents), 8192):
        ids: list[int] = []
        for encoding in tokenizer.encode_batch(documents[start : start + 8192], add_special_tokens=False):
            ids.extend(encoding.ids)
            ids.append(eot_id)
        chunks.append(torch.tensor(ids, dtype=torch.int32))
    return torch.cat(chunks)


class TokenBlocks(Dataset):
    """Fixed-length next-token blocks over a token stream.

    Block ``i`` is ``stream[i*T : i*T + T + 1]``; item ``i`` is ``(inputs (T,), targets (T,))``, long, with
    ``targets = stream[i*T + 1 : i*T + T + 1]``. The trailing tokens that do not fill a block are dropped.
    """

    def __init__(self, stream: torch.Tensor, block_size: int) -> None:
        if stream.numel() < block_size + 1:
            raise ValueError(
                f"block_size={block_size} needs at least {block_size + 1} tokens, but the split has only "
                f"{stream.numel()}; lower block_size or use more text"
            )
        self.block_size = block_size
        self.blocks = stream.unfold(0, block_size + 1, block_size)  # (num_blocks, T + 1), a view

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.blocks[index].long()
        return block[:-1], block[1:]


def collate_blocks(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(inputs, targets)`` pairs into an ``(inputs (B, T), targets (B, T))`` tuple."""
    inputs, targets = zip(*batch, strict=True)
    return torch.stack(inputs), torch.stack(targets)
