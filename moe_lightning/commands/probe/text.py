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
    """The non-empty lines of a UTF-8 text file (one document or paragraph per line, as in WikiText).

    Raises:
        ValueError: the file does not exist, is not a file, is not UTF-8, or has no line with text.
    """
    file = Path(path).expanduser()
    shown = repr(os.fspath(path))
    if not file.exists():
        raise ValueError(f"text file {shown} does not exist; pass --text with a UTF-8 text file")
    if not file.is_file():
        raise ValueError(f"text file {shown} is not a file; pass --text with a UTF-8 text file")
    try:
        lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise ValueError(f"text file {shown} is not UTF-8 text ({error})") from None
    if not lines:
        raise ValueError(f"text file {shown} is empty (no line with text); pass --text with a non-empty text file")
    return lines


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


def read_texts(
    texts_or_file: str | os.PathLike | Sequence[str] | Tensor | None,
) -> tuple[Sequence[str] | Tensor, str | None]:
    """The texts (or token ids) to probe on, and the file they came from (None for texts or ids), read before
    any model loads so that a missing or empty file fails first.

    Args:
        texts_or_file: a text file (``bundled:<name>`` for one shipped with the package), a list of texts, a tensor
            of token ids, or None for :data:`DEFAULT_TEXT_FILE`.

    Raises:
        ValueError: the file is missing or empty, or the list holds no text.
    """
    if isinstance(texts_or_file, Tensor):
        return texts_or_file, None
    if texts_or_file is None:
        texts_or_file = DEFAULT_TEXT_FILE
    if isinstance(texts_or_file, (str, os.PathLike)):
        source = os.fspath(texts_or_file)
        return read_text_file(resolve_text_file(source)), source
    texts = [text for text in texts_or_file if text.strip()]
    if not texts:
        raise ValueError("the list of texts holds no text; give at least one non-empty string")
    return texts, None


def text_tokens(texts: Sequence[str] | Tensor, tokenizer: Any, max_tokens: int) -> Tensor:
    """The first ``max_tokens`` token ids of ``texts`` (from :func:`read_texts`); token ids are flattened into one
    stream, and the tokenizer is unused for them."""
    if isinstance(texts, Tensor):
        return texts.detach().reshape(-1).to(torch.long).cpu()[:max_tokens]
    return token_stream(tokenizer, texts, max_tokens)


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
