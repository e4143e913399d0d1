"""W&B without network: an offline run of GeometryMonitor + RouterMonitor writes the geometry keys, histograms,
tables and heatmaps into its run directory (read back from the ``.wandb`` transaction log), and
``resolve_wandb_offline`` falls back to offline without credentials or without a reachable server."""

from __future__ import annotations

import csv
import json
import socket
import struct
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.utils.data import TensorDataset

wandb = pytest.importorskip("wandb")

from moe_lightning.callbacks import CurvatureMonitor, GeometryMonitor, RouterMonitor  # noqa: E402
from moe_lightning.lightning.loggers import AutoWandbLogger, resolve_wandb_offline  # noqa: E402
from moe_lightning.lightning.modules import MLPMoEModule  # noqa: E402
from moe_lightning.nn.models import MLPMoEConfig  # noqa: E402

WANDB_ENV = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL")


@pytest.fixture
def clean_wandb_env(monkeypatch, tmp_path):
    """No W&B variables, and a HOME without ~/.netrc, so the test sees no credentials of the machine."""
    for name in WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))


def read_transaction_log(path: Path) -> list:
    """Records of a ``.wandb`` file. It is a LevelDB-style log: a 7-byte W&B header, then 32 KiB blocks of chunks
    ``crc32 (4) | length (2) | type (1: full, 2: first, 3: middle, 4: last) | payload``; each record is a
    ``wandb_internal_pb2.Record`` protobuf (wandb 0.31 has no Python reader of its own any more)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    block, pos, payloads, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer too short for a header: padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
            pending = b""
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def history_rows(records: list) -> list[dict[str, str]]:
    """Each ``run.log`` call as ``{key: value_json}``; media keys are flattened (``key/_type``, ...)."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({"/".join(i.nested_key) if i.nested_key else i.key: i.value_json for i in record.history.item})
    return rows


def tiny_fit(loggers: list, max_steps: int = 2, background: bool = False) -> MLPMoEModule:
    torch.manual_seed(0)
    config = MLPMoEConfig(
        routing="topk", input_dim=4, output_dim=2, dim=8, expert_hidden=8, num_experts=4, top_k=2, num_blocks=1
    )
    module = MLPMoEModule(config, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    data = L.LightningDataModule.from_datasets(
        train_dataset=TensorDataset(torch.randn(64, 4, generator=gen), torch.randn(64, 2, generator=gen)),
        val_dataset=TensorDataset(torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)),
        batch_size=16,
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=loggers,
        callbacks=[
            GeometryMonitor(every_n_steps=1, max_tokens=16, subspace_rank=2, background=background),
            RouterMonitor(log_every_n_steps=1, max_expert_keys=2),  # experts 2 and 3 go to the W&B table
            # Each callback defines the W&B step metric of its own keys, so curvature/* needs its monitor.
            CurvatureMonitor(every_n_steps=1000, at_fit_start=False),
        ],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, data)
    return module


@pytest.mark.integration  # a fit logged through W&B's service process
@pytest.mark.parametrize(
    "auto, background",
    [(False, False), (True, False), (False, True)],
    # beside training, the probes of steps 0 and 1 are logged a step later, each at the step it describes
    ids=["WandbLogger", "AutoWandbLogger", "WandbLogger, probes beside training"],
)
def test_offline_run_directory_holds_geometry_keys_and_media(tmp_path, clean_wandb_env, monkeypatch, auto, background):
    if auto:
        monkeypatch.setenv("WANDB_MODE", "offline")
        run_logger = AutoWandbLogger(save_dir=str(tmp_path), project="moe-lightning-test")
    else:
        run_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="moe-lightning-test")
    try:
        tiny_fit([run_logger, CSVLogger(tmp_path / "csv")], background=background)
    finally:
        wandb.finish()
        wandb.teardown()  # finish() can return before the service has flushed the end of the .wandb file
    (log_file,) = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    records = read_transaction_log(log_file)
    assert records[-1].WhichOneof("record_type") == "exit", "the transaction log was read before W&B finished it"
    rows = history_rows(records)

    # every scalar key the CSV logger got also went to W&B, with the same value at the same step
    with open(next((tmp_path / "csv").rglob("metrics.csv"))) as f:
        csv_rows = list(csv.DictReader(f))
    geometry_csv = {
        (int(r["step"]), k): float(v)
        for r in csv_rows
        for k, v in r.items()
        if (k.startswith("geometry/") or k.startswith("router/")) and v not in (None, "")
    }
    geometry_wandb = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(("geometry/", "router/")) and isinstance(json.loads(value), (int, float)):
                geometry_wandb[int(json.loads(row["trainer/global_step"])), key] = float(json.loads(value))
    assert {k for _, k in geometry_csv} >= {
        "geometry/blocks.0.ffn/jac_sigma_max/mean",
        "geometry/blocks.0.ffn/pca_input_effective_rank/e3",
        "router/blocks.0.ffn/load_cv",
    }
    assert {step for step, _ in geometry_csv} == {0, 1, 2}
    for key, value in geometry_csv.items():
        assert geometry_wandb[key] == pytest.approx(value, rel=1e-6), key

    # media: spectra histograms, the spectra table and heatmap images at every probe
    media = {}
    for row in rows:
        for key, value in row.items():
            if key.endswith("/_type"):
                media.setdefault(key[: -len("/_type")], []).append(value.strip('"'))
    assert media["geometry/blocks.0.ffn/jac_spectrum_hist"] == ["histogram"] * 3
    assert media["geometry/spectra"] == ["table-file"] * 3
    heatmaps = [k for k in media if k.startswith("geometry/") and k.endswith("_heatmap")]
    assert "geometry/blocks.0.ffn/align_mean_jacobian_heatmap" in heatmaps
    assert all(media[k] == ["image-file"] * 3 for k in heatmaps)
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/geometry/blocks.0.ffn/*.png"))
    # RouterMonitor (windows of steps 0 and 1): the loads past max_expert_keys in a table, which completes the
    # logged ones to 1, and the co-activation matrix of top-2 routing
    assert media["router/expert_loads"] == ["table-file"] * 2
    assert media["router/blocks.0.ffn/coactivation_heatmap"] == ["image-file"] * 2
    tables = list(tmp_path.glob("wandb/offline-run-*/files/media/table/router/expert_loads_*.table.json"))
    table_rows = [row for path in tables for row in json.loads(path.read_text())["data"]]
    assert sorted((step, expert) for step, _, expert, _ in table_rows) == [(s, e) for s in (0, 1) for e in (2, 3)]
    for step in (0, 1):
        logged = sum(geometry_csv[step, f"router/blocks.0.ffn/load/e{e}"] for e in (0, 1))
        assert (step, "router/blocks.0.ffn/load/e2") not in geometry_csv
        tabled = sum(load for s, layer, _, load in table_rows if s == step and layer == "blocks.0.ffn")
        assert logged + tabled == pytest.approx(1.0, rel=1e-6)

    # define_metric: geometry/router/curvature charts use trainer/global_step
    step_metrics = {
        r.metric.glob_name: r.metric.step_metric
        for r in records
        if r.WhichOneof("record_type") == "metric" and r.metric.glob_name
    }
    for prefix in ("geometry/*", "router/*", "curvature/*"):
        assert step_metrics[prefix] == "trainer/global_step"


