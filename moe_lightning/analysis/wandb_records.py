"""A reader of W&B's binary ``.wandb`` transaction log: its records, and a run's scalar history, config and exit
code read from them with W&B's own protobuf schema (the one ``wandb sync`` reads)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

# The .wandb file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of
# records, each with a 7-byte header (masked CRC-32C, little-endian length, type: 1 full, 2 first, 3 middle,
# 4 last); a block tail shorter than a header is zero padding. Each record payload is a serialized
# wandb.proto.wandb_internal_pb2.Record (W&B's own schema, the one `wandb sync` reads).
_WANDB_IDENT = b":W&B"
_BLOCK_BYTES = 32768
_RECORD_HEADER_BYTES = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_wandb_records(path: str) -> Iterator[Any]:
    """Yield every ``wandb_internal_pb2.Record`` of a ``.wandb`` file, in order.

    A record cut short at the end (a run still being written) ends the iteration.

    Args:
        path: the ``run-<id>.wandb`` file.

    Raises:
        ValueError: the file is not a W&B transaction log.
    """
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as handle:
        data = handle.read()
    if not data.startswith(_WANDB_IDENT):
        raise ValueError(f"{path!r} is not a W&B transaction log (no ':W&B' header)")
    position = _RECORD_HEADER_BYTES  # the file header takes the first 7 bytes of block 0
    pending: list[bytes] = []
    while position + _RECORD_HEADER_BYTES <= len(data):
        left_in_block = _BLOCK_BYTES - position % _BLOCK_BYTES
        if left_in_block < _RECORD_HEADER_BYTES:
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, position)
        start, end = position + _RECORD_HEADER_BYTES, position + _RECORD_HEADER_BYTES + length
        if kind not in (_FULL, _FIRST, _MIDDLE, _LAST) or end > len(data):
            return  # zero-filled tail or a partial write
        position = end
        chunk = data[start:end]
        if kind == _FULL:
            pending = [chunk]
        elif kind == _FIRST:
            pending = [chunk]
            continue
        elif kind == _MIDDLE:
            pending.append(chunk)
            continue
        else:
            pending.append(chunk)
        record = wandb_internal_pb2.Record()
        record.ParseFromString(b"".join(pending))
        pending = []
        yield record


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _history_value(item: Any) -> Any:
    kind = item.WhichOneof("value")
    if kind in ("number", "integer", "boolean", "text"):
        return getattr(item, kind)
    if kind == "none":
        return None
    text = item.json if kind == "json" else item.value_json
    return json.loads(text) if text else None


@dataclass
class WandbRunContent:
    """What :func:`read_wandb_run` found: scalar history per trainer step, the run config, the exit code, the
    command line and the keys of the non-numeric history values (tables, histograms, images)."""

    history: pd.DataFrame
    config: dict[str, Any]
    exit_code: int | None
    args: list[str] = field(default_factory=list)
    media_keys: set[str] = field(default_factory=set)
    runtime_s: float | None = None


def read_wandb_run(path: str) -> WandbRunContent:
    """Read a ``.wandb`` transaction log: numeric history values, config updates, exit code.

    History rows are keyed by ``trainer/global_step`` (Lightning's ``WandbLogger`` logs it with every row), else by
    W&B's ``_step``; rows that share a step are merged. Media (images, histograms, tables) are left out of the
    history and listed by key.

    Args:
        path: the ``run-<id>.wandb`` file.
    """
    rows: list[dict[str, float]] = []
    config: dict[str, Any] = {}
    exit_code: int | None = None
    args: list[str] = []
    media_keys: set[str] = set()
    for record in iter_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, float] = {}
            media: set[str] = set()
            for item in record.history.item:
                value = _history_value(item)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[_item_key(item)] = float(value)
                elif isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
                    row[_item_key(item)] = float(value.replace("Infinity", "inf"))
                elif _item_key(item).endswith("/_type"):  # a medium, flattened: <key>/_type, <key>/path, ...
                    media.add(_item_key(item)[: -len("/_type")])
            # A medium's numeric fields (<key>/size, <key>/width, ...) describe its file, not the run.
            rows.append({k: v for k, v in row.items() if not any(k.startswith(f"{m}/") for m in media)})
            media_keys |= media
        elif kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            for item in updates:
                key = _item_key(item)
                if not key.startswith("_"):
                    config[key] = json.loads(item.value_json) if item.value_json else None
        elif kind == "exit":
            exit_code = int(record.exit.exit_code)
        elif kind == "environment" and record.environment.args:
            args = list(record.environment.args)
    frame = pd.DataFrame(rows)
    if frame.empty:
        empty = pd.DataFrame(index=pd.Index([], name="step", dtype=int))
        return WandbRunContent(empty, config, exit_code, args, media_keys)
    step_key = "trainer/global_step" if "trainer/global_step" in frame.columns else "_step"
    frame = frame.dropna(subset=[step_key])
    frame["step"] = frame[step_key].astype(int)
    runtime = float(frame["_runtime"].max()) if "_runtime" in frame else None  # W&B's seconds since the start
    frame = frame.drop(columns=[c for c in ("_step", "_runtime", "_timestamp", "trainer/global_step") if c in frame])
    history = frame.groupby("step").last().sort_index()
    return WandbRunContent(history, config, exit_code, args, media_keys, runtime if runtime == runtime else None)
