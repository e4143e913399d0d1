"""WikiText language-modelling data: byte-level BPE tokenizer, cached token streams, fixed-length blocks.

Shape legend:
    B  batch size
    T  block size (tokens per training example)

Pipeline (``prepare_data`` does the heavy work once, ``setup`` only loads from the cache):

1. Read the text: local text files line by line (as ``datasets.load_dataset("text", ...)`` splits them), or the
   hub dataset by name through ``datasets``, which is imported only then.
2. Train a byte-level BPE tokenizer (``tokenizers``) on the training split and cache ``tokenizer.json`` under a
   key made of the training text's SHA-256 and ``vocab_size``.
3. Encode every split into one token stream: each non-blank line is a document, followed by ``<|endoftext|>``.
   The streams are cached next to the tokenizer.
4. Cut the stream into blocks of ``T + 1`` tokens with stride ``T`` and return ``(inputs (B, T), targets (B, T))``
   with ``targets`` the inputs shifted by one; consecutive blocks share one token, so every next-token pair of the
   stream is trained on exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import LightningDataModule
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from moe_lightning.common import hf_offline_mode, hub_reachable
from moe_lightning.common.bundled import BUNDLED_PREFIX, WIKITEXT2_TRAIN, WIKITEXT2_VAL, is_bundled, resolve_text_file
from moe_lightning.data.resumable import ResumableDataLoader, ResumableTrainData
from moe_lightning.data.tokens import END_OF_TEXT, TokenBlocks, collate_blocks, encode_documents, train_bpe_tokenizer

if TYPE_CHECKING:
    import datasets

# Byte-level BPE always keeps the 256 byte symbols, plus our end-of-text token.
MIN_VOCAB_SIZE = 257
EXAMPLE_TRAIN_FILE = BUNDLED_PREFIX + WIKITEXT2_TRAIN
EXAMPLE_VAL_FILE = BUNDLED_PREFIX + WIKITEXT2_VAL
# Bump when the tokenizer recipe or the token-stream format changes, so that stale caches are not reused.
CACHE_FORMAT = "v1"
_SPLITS = ("train", "validation", "test")


def _offline_hint() -> str:
    return (
        "To train from local text files instead, set train_file and val_file, for example "
        f"--data.train_file {EXAMPLE_TRAIN_FILE} --data.val_file {EXAMPLE_VAL_FILE} on the command line "
        f"(or WikiTextDataModule(train_file='{EXAMPLE_TRAIN_FILE}', val_file='{EXAMPLE_VAL_FILE}'))."
    )


def load_hub_dataset(dataset_name: str, dataset_config: str | None) -> datasets.DatasetDict:
    """Load a text dataset from the Hugging Face Hub, failing fast with a clear message when it is unreachable.

    With ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1``, only the local Hugging Face cache is used. Otherwise the
    hub is probed first; when it does not answer, the local cache is tried in offline mode before giving up.

    Raises:
        RuntimeError: The dataset is neither reachable nor cached; the message says which options to set.
    """
    # Imported here: local and bundled files need neither, and an image without them still trains on those.
    import datasets
    import huggingface_hub

    endpoint = huggingface_hub.constants.ENDPOINT
    what = f"dataset_name={dataset_name!r}, dataset_config={dataset_config!r}"
    force_offline = not hf_offline_mode() and not hub_reachable(endpoint)
    saved = datasets.config.HF_HUB_OFFLINE
    try:
        if force_offline:
            # Hub unreachable: only look in the local cache instead of letting datasets retry for ~25 s.
            datasets.config.HF_HUB_OFFLINE = True
        return datasets.load_dataset(dataset_name, dataset_config)
    except Exception as error:  # noqa: BLE001 - re-raised with the options to set
        if force_offline:
            reason = f"the hub at {endpoint} is unreachable and the dataset is not in the local Hugging Face cache"
        else:
            reason = f"{type(error).__name__}: {error}"
            if hf_offline_mode():
                reason += " (Hugging Face offline mode is on: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
        raise RuntimeError(f"Could not load the hub dataset ({what}): {reason}. " + _offline_hint()) from error
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


def read_text_lines(path: str) -> list[str]:
    """The documents of a local text file, one per line, exactly as ``datasets.load_dataset("text", ...)`` reads
    them: UTF-8, universal newlines (``\r\n`` and ``\r`` end a line too), line breaks removed, blank lines kept.
    """
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    # Write next to the target, then rename: a crashed or concurrent run never leaves a half-written cache file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


class WikiTextDataModule(ResumableTrainData, LightningDataModule):
    """WikiText (or any text) for causal language modelling with a byte-level BPE tokenizer trained on it.

    Batches are ``(inputs, targets)`` tuples of long tensors, shape ``(batch_size, block_size)``, with ``targets``
    the inputs shifted by one token. All ids are below ``vocab_size``; link ``data.vocab_size`` into the model.

    Without ``train_file`` the dataset is loaded from the Hugging Face Hub by name. Offline, point ``train_file``
    and ``val_file`` at local text files, or at the WikiText-2 splits shipped with the package:
    ``bundled:wikitext-2/valid.txt`` (train) and ``bundled:wikitext-2/test.txt`` (validation).

    Args:
        train_file: Local training text file (one document per line), or ``bundled:<name>`` for a file shipped with
            the package. ``None`` loads ``dataset_name`` from the hub.
        val_file: Local validation text file; ``None`` with ``train_file`` set means no validation data.
        test_file: Local test text file; ``None`` with ``train_file`` set means no test data.
        dataset_name: Hub dataset name, used when ``train_file`` is ``None``.
        dataset_config: Hub dataset configuration, used when ``train_file`` is ``None``.
        vocab_size: Tokenizer vocabulary size, including the 256 bytes and ``<|endoftext|>`` (>= 257).
        block_size: Tokens per example ``T`` (>= 1).
        batch_size: Examples per batch (>= 1).
        num_workers: DataLoader worker processes (>= 0).
        cache_dir: Where the tokenizer and token streams are cached. Default: ``.moe_lightning_cache`` next to
            a local ``train_file`` if that folder is writable, else ``$XDG_CACHE_HOME/moe_lightning`` (``~/.cache``).
        max_train_tokens: Keep only the first this many training tokens (short CPU runs); ``None`` keeps all.
        seed: Seeds the order of the training blocks.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        dataset_name: str = "wikitext",
        dataset_config: str | None = "wikitext-2-raw-v1",
        vocab_size: int = 8192,
        block_size: int = 128,
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str | None = None,
        max_train_tokens: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} (256 byte symbols + {END_OF_TEXT}), "
                f"got {vocab_size!r}"
            )
        for name, value in (("block_size", block_size), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer (>= 1), got {value!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative integer (>= 0), got {num_workers!r}")
        if max_train_tokens is not None and (not isinstance(max_train_tokens, int) or max_train_tokens <= block_size):
            raise ValueError(
                f"max_train_tokens must be None or an integer > block_size ({block_size}), got {max_train_tokens!r}"
            )
        files = {"train": train_file, "validation": val_file, "test": test_file}
        options = {"train": "train_file", "validation": "val_file", "test": "test_file"}
        if train_file is None and (val_file is not None or test_file is not None):
            raise ValueError(
                "val_file/test_file need train_file: set train_file too, or leave all three as None to load "
                f"dataset_name={dataset_name!r} from the hub. " + _offline_hint()
            )
        for split, path in files.items():
            try:
                files[split] = path = resolve_text_file(path)
            except ValueError as error:
                raise ValueError(f"{options[split]}={path!r}: {error}") from None
            if path is not None and not Path(path).is_file():
                raise ValueError(
                    f"{options[split]}={path!r} is not an existing file (resolved to {Path(path).resolve()}). "
                    f"Set {options[split]} to a local text file, e.g. "
                    f"{EXAMPLE_TRAIN_FILE if split == 'train' else EXAMPLE_VAL_FILE}."
                )
        self.save_hyperparameters()
        self.files = files
        self.dataset_name = dataset_name
        self.dataset_config = dataset_config
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.max_train_tokens = max_train_tokens
        self.seed = seed
        self.cache_root = Path(cache_dir) if cache_dir is not None else self._default_cache_root(files["train"])
        self.tokenizer: Tokenizer | None = None
        self.tokenizer_trained = False
        """Whether this process trained the tokenizer (``False`` when it was reused from the cache)."""
        self.streams: dict[str, torch.Tensor] = {}
        self.datasets: dict[str, TokenBlocks] = {}

    @staticmethod
    def _default_cache_root(train_file: str | None) -> Path:
        # The package's own data folder is never a cache: an installed package may be shared or read-only.
        if train_file is not None and not is_bundled(train_file):
            data_dir = Path(train_file).resolve().parent
            if os.access(data_dir, os.W_OK):
                return data_dir / ".moe_lightning_cache"
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moe_lightning"

    # ----------------------------------------------------------------------------------------------------- cache

    def _source_ids(self) -> dict[str, str] | None:
        """Content identity of each split, or ``None`` for hub data (known only once the dataset is loaded)."""
        if self.files["train"] is None:
            return None
        return {split: f"sha256:{_file_sha256(path)}" for split, path in self.files.items() if path is not None}

    def _hub_source_ids(self, raw: datasets.DatasetDict) -> dict[str, str]:
        name = f"hub:{self.dataset_name}/{self.dataset_config}"
        return {split: f"{name}/{split}:{raw[split]._fingerprint}" for split in _SPLITS if split in raw}

    def _cache_dir(self, source_ids: dict[str, str]) -> Path:
        key = json.dumps([CACHE_FORMAT, self.vocab_size, source_ids["train"]])
        return self.cache_root / f"bpe{self.vocab_size}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

    @staticmethod
    def _stream_path(cache_dir: Path, split: str, source_id: str) -> Path:
        return cache_dir / f"tokens-{split}-{hashlib.sha256(source_id.encode()).hexdigest()[:16]}.pt"

    def _load_raw(self) -> datasets.DatasetDict | dict[str, dict[str, list[str]]]:
        """Every split's documents, as ``raw[split]["text"]``."""
        if self.files["train"] is None:
            return load_hub_dataset(self.dataset_name, self.dataset_config)
        return {split: {"text": read_text_lines(path)} for split, path in self.files.items() if path is not None}

    # ------------------------------------------------------------------------------------------------- lightning

    def prepare_data(self) -> None:
        """Train and cache the tokenizer, then encode and cache every split; a no-op when the cache is complete."""
        source_ids = self._source_ids()
        if source_ids is not None and self._cache_complete(source_ids):
            return
        raw = self._load_raw()
        if source_ids is None:
            source_ids = self._hub_source_ids(raw)
            if "train" not in source_ids:
                raise RuntimeError(f"hub dataset {self.dataset_name!r} has no 'train' split; " + _offline_hint())
            if self._cache_complete(source_ids):
                return
        cache_dir = self._cache_dir(source_ids)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tokenizer_path = cache_dir / "tokenizer.json"
        if tokenizer_path.is_file():
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
        else:
            tokenizer = train_bpe_tokenizer(iter(raw["train"]["text"]), self.vocab_size)
            self.tokenizer_trained = True
            _atomic_write(tokenizer_path, lambda tmp: tokenizer.save(str(tmp)))
        for split, source_id in source_ids.items():
            path = self._stream_path(cache_dir, split, source_id)
            if not path.is_file():
                stream = encode_documents(tokenizer, raw[split]["text"])
                _atomic_write(path, lambda tmp, stream=stream: torch.save(stream, tmp))
        (cache_dir / "sources.json").write_text(json.dumps(source_ids, indent=1))

    def _cache_complete(self, source_ids: dict[str, str]) -> bool:
        cache_dir = self._cache_dir(source_ids)
        paths = [cache_dir / "tokenizer.json"]
        paths += [self._stream_path(cache_dir, split, source_id) for split, source_id in source_ids.items()]
        return all(path.is_file() for path in paths)

    def setup(self, stage: str | None = None) -> None:
        """Load the cached tokenizer and token streams (running :meth:`prepare_data` first if needed) into blocks."""
        if self.datasets:
            return
        source_ids = self._source_ids()
        if source_ids is None:
            # Hub data: the identity comes from the dataset fingerprint, which loading from the HF cache gives.
            source_ids = self._hub_source_ids(self._load_raw())
        if not self._cache_complete(source_ids):
            self.prepare_data()
        cache_dir = self._cache_dir(source_ids)
        self.tokenizer = Tokenizer.from_file(str(cache_dir / "tokenizer.json"))
        assert self.tokenizer.get_vocab_size() <= self.vocab_size, "BPE trainer exceeded its vocab_size target"
        for split, source_id in source_ids.items():
            stream = torch.load(self._stream_path(cache_dir, split, source_id))
            if split == "train" and self.max_train_tokens is not None:
                stream = stream[: self.max_train_tokens]
            self.streams[split] = stream
            self.datasets[split] = TokenBlocks(stream, self.block_size)

    @property
    def eot_id(self) -> int:
        """Id of ``<|endoftext|>``, the separator between documents (available after :meth:`setup`)."""
        if self.tokenizer is None:
            raise RuntimeError("call setup() before reading eot_id")
        return self.tokenizer.token_to_id(END_OF_TEXT)

    def _loader(self, split: str, shuffle: bool) -> DataLoader | list:
        self.setup()
        if split not in self.datasets:
            return []
        # The shuffled split keeps its place in checkpoints, so a resumed fit draws the batches it would have drawn.
        loader_class = ResumableDataLoader if shuffle else DataLoader
        return loader_class(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_blocks,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Training blocks, shuffled in an order seeded by ``seed``."""
        return self.resumable_train_loader(self._loader("train", shuffle=True))

    def val_dataloader(self) -> DataLoader | list:
        """Validation blocks in stream order (empty when there is no validation split)."""
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        """Test blocks in stream order (empty when there is no test split)."""
        return self._loader("test", shuffle=False)
