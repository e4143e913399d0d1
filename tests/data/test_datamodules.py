"""Tests for the DataModules: the synthetic Gaussian-mixture task and the WikiText pipeline on a tiny text file."""

from __future__ import annotations

import http.server
import random
import threading
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from moe_lightning.data import SyntheticMoEDataModule, WikiTextDataModule, bundled_file, bundled_names
from moe_lightning.data import wikitext as wikitext_module

SMALL = dict(num_clusters=4, input_dim=8, output_dim=5, num_train=2048, num_val=128, num_test=64, batch_size=32)


def _split_tensors(dm: SyntheticMoEDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    dm.setup()
    return dm.datasets[split].tensors


# --------------------------------------------------------------------------------------------------- synthetic


def test_synthetic_same_seed_gives_identical_data_and_order():
    first, second = SyntheticMoEDataModule(**SMALL, seed=3), SyntheticMoEDataModule(**SMALL, seed=3)
    for split in ("train", "val", "test"):
        for a, b in zip(_split_tensors(first, split), _split_tensors(second, split)):
            assert torch.equal(a, b)
    batch_a, batch_b = next(iter(first.train_dataloader())), next(iter(second.train_dataloader()))
    assert torch.equal(batch_a[0], batch_b[0]) and torch.equal(batch_a[1], batch_b[1])


def test_synthetic_does_not_touch_global_rng():
    state = torch.get_rng_state()
    SyntheticMoEDataModule(**SMALL).setup()
    assert torch.equal(state, torch.get_rng_state())


def test_synthetic_different_seed_gives_different_data():
    x0, y0 = _split_tensors(SyntheticMoEDataModule(**SMALL, seed=0), "train")
    x1, y1 = _split_tensors(SyntheticMoEDataModule(**SMALL, seed=1), "train")
    assert not torch.allclose(x0, x1) and not torch.allclose(y0, y1)


def test_synthetic_val_split_does_not_depend_on_train_size():
    x_small, _ = _split_tensors(SyntheticMoEDataModule(**{**SMALL, "num_train": 100}), "val")
    x_large, _ = _split_tensors(SyntheticMoEDataModule(**SMALL), "val")
    assert torch.equal(x_small, x_large)


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_synthetic_batches_shapes_and_dtypes(task):
    dm = SyntheticMoEDataModule(**SMALL, task=task)
    dm.setup("fit")
    assert (dm.input_dim, dm.output_dim, dm.task) == (8, 5, task)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert isinstance(batch, tuple) and len(batch) == 2
        x, y = batch
        assert x.shape == (32, 8) and x.dtype == torch.float32
        if task == "regression":
            assert y.shape == (32, 5) and y.dtype == torch.float32
        else:
            assert y.shape == (32,) and y.dtype == torch.long
            assert 0 <= int(y.min()) and int(y.max()) < 5
    train_x, _ = dm.datasets["train"].tensors
    x, _ = next(iter(dm.train_dataloader()))
    # The training order is shuffled: the first batch is made of training rows, but not the first 32 of them.
    assert not torch.equal(x, train_x[:32])
    assert all((row == train_x).all(dim=1).any() for row in x)


def _reference_teacher(dm: SyntheticMoEDataModule, x: torch.Tensor, cluster: torch.Tensor) -> torch.Tensor:
    """Per-sample loop with plain matrix products, independent of the module's batched einsum."""
    t = dm.teachers
    outputs = []
    for x_i, c in zip(x, cluster.tolist()):
        local = (x_i - t.means_CI[c]) / dm.cluster_spread
        hidden = torch.tanh(local @ t.hidden_weight_CIH[c] + t.hidden_bias_CH[c])
        outputs.append(hidden @ t.output_weight_CKO[c] + t.output_bias_CO[c])
    return torch.stack(outputs)


def test_synthetic_targets_match_reference_teacher():
    reg = SyntheticMoEDataModule(**SMALL, noise_std=0.0)
    x, y = _split_tensors(reg, "val")
    expected = _reference_teacher(reg, x, reg.cluster_labels("val"))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)

    cls = SyntheticMoEDataModule(**SMALL, noise_std=0.0, task="classification")
    x_c, y_c = _split_tensors(cls, "val")
    assert torch.equal(x_c, x)  # the task does not change the inputs
    assert torch.equal(y_c, expected.argmax(dim=-1))


def test_synthetic_noise_has_requested_std():
    dm = SyntheticMoEDataModule(**SMALL, noise_std=0.3)
    x, y = _split_tensors(dm, "train")
    residual = y - _reference_teacher(dm, x, dm.cluster_labels("train"))
    assert abs(residual.std().item() - 0.3) < 0.01  # 10240 draws: the std estimate is within ~0.7 % of 0.3


