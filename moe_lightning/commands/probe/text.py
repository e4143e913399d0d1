"""The text a pretrained model is probed on: read from a file (or a bundled one), tokenised within the token
budget, checked against the model, and packed into blocks of token ids."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_lightning.commands.probe.options import DEFAULT_TEXT_FILE
from moe_lightning.common.bundled import resolve_text_file

# Lines tokenized per tokenizer call while filling the token budget (the text file may be much longer).
_TOKENIZE_CHUNK_LINES = 64


def read_text_file(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a UTF-8 text file (one document or paragraph per line, as in WikiText)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"text file {os.fspath(path)!r} does not exist; pass --text with a UTF-8 text file")
    return [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]


def token_stream(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> Tensor:
    """Token ids of ``texts`` in order, concatenated, at most ``max_tokens`` long.

    Empty lines are dropped; each text is encoded with the tokenizer's own special tokens (a BOS for Mixtral-style
    tokenizers, none for Qwen), and only as many texts are encoded as the budget needs.
    """
    ids: list[int] = []
    texts = [text for text in texts if text.strip()]
    for start in range(0, len(texts), _TOKENIZE_CHUNK_LINES):
        for encoded in tokenizer(list(texts[start : start + _TOKENIZE_CHUNK_LINES]))["input_ids"]:
            ids.extend(encoded)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def pack_blocks(stream: Tensor, seq_len: int, batch_size: int) -> list[Tensor]:
    """Cut a 1-D token stream into blocks of ``seq_len`` (the last may be shorter) and group them into batches.

    Returns:
        ``(B, T)`` long tensors: full blocks ``batch_size`` at a time, then the short last block on its own.
    """
    batches: list[Tensor] = []
    pending: list[Tensor] = []
    for block in stream.split(seq_len):
        if pending and (len(pending) == batch_size or block.numel() != pending[0].numel()):
            batches.append(torch.stack(pending))
            pending = []
        pending.append(block)
    if pending:
        batches.append(torch.stack(pending))
    return batches


def text_tokens(
    texts_or_file: str | os.PathLike | Sequence[str] | Tensor | None, tokenizer: Any, max_tokens: int
) -> tuple[Tensor, str | None]:
    """The first ``max_tokens`` token ids of the text, and the file it came from (None for texts or ids).

    Args:
        texts_or_file: a text file (``bundled:<name>`` for one shipped with the package), a list of texts, a tensor
            of token ids (flattened into one stream), or None for :data:`DEFAULT_TEXT_FILE`.
        tokenizer: encodes the texts; unused for token ids.
        max_tokens: the token budget.
    """
    if isinstance(texts_or_file, Tensor):
        return texts_or_file.detach().reshape(-1).to(torch.long).cpu()[:max_tokens], None
    if texts_or_file is None:
        texts_or_file = DEFAULT_TEXT_FILE
    source: str | None = None
    if isinstance(texts_or_file, (str, os.PathLike)):
        source = os.fspath(texts_or_file)
        texts = read_text_file(resolve_text_file(source))
    else:
        texts = list(texts_or_file)
    return token_stream(tokenizer, texts, max_tokens), source


def check_tokens(stream: Tensor, model: nn.Module, seq_len: int) -> None:
    """Fail with a clear message for an empty stream, ids beyond the model's vocabulary (a tokenizer of another
    model) or blocks longer than its ``max_position_embeddings``."""
    if stream.numel() == 0:
        raise ValueError("the text has no tokens; give a non-empty text file or list of texts")
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
    if vocab is not None and int(stream.max()) >= vocab:
        raise ValueError(
            f"token id {int(stream.max())} is out of range for the model's {vocab} embeddings; the tokenizer does "
            "not belong to this model (pass the right one with --tokenizer)"
        )
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(max_positions, int) and seq_len > max_positions:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings={max_positions}")