@pytest.mark.integration  # a fit logged through W&B's service process
def test_offline_run_holds_curvature_scalars_and_density_histograms(tmp_path, clean_wandb_env):
    torch.manual_seed(0)
    module = MLPMoEModule(
        MLPMoEConfig(routing="soft", input_dim=4, output_dim=2, dim=8, expert_hidden=4, num_experts=2)
    )
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(
        TensorDataset(torch.randn(32, 4, generator=gen), torch.randn(32, 2, generator=gen)), batch_size=16
    )
    run_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="moe-lightning-test")
    monitor = CurvatureMonitor(every_n_steps=2, density_steps=10, param_groups={"router": "*router*"})
    try:
        L.Trainer(
            max_steps=2,
            logger=[run_logger],
            callbacks=[monitor],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(module, data)
    finally:
        wandb.finish()
        wandb.teardown()
    (log_file,) = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    rows = history_rows(read_transaction_log(log_file))
    media, scalars = {}, {}
    for row in rows:
        for key, value in row.items():
            if key.endswith("/_type"):
                media.setdefault(key[: -len("/_type")], []).append(value.strip('"'))
            elif key in ("curvature/hessian_eigenvalue/0", "curvature/router/hessian_trace"):
                scalars.setdefault(key, []).append(json.loads(row["trainer/global_step"]))
    assert media["curvature/hessian_density"] == ["histogram"] * 2  # fit start and step 2
    assert media["curvature/router/hessian_density"] == ["histogram"] * 2
    assert media["curvature/density"] == ["table-file"] * 2
    assert scalars == {"curvature/hessian_eigenvalue/0": [0, 2], "curvature/router/hessian_trace": [0, 2]}


def test_resolve_offline_without_credentials(clean_wandb_env):
    offline, reason = resolve_wandb_offline()
    assert offline and "credentials" in reason


def test_resolve_respects_explicit_choice_and_wandb_mode(clean_wandb_env, monkeypatch):
    assert resolve_wandb_offline(True) == (True, "set explicitly")
    assert resolve_wandb_offline(False) == (False, "set explicitly")
    for mode in ("offline", "dryrun", "disabled", "OFFLINE"):
        monkeypatch.setenv("WANDB_MODE", mode)
        assert resolve_wandb_offline()[0] is True
    monkeypatch.setenv("WANDB_MODE", "online")  # online wins even without credentials: the user asked for it
    assert resolve_wandb_offline() == (False, "WANDB_MODE=online")


def test_resolve_offline_when_server_unreachable(clean_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing listens, refused at once
    offline, reason = resolve_wandb_offline()
    assert offline and "unreachable" in reason and "127.0.0.1:9" in reason


def test_resolve_online_with_credentials_and_reachable_server(clean_wandb_env, monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert resolve_wandb_offline() == (False, "credentials found and server reachable")


def test_resolve_reads_netrc_credentials(clean_wandb_env, monkeypatch, tmp_path):
    netrc_file = tmp_path / ".netrc"
    netrc_file.write_text("machine 127.0.0.1\n  login user\n  password secret\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    offline, reason = resolve_wandb_offline()
    assert offline and "unreachable" in reason  # credentials were found, so the server was tried


def test_auto_logger_warns_and_goes_offline(clean_wandb_env, tmp_path):
    with pytest.warns(UserWarning, match="W&B runs offline .*no W&B credentials"):
        logger = AutoWandbLogger(save_dir=str(tmp_path / "runs"))
    assert logger._offline is True