def _linear_fit_mse(x: np.ndarray, y: np.ndarray) -> float:
    design = np.hstack([x, np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    return float(np.mean((design @ coef - y) ** 2))


def test_synthetic_clusters_are_separated_and_have_different_teachers():
    dm = SyntheticMoEDataModule(**SMALL)
    x, y = (t.numpy().astype(np.float64) for t in _split_tensors(dm, "train"))
    cluster = dm.cluster_labels("train").numpy()
    # Well separated: every sample is nearest to its own cluster mean.
    means = dm.teachers.means_CI.numpy()
    nearest = np.argmin(((x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (nearest == cluster).all()
    # Different teachers: one linear map per cluster fits far better than one global map.
    global_mse = _linear_fit_mse(x, y)
    per_cluster_mse = sum(_linear_fit_mse(x[cluster == c], y[cluster == c]) * (cluster == c).sum() for c in range(4))
    per_cluster_mse /= len(x)
    assert per_cluster_mse < 0.3 * global_mse


def test_synthetic_linear_teacher_is_exactly_linear_per_cluster():
    dm = SyntheticMoEDataModule(**SMALL, teacher_hidden=0, noise_std=0.1)
    x, y = (t.numpy().astype(np.float64) for t in _split_tensors(dm, "train"))
    cluster = dm.cluster_labels("train").numpy()
    for c in range(4):
        # Only the noise is left (its variance is 0.01); least squares with 9 parameters per output shaves ~1 %.
        assert _linear_fit_mse(x[cluster == c], y[cluster == c]) == pytest.approx(0.01, rel=0.15)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("num_train", 0, ">= 1"),
        ("num_val", -1, ">= 1"),
        ("num_test", 0, ">= 1"),
        ("num_clusters", 0, ">= 1"),
        ("input_dim", 0, ">= 1"),
        ("output_dim", -2, ">= 1"),
        ("batch_size", 0, ">= 1"),
        ("teacher_hidden", -1, ">= 0"),
        ("num_workers", -1, ">= 0"),
        ("noise_std", -0.1, ">= 0"),
        ("cluster_spread", 0.0, "> 0"),
        ("task", "ranking", "('regression', 'classification')"),
    ],
)
def test_synthetic_rejects_bad_input(field, value, allowed):
    with pytest.raises(ValueError, match=field) as info:
        SyntheticMoEDataModule(**{field: value})
    assert allowed in str(info.value) and repr(value) in str(info.value)


def test_synthetic_classification_needs_two_classes():
    with pytest.raises(ValueError, match="output_dim.*>= 2"):
        SyntheticMoEDataModule(output_dim=1, task="classification")


def test_synthetic_cluster_labels_rejects_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        SyntheticMoEDataModule(**SMALL).cluster_labels("dev")


# ---------------------------------------------------------------------------------------------------- wikitext

WORDS = "the a lobster sea red blue claw shell eggs summer ocean of and is , . = <unk> 1 2 3 grows lives".split()


def _write_text(path: Path, num_lines: int, seed: int) -> Path:
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        if i % 7 == 0:
            lines.append(" ")  # WikiText's blank separator lines
        elif i % 7 == 1:
            lines.append(f" = {rng.choice(WORDS).title()} {rng.choice(WORDS)} = ")
        else:
            lines.append(" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))) + " ")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def text_files(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    return _write_text(data / "train.txt", 300, seed=0), _write_text(data / "val.txt", 80, seed=1)


def _make(text_files, cache_dir, **kwargs) -> WikiTextDataModule:
    train, val = text_files
    options = dict(train_file=str(train), val_file=str(val), vocab_size=300, block_size=16, batch_size=4)
    return WikiTextDataModule(**{**options, "cache_dir": str(cache_dir), **kwargs})


def _reference_stream(tokenizer: Tokenizer, path: Path) -> list[int]:
    """Encode the file line by line, one document per non-blank line, each followed by <|endoftext|>."""
    eot = tokenizer.token_to_id("<|endoftext|>")
    stream = []
    for line in path.read_text().splitlines():
        if line.strip():
            stream += tokenizer.encode(line).ids + [eot]
    return stream


def test_local_files_are_read_as_datasets_reads_them(tmp_path):
    """Local files are read without ``datasets`` (an image without it still trains on them): line for line what its
    "text" builder gives, for Windows and old-Mac line ends, blank lines, a last line without an end, non-ASCII."""
    path = tmp_path / "mixed.txt"
    path.write_bytes(" = Title = \r\n\r\nfirst  line\nsecond\rthird \u00e9\u4e2d\n\n \n  last without end".encode())
    loaded = datasets.load_dataset("text", data_files={"train": str(path)}, cache_dir=str(tmp_path / "hf"))
    expected = loaded["train"]["text"]
    assert wikitext_module.read_text_lines(str(path)) == list(expected)
    assert len(expected) == 8


def test_wikitext_blocks_are_shifted_token_stream(text_files, tmp_path):
    dm = _make(text_files, tmp_path / "cache")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tokenizer_trained
    (cache,) = (tmp_path / "cache").glob("bpe300-*")
    tokenizer = Tokenizer.from_file(str(cache / "tokenizer.json"))
    assert tokenizer.get_vocab_size() <= 300
    assert tokenizer.token_to_id("<|endoftext|>") == dm.eot_id

    # Validation loader, in stream order: block i is stream[16 i : 16 i + 17], inputs and targets shifted by one.
    reference = torch.tensor(_reference_stream(tokenizer, text_files[1]))
    batches = list(dm.val_dataloader())
    assert all(isinstance(b, tuple) and b[0].shape == b[1].shape for b in batches)
    assert batches[0][0].shape == (4, 16) and batches[0][0].dtype == torch.long
    inputs, targets = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    num_blocks = (len(reference) - 1) // 16
    assert inputs.shape == (num_blocks, 16)
    assert torch.equal(inputs.flatten(), reference[: num_blocks * 16])
    assert torch.equal(targets.flatten(), reference[1 : num_blocks * 16 + 1])

    # Training loader, shuffled: every reference block appears exactly once.
    reference_train = torch.tensor(_reference_stream(tokenizer, text_files[0]))
    expected = sorted(
        tuple(reference_train[i * 16 : i * 16 + 17].tolist()) for i in range((len(reference_train) - 1) // 16)
    )
    seen = sorted(
        tuple(x_row.tolist()) + (int(y_row[-1]),)
        for x, y in dm.train_dataloader()
        for x_row, y_row in zip(x, y)
        if torch.equal(x_row[1:], y_row[:-1])
    )
    assert seen == expected
    assert max(int(dm.streams["train"].max()), int(dm.streams["validation"].max())) < 300

    # Byte-level BPE is lossless on every line.
    line = text_files[0].read_text().splitlines()[3]
    assert tokenizer.decode(tokenizer.encode(line).ids) == line


def test_wikitext_is_deterministic_and_seeds_the_shuffle(text_files, tmp_path):
    # Separate caches: the tokenizer is trained twice, and must come out the same.
    first, second = _make(text_files, tmp_path / "a"), _make(text_files, tmp_path / "b")
    other_seed = _make(text_files, tmp_path / "a", seed=1)
    for dm in (first, second, other_seed):
        dm.setup("fit")
    assert first.tokenizer_trained and second.tokenizer_trained
    assert (tmp_path / "a").glob("*/tokenizer.json").__next__().read_text() == next(
        (tmp_path / "b").glob("*/tokenizer.json")
    ).read_text()
    assert torch.equal(first.streams["train"], second.streams["train"])
    order_first = torch.cat([x for x, _ in first.train_dataloader()])
    order_second = torch.cat([x for x, _ in second.train_dataloader()])
    order_other = torch.cat([x for x, _ in other_seed.train_dataloader()])
    assert torch.equal(order_first, order_second)
    assert not torch.equal(order_first, order_other)


def test_wikitext_second_run_reuses_cache(text_files, tmp_path):
    first = _make(text_files, tmp_path / "cache")
    first.prepare_data()
    first.setup("fit")
    files = sorted((tmp_path / "cache").glob("bpe300-*/*.*"))
    assert {f.name.split("-")[0] for f in files} >= {"tokenizer.json", "tokens"}
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    second = _make(text_files, tmp_path / "cache")
    second.prepare_data()
    second.setup("fit")
    assert first.tokenizer_trained and not second.tokenizer_trained
    assert {f: f.stat().st_mtime_ns for f in files} == mtimes
    assert torch.equal(first.streams["train"], second.streams["train"])

    # A different vocab_size or different training text gets its own cache entry.
    _make(text_files, tmp_path / "cache", vocab_size=280).prepare_data()
    _write_text(text_files[0], 300, seed=5)
    changed = _make(text_files, tmp_path / "cache")
    changed.prepare_data()
    assert changed.tokenizer_trained
    assert len(list((tmp_path / "cache").glob("bpe*/tokenizer.json"))) == 3


def test_wikitext_default_cache_is_next_to_the_data(text_files):
    dm = WikiTextDataModule(train_file=str(text_files[0]), vocab_size=260, block_size=8)
    dm.setup("fit")
    assert dm.cache_root == text_files[0].parent / ".moe_lightning_cache"
    assert len(list(dm.cache_root.glob("bpe260-*/tokenizer.json"))) == 1
    assert dm.val_dataloader() == [] and dm.test_dataloader() == []


def test_wikitext_max_train_tokens_truncates(text_files, tmp_path):
    dm = _make(text_files, tmp_path / "cache", max_train_tokens=100)
    dm.setup("fit")
    assert dm.streams["train"].numel() == 100
    assert len(dm.datasets["train"]) == (100 - 1) // 16


def test_wikitext_missing_file_names_option_and_path(tmp_path, text_files):
    missing = tmp_path / "nope" / "train.txt"
    with pytest.raises(ValueError, match="train_file") as info:
        WikiTextDataModule(train_file=str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(ValueError, match="val_file") as info:
        WikiTextDataModule(train_file=str(text_files[0]), val_file=str(missing))
    assert str(missing) in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("vocab_size", 256), ("block_size", 0), ("batch_size", 0), ("num_workers", -1), ("max_train_tokens", 5)],
)
def test_wikitext_rejects_bad_sizes(field, value, text_files):
    with pytest.raises(ValueError, match=field):
        WikiTextDataModule(train_file=str(text_files[0]), **{"block_size": 8, field: value})


def test_wikitext_block_size_longer_than_split(text_files, tmp_path):
    dm = _make(text_files, tmp_path / "cache", block_size=100_000)
    with pytest.raises(ValueError, match="block_size=100000"):
        dm.setup("fit")


def _assert_offline_message(message: str) -> None:
    for needle in (
        "train_file",
        "val_file",
        "bundled:wikitext-2/valid.txt",
        "bundled:wikitext-2/test.txt",
    ):
        assert needle in message


def test_wikitext_unreachable_hub_fails_fast_with_options(monkeypatch, tmp_path):
    probed = []
    monkeypatch.setattr(wikitext_module, "hub_reachable", lambda endpoint: probed.append(endpoint) or False)
    dm = WikiTextDataModule(dataset_name="moe-lightning-test/does-not-exist", cache_dir=str(tmp_path))
    offline_before = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(RuntimeError, match="unreachable") as info:
        dm.prepare_data()
    _assert_offline_message(str(info.value))
    assert probed and datasets.config.HF_HUB_OFFLINE == offline_before  # the temporary offline switch is undone


def test_wikitext_hf_offline_mode_gives_options(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(wikitext_module, "hub_reachable", lambda endpoint: pytest.fail("offline mode must not probe"))
    dm = WikiTextDataModule(dataset_name="moe-lightning-test/does-not-exist", cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="offline mode") as info:
        dm.setup("fit")
    _assert_offline_message(str(info.value))


def test_hub_probe_against_local_endpoints(monkeypatch):
    # A proxy from the environment would answer for a closed local port.
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - http.server's naming
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert wikitext_module.hub_reachable(f"http://127.0.0.1:{server.server_port}", timeout_s=2.0)
    finally:
        server.shutdown()
        server.server_close()
    # The port is closed now: connection refused means unreachable.
    assert not wikitext_module.hub_reachable(f"http://127.0.0.1:{server.server_port}", timeout_s=2.0)


# ----------------------------------------------------------------------------------------------------- bundled

BUNDLED_README = Path(__file__).resolve().parents[2] / "moe_lightning" / "data" / "wikitext-2" / "README.md"


@pytest.mark.parametrize("name", ["wikitext-2/valid.txt", "wikitext-2/test.txt"])
def test_bundled_files_are_the_published_wikitext_splits(name):
    import hashlib
    import re

    path = bundled_file(name)
    assert path.is_file() and bundled_file("bundled:" + name) == path
    # The checksums the data README records for the published files (independent of the loader).
    recorded = dict(re.findall(r"`(\w+\.txt)` ([0-9a-f]{64})", BUNDLED_README.read_text()))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == recorded[path.name]
    assert bundled_names() == ["wikitext-2/test.txt", "wikitext-2/valid.txt"]


def test_bundled_unknown_name_lists_the_files():
    with pytest.raises(ValueError, match="wikitext-2/valid.txt"):
        bundled_file("wikitext-103/train.txt")
    with pytest.raises(ValueError, match="train_file='bundled:nope.txt'"):
        WikiTextDataModule(train_file="bundled:nope.txt")


def test_wikitext_bundled_split_trains_and_caches_outside_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    dm = WikiTextDataModule(
        train_file="bundled:wikitext-2/valid.txt", vocab_size=300, block_size=16, max_train_tokens=2000
    )
    # Never a cache inside the installed package, even where its folder is writable.
    assert dm.cache_root == tmp_path / "xdg" / "moe_lightning"
    assert dm.hparams.train_file == "bundled:wikitext-2/valid.txt"  # the portable name, not this machine's path
    dm.setup("fit")
    assert dm.files["train"] == str(bundled_file("wikitext-2/valid.txt"))
    # The stream starts with the first non-blank line of the file, encoded by the cached tokenizer.
    first_line = next(line for line in bundled_file("wikitext-2/valid.txt").read_text().splitlines() if line.strip())
    expected = dm.tokenizer.encode(first_line).ids
    assert dm.streams["train"][: len(expected)].tolist() == expected
