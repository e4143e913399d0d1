"""``moe-lightning probe`` on tiny random Hugging Face MoE checkpoints saved to disk (no download, no network).

The reference numbers come from an independent path: the model object kept in memory (not the reloaded
checkpoint), token ids from encoding the text file line by line, a plain forward hook on each MoE block, and
``moe_lightning.geometry.probe`` called directly.

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim, ``r`` matrix-free rank.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import tiny_hf_model  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from moe_lightning.adapters import find_moe_layers  # noqa: E402
from moe_lightning.adapters.hf_families import supported_model_types, tiny_model  # noqa: E402
from moe_lightning.commands.probe import default_out_dir, main, pack_blocks, probe_pretrained  # noqa: E402
from moe_lightning.data import bundled_file  # noqa: E402
from moe_lightning.geometry import GeometryReport, ProbeConfig, probe  # noqa: E402
from moe_lightning.geometry.alignment import sampled_pairs  # noqa: E402

WIKITEXT = bundled_file("wikitext-2/valid.txt").parent
D = 32
COMMON = dict(
    vocab_size=300,
    hidden_size=D,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    num_experts_per_tok=2,
    max_position_embeddings=128,
    initializer_range=0.2,
)
MAX_TOKENS, SEQ_LEN = 64, 24  # blocks of 24, 24 and 16 tokens: two batches, one short
MIXTRAL_LAYERS = ["model.layers.0.mlp", "model.layers.1.mlp"]
SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "qwen3_next", "glm4_moe")
EXPERTS_FAMILIES = ("deepseek_v3", "gpt_oss", "qwen3_next")  # saved as tiny checkpoints of the experts interface
# the CLI's reports against a direct probe: the same float64 computation, NaN where an expert saw no tokens
assert_same = functools.partial(torch.testing.assert_close, rtol=1e-10, atol=1e-10, equal_nan=True)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def save_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer (vocab 300) trained on WikiText-2 validation lines."""
    lines = (WIKITEXT / "valid.txt").read_text(encoding="utf-8").splitlines()[:400]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(
        directory
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("probe")
    text = root / "text.txt"
    # The first lines of the test split, blank lines included (the CLI drops them).
    text.write_text("\n".join((WIKITEXT / "test.txt").read_text(encoding="utf-8").splitlines()[:60]) + "\n")
    models_: dict[str, torch.nn.Module] = {}
    for family, extra in (
        ("mixtral", dict(num_local_experts=4)),
        ("qwen2_moe", dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=48)),
    ):
        model = tiny_hf_model(family, **COMMON, **extra).eval()
        model.save_pretrained(root / family)
        save_tokenizer(root / family)
        models_[family] = model
    # A dense (non-MoE) model: its config alone, so the check must come before any weight is loaded.
    transformers.LlamaConfig(**{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}).save_pretrained(
        root / "llama"
    )
    return {"root": root, "text": text, "models": models_}


def reference_stream(model_dir: Path, text: Path, max_tokens: int) -> torch.Tensor:
    """Token ids of the file's non-empty lines, each encoded on its own, concatenated and cut to ``max_tokens``."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids: list[int] = []
    for line in text.read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids.extend(tokenizer(line)["input_ids"])
    return torch.tensor(ids[:max_tokens])


def reference_reports(
    model, stream: torch.Tensor, seq_len: int, layers: str | None = None
) -> dict[str, GeometryReport]:
    """Capture each MoE block's input with a plain forward hook on blocks of ``seq_len``; probe it directly."""
    views = find_moe_layers(model, layers)
    captured: dict[int, list[torch.Tensor]] = {id(v.module): [] for v in views}
    handles = [
        v.module.register_forward_hook(lambda m, args, out: captured[id(m)].append(args[0].reshape(-1, D)))
        for v in {id(v.module): v for v in views}.values()
    ]
    n_full = stream.numel() // seq_len * seq_len
    with torch.no_grad():
        model(input_ids=stream[:n_full].reshape(-1, seq_len))
        if n_full < stream.numel():
            model(input_ids=stream[n_full:].reshape(1, -1))
    for handle in handles:
        handle.remove()
    cfg = ProbeConfig(dtype=torch.float64)
    return {v.name: probe(v, torch.cat(captured[id(v.module)]), cfg) for v in views}


@pytest.fixture(scope="module")
def mixtral_run(workspace) -> dict:
    out = workspace["root"] / "out-mixtral"
    argv = [str(workspace["root"] / "mixtral"), "--text", str(workspace["text"]), "--max-tokens", str(MAX_TOKENS)]
    code, stdout, stderr = run_cli([*argv, "--seq-len", str(SEQ_LEN), "--batch-size", "2", "--out", str(out)])
    assert code == 0, stderr
    data = json.loads((out / "probe.json").read_text())
    return {"out": out, "stdout": stdout, "data": data}


@pytest.mark.integration  # `moe-lightning probe` end to end
def test_probe_json_matches_a_direct_probe(workspace, mixtral_run) -> None:
    data = mixtral_run["data"]
    assert data["model"] == str(workspace["root"] / "mixtral")
    assert data["model_type"] == "mixtral"
    assert data["tokens"] == MAX_TOKENS
    assert data["config"]["max_tokens"] == MAX_TOKENS and data["config"]["seq_len"] == SEQ_LEN
    assert list(data["layers"]) == MIXTRAL_LAYERS

    stream = reference_stream(workspace["root"] / "mixtral", workspace["text"], MAX_TOKENS)
    assert stream.numel() == MAX_TOKENS  # the text is long enough
    expected = reference_reports(workspace["models"]["mixtral"], stream, SEQ_LEN)
    for name in MIXTRAL_LAYERS:
        got = GeometryReport.from_dict(data["layers"][name])
        ref = expected[name]
        assert got.total_tokens == MAX_TOKENS == ref.total_tokens
        assert torch.equal(got.tokens, ref.tokens)
        for key in ("jac_sigma_max", "jac_effective_rank", "jac_decay_slope", "pca_hidden_effective_rank"):
            assert_same(got.expert[key], ref.expert[key], msg=key)
        for key in ("align_mean_offdiag", "align_ratio", "palign_mean_offdiag", "layer_jac_sigma_max"):
            assert math.isclose(got.layer[key], ref.layer[key], rel_tol=1e-10), key
        assert_same(got.spectra["jac_mean_spectrum"], ref.spectra["jac_mean_spectrum"])
        assert_same(got.matrices["align_mean_jacobian"], ref.matrices["align_mean_jacobian"])
        # The printed summary shows sigma_max averaged over the experts that saw tokens.
        assert f"{float(ref.expert['jac_sigma_max'].nanmean()):.4g}" in mixtral_run["stdout"]
    assert str(mixtral_run["out"] / "probe.json") in mixtral_run["stdout"]
    assert (mixtral_run["out"] / "index.html").is_file()  # written by moe_lightning.report.render_probe


def heatmaps_of(page: str, kind: str) -> list[np.ndarray]:
    """The matrices of the page's heatmap chart ``kind``, as plotly stores them (float64 bytes in base64)."""
    chart = page.split(f'<div class="chart" data-kind="{kind}"', 1)[1].split('<div class="chart"', 1)[0]
    found = re.findall(r'"z":\{"dtype":"f8","bdata":"([^"]*)","shape":"(\d+), (\d+)"\}', chart)
    return [
        np.frombuffer(base64.b64decode(json.loads(f'"{data}"')), dtype=np.float64).reshape(int(rows), int(cols))
        for data, rows, cols in found
    ]


@pytest.mark.integration  # `moe-lightning probe` end to end
def test_page_shows_the_alignment_and_subspaces_of_probe_json(mixtral_run) -> None:
    """Per layer, the alignment matrix against chance and the functional and representational subspace overlaps
    side by side: in probe.json, the layer's own report values; on the page, the same numbers."""
    data = mixtral_run["data"]
    outputs = data["alignment_and_subspaces"]
    assert list(outputs) == MIXTRAL_LAYERS
    page = (mixtral_run["out"] / "index.html").read_text()
    section = page.split(">Alignment and subspaces</h2>", 1)[1].split("<h2", 1)[0]
    shown = heatmaps_of(section, "subspaces")
    assert len(shown) == 3 * len(MIXTRAL_LAYERS)
    for index, name in enumerate(MIXTRAL_LAYERS):
        layer, out = data["layers"][name], outputs[name]
        alignment, subspaces = out["alignment"], out["subspace_overlap"]
        assert out["num_experts"] == 4
        assert_same_values(alignment["matrix"], layer["matrices"]["align_mean_jacobian"])
        assert_same_values(subspaces["functional"]["matrix"], layer["matrices"]["subspace_fun_overlap"])
        assert_same_values(subspaces["representational"]["matrix"], layer["matrices"]["subspace_rep_overlap"])
        for kind, part in (("alignment", alignment), *subspaces_of(subspaces)):
            matrix = np.array(part["matrix"])
            offdiag = matrix[~np.eye(4, dtype=bool)]
            assert part["mean_offdiag"] == pytest.approx(np.nanmean(offdiag), rel=1e-12), kind
            assert part["max_offdiag"] == pytest.approx(np.nanmax(offdiag), rel=1e-12), kind
        assert alignment["ratio"] == pytest.approx(alignment["mean_offdiag"] / alignment["chance"], rel=1e-12)
        assert subspaces["chance"] == subspaces["rank"] / D  # r/d
        # the page: the three matrices of the layer, bit for bit, and its row of the table
        for position, matrix in enumerate(
            (alignment["matrix"], subspaces["functional"]["matrix"], subspaces["representational"]["matrix"])
        ):
            np.testing.assert_array_equal(shown[3 * index + position], np.array(matrix))
        row = re.search(rf"<tr>\s*<td>{re.escape(name)}</td>(.*?)</tr>", section, flags=re.DOTALL).group(1)
        cells = re.findall(r"<td>(.*?)</td>", row)
        values = [out["num_experts"], alignment["mean_offdiag"], alignment["chance"], alignment["ratio"]]
        values += [subspaces["functional"]["mean_offdiag"], subspaces["representational"]["mean_offdiag"]]
        values += [subspaces["chance"], subspaces["rank"]]
        assert cells == [f"{float(v):.4g}" for v in values]


def subspaces_of(subspaces: dict) -> list[tuple[str, dict]]:
    return [(kind, subspaces[kind]) for kind in ("functional", "representational")]


@pytest.mark.integration  # `moe-lightning probe` end to end
def test_probe_json_holds_the_experts_weight_spectra(workspace, mixtral_run) -> None:
    from moe_lightning.geometry.weight_spectra import fit_power_law, matrix_eigenvalues

    weights = mixtral_run["data"]["weights"]
    assert list(weights) == MIXTRAL_LAYERS
    model = workspace["models"]["mixtral"]  # the in-memory model, not the checkpoint the command read
    for index, name in enumerate(MIXTRAL_LAYERS):
        experts = model.model.layers[index].mlp.experts  # gate_up_proj (E, 2H, D), down_proj (E, D, H)
        hidden = experts.down_proj.shape[-1]
        matrices = {
            "w_gate": experts.gate_up_proj[:, :hidden],
            "w_up": experts.gate_up_proj[:, hidden:],
            "w_out": experts.down_proj,
        }
        layer = weights[name]
        assert layer["num_experts"] == 4 and set(layer["values"]) == set(matrices)
        for matrix, weight_E in matrices.items():
            for e in range(4):
                eigenvalues = matrix_eigenvalues(weight_E[e].detach())
                fit = fit_power_law(eigenvalues)
                assert layer["values"][matrix]["alpha"][e] == pytest.approx(fit.alpha, rel=1e-12)
                assert layer["values"][matrix]["spectral_norm"][e] == pytest.approx(
                    float(eigenvalues[-1].sqrt()), rel=1e-12
                )
            esd = layer["esd"][matrix]
            assert len(esd["density"]) == 4 and len(esd["log10_edges"]) == len(esd["density"][0]) + 1


@pytest.mark.integration  # `moe-lightning probe` end to end
def test_matrix_free_path_matches_the_exact_top_values(workspace, mixtral_run) -> None:
    layer, rank = MIXTRAL_LAYERS[1], 4
    out = workspace["root"] / "out-matrix-free"
    code, _, stderr = run_cli(
        [
            str(workspace["root"] / "mixtral"),
            *("--text", str(workspace["text"]), "--max-tokens", str(MAX_TOKENS), "--seq-len", str(SEQ_LEN)),
            *("--batch-size", "2", "--layers", layer, "--out", str(out)),
            *("--matrix-free-threshold", "16", "--matrix-free-rank", str(rank)),  # D = 32 > 16
            *("--memory-budget-mib", "1"),  # chunks of ~15 of the 64 tokens instead of one: values must not move
            *("--pointwise-alignment-pairs", "3"),  # of the 4 experts' 6 pairs
        ]
    )
    assert code == 0, stderr
    data = json.loads((out / "probe.json").read_text())
    assert data["config"]["memory_budget_mib"] == 1 and data["config"]["pointwise_alignment_pairs"] == 3
    assert list(data["layers"]) == [layer]
    free = GeometryReport.from_dict(data["layers"][layer])
    exact = GeometryReport.from_dict(mixtral_run["data"]["layers"][layer])
    assert free.variants["jac_source"] == f"matrix_free_topr(r={rank})"
    assert free.spectra["jac_mean_spectrum"].shape == (4, rank)
    torch.testing.assert_close(
        free.spectra["jac_mean_spectrum"],
        exact.spectra["jac_mean_spectrum"][:, :rank],
        rtol=1e-6,
        atol=0,
        equal_nan=True,
    )
    torch.testing.assert_close(
        free.spectra["layer_jac_mean_spectrum"],
        exact.spectra["layer_jac_mean_spectrum"][:rank],
        rtol=1e-6,
        atol=0,
        equal_nan=True,
    )
    torch.testing.assert_close(
        free.expert["jac_sigma_max"], exact.expert["jac_sigma_max"], rtol=1e-6, atol=0, equal_nan=True
    )
    # The experts' factors give the mean-Jacobian alignment exactly at any width (docs/geometry.md).
    for key in ("align_mean_offdiag", "subspace_fun_overlap"):
        assert free.layer[key] == pytest.approx(exact.layer[key], rel=1e-6), key
    # the pointwise alignment of the 3 sampled pairs, each exact to the float32 Grams' rounding; the others not
    # reported
    pairs = sampled_pairs(4, 3, seed=0)
    sampled, every = free.matrices["align_pointwise"], exact.matrices["align_pointwise"]
    torch.testing.assert_close(sampled[pairs], every[pairs], rtol=1e-6, atol=0)
    assert bool(sampled[~pairs].isnan().all()) and "palign_max_offdiag" not in free.layer
    assert free.layer["palign_mean_offdiag"] == pytest.approx(float(every[torch.triu(pairs, 1)].mean()), rel=1e-6)
    assert free.variants["palign"].endswith("_sampled_pairs=3_of_6_grams_float32")
    # every token's top values converged, and the counts survive probe.json
    assert free.expert["jac_unconverged"].tolist() == [0.0] * 4 and free.layer["layer_jac_unconverged"] == 0.0


@pytest.mark.integration  # `moe-lightning probe` end to end
def test_qwen2_moe_with_shared_expert_end_to_end(workspace) -> None:
    out = workspace["root"] / "out-qwen"
    model_dir = workspace["root"] / "qwen2_moe"
    code, stdout, stderr = run_cli(
        [str(model_dir), "--text", str(workspace["text"]), "--max-tokens", "32", "--seq-len", "16"]
        + ["--layers", "model.layers.1.mlp*", "--out", str(out)]
    )
    assert code == 0, stderr
    data = json.loads((out / "probe.json").read_text())
    assert data["model_type"] == "qwen2_moe" and data["tokens"] == 32
    assert data["config"]["layers"] == ["model.layers.1.mlp*"]
    assert list(data["layers"]) == ["model.layers.1.mlp", "model.layers.1.mlp.shared_expert"]
    for name in data["layers"]:
        assert name in stdout
    # Both views of the block (4 routed experts; the shared expert, one expert seeing every token) against a
    # direct probe of the in-memory model.
    stream = reference_stream(model_dir, workspace["text"], 32)
    expected = reference_reports(workspace["models"]["qwen2_moe"], stream, 16, "model.layers.1.mlp*")
    for name, num_experts in (("model.layers.1.mlp", 4), ("model.layers.1.mlp.shared_expert", 1)):
        got = GeometryReport.from_dict(data["layers"][name])
        ref = expected[name]
        assert got.num_experts == num_experts and got.total_tokens == 32
        assert torch.equal(got.tokens, ref.tokens)
        assert_same(got.expert["jac_sigma_max"], ref.expert["jac_sigma_max"])
        assert_same(got.expert["pca_hidden_effective_rank"], ref.expert["pca_hidden_effective_rank"])
    assert got.tokens.tolist() == [32]


def test_python_api_on_a_loaded_model_restores_its_mode(workspace) -> None:
    model = workspace["models"]["mixtral"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(workspace["root"] / "mixtral")
    model.train()
    try:
        texts = ["", " The tower is 324 metres tall .", " It was the tallest man-made structure in the world ."]
        reports = probe_pretrained(model, texts, tokenizer=tokenizer, max_tokens=12, seq_len=8, layers="*.0.mlp")
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    assert list(reports) == ["model.layers.0.mlp"]
    n_tokens = min(12, sum(len(tokenizer(t)["input_ids"]) for t in texts if t))
    assert reports["model.layers.0.mlp"].total_tokens == n_tokens


def test_pack_blocks_and_default_out_dir() -> None:
    batches = pack_blocks(torch.arange(10), seq_len=3, batch_size=2)
    assert [b.tolist() for b in batches] == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8]], [[9]]]
    assert default_out_dir("mistralai/Mixtral-8x7B-v0.1") == "probe-Mixtral-8x7B-v0.1"
    assert default_out_dir("/ckpts/my-olmoe/") == "probe-my-olmoe"


def test_missing_path_is_a_clean_error(workspace) -> None:
    missing = str(workspace["root"] / "no-such-checkpoint")
    code, stdout, stderr = run_cli([missing, "--text", str(workspace["text"])])
    assert code == 2 and stdout == ""
    assert stderr.startswith(f"moe-lightning probe: error: model path {missing!r} does not exist, and it is not a hub")
    # the model type is not the problem: no list of the supported ones
    assert "Supported model types" not in stderr and "qwen2_moe" not in stderr
    assert "Traceback" not in stderr
    with pytest.raises(ValueError, match="does not exist"):
        probe_pretrained(missing, str(workspace["text"]))


def test_hub_name_offline_is_a_clean_error(workspace, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, stderr = run_cli(["nobody-here/no-such-moe-model", "--text", str(workspace["text"])])
    assert code == 2
    assert stderr.startswith("moe-lightning probe: error: model 'nobody-here/no-such-moe-model' does not exist locally")
    assert "could not be fetched" in stderr and "offline" in stderr
    assert "Supported model types" not in stderr


@pytest.mark.parametrize(
    ("make_input", "first_line"),
    [
        (lambda d: ["./mixtrl", "--text", str(d / "text.txt")], "model path './mixtrl' does not exist"),
        (lambda d: [str(d / "mixtral"), "--text", str(d / "empty.txt")], "text file '{d}/empty.txt' is empty"),
        (lambda d: [str(d / "mixtral"), "--text", str(d / "blank.txt")], "text file '{d}/blank.txt' is empty"),
        (lambda d: [str(d / "mixtral"), "--text", str(d / "no.txt")], "text file '{d}/no.txt' does not exist"),
        (lambda d: [str(d / "mixtral"), "--text", str(d)], "text file '{d}' is not a file"),
        (
            lambda d: [str(d / "mixtral"), "--text", str(d / "text.txt"), "--tokenizer", "./tokenizr"],
            "tokenizer path './tokenizr' does not exist",
        ),
    ],
    ids=["mistyped-model", "empty-text", "blank-text", "missing-text", "text-folder", "mistyped-tokenizer"],
)
def test_inputs_are_checked_before_the_model_loads(make_input, first_line, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.txt").write_text("some text\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "mixtral").mkdir()  # no checkpoint: the inputs are checked before the model's files are read
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _refuse_to_load)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, stderr = run_cli(make_input(tmp_path))
    assert code == 2 and stdout == ""
    assert stderr.splitlines()[0].startswith(f"moe-lightning probe: error: {first_line.format(d=tmp_path)}")
    assert "Supported model types" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output folder


def _refuse_to_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the inputs were checked")


def test_non_moe_model_lists_the_supported_types(workspace) -> None:
    code, _, stderr = run_cli([str(workspace["root"] / "llama"), "--text", str(workspace["text"])])
    assert code == 2
    assert "model_type='llama'" in stderr and all(model_type in stderr for model_type in SUPPORTED)
    # the list is the adapters' coverage: every model type of the experts-interface families, nothing else
    listed = stderr.split("built on its experts interface): ", 1)[1].split(". ", 1)[0].split(", ")
    assert listed == supported_model_types() and len(listed) >= 60


@pytest.fixture(scope="module")
def experts_checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("experts")
    models_ = {}
    for family in EXPERTS_FAMILIES:
        model = tiny_model(family, vocab_size=300, initializer_range=0.2)
        model.save_pretrained(root / family)
        save_tokenizer(root / family)
        models_[family] = model
    return {"root": root, "models": models_}


@pytest.mark.integration  # `moe-lightning probe` end to end
@pytest.mark.parametrize("family", EXPERTS_FAMILIES)
def test_experts_interface_checkpoint_end_to_end(workspace, experts_checkpoints, family, monkeypatch) -> None:
    import moe_lightning.report

    # the numbers are what is checked here; the HTML report has its test above (mixtral_run), and its figures
    # would take most of the time
    monkeypatch.setattr(moe_lightning.report, "render_probe", lambda reports, out, title: [])
    model_dir = experts_checkpoints["root"] / family
    out = experts_checkpoints["root"] / f"out-{family}"
    argv = [str(model_dir), "--text", str(workspace["text"]), "--max-tokens", "32", "--seq-len", "16"]
    code, stdout, stderr = run_cli([*argv, "--layers", "model.layers.1.mlp*", "--out", str(out)])
    assert code == 0, stderr
    data = json.loads((out / "probe.json").read_text())
    assert data["model_type"] == family and data["tokens"] == 32
    model = experts_checkpoints["models"][family]
    names = [v.name for v in find_moe_layers(model, "model.layers.1.mlp*")]
    assert list(data["layers"]) == names and names[0] == "model.layers.1.mlp"
    stream = reference_stream(model_dir, workspace["text"], 32)
    expected = reference_reports(model, stream, 16, "model.layers.1.mlp*")
    for name in names:
        got, ref = GeometryReport.from_dict(data["layers"][name]), expected[name]
        assert got.total_tokens == 32 and torch.equal(got.tokens, ref.tokens)
        assert_same(got.expert["jac_sigma_max"], ref.expert["jac_sigma_max"])
        assert_same(got.expert["pca_hidden_effective_rank"], ref.expert["pca_hidden_effective_rank"])
        assert name in stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-tokens", "0"], "max_tokens must be a positive int, got 0"),
        (["--memory-budget-mib", "0"], "memory_budget_mib must be a positive int, got 0"),
        (["--pointwise-alignment-pairs", "1"], "ProbeConfig.pointwise_alignment_pairs must be None (every pair) or"),
        (["--layers", "model.layers.9.*"], "no MoE layer matches"),
        (["--seq-len", "4096"], "exceeds the model's max_position_embeddings=128"),
        (["--text", "/no/such/text.txt"], "text file '/no/such/text.txt' does not exist"),
    ],
)
def test_bad_options_are_clean_errors(workspace, extra: list[str], message: str) -> None:
    code, _, stderr = run_cli([str(workspace["root"] / "mixtral"), "--text", str(workspace["text"]), *extra])
    assert code == 2 and message in stderr


@pytest.mark.integration  # `moe-lightning probe` end to end
def test_default_text_is_the_bundled_wikitext_test_split(workspace, tmp_path, monkeypatch) -> None:
    """No text given: the probe reads the WikiText-2 test split shipped with the package, from any folder."""
    monkeypatch.chdir(tmp_path)
    model_dir = workspace["root"] / "mixtral"
    out = tmp_path / "out"
    argv = [str(model_dir), "--max-tokens", str(MAX_TOKENS), "--seq-len", str(SEQ_LEN), "--out", str(out)]
    code, _, stderr = run_cli(argv)
    assert code == 0, stderr
    data = json.loads((out / "probe.json").read_text())
    assert data["config"]["text"] == "bundled:wikitext-2/test.txt"
    stream = reference_stream(model_dir, bundled_file("wikitext-2/test.txt"), MAX_TOKENS)
    expected = reference_reports(workspace["models"]["mixtral"], stream, SEQ_LEN)
    for name in MIXTRAL_LAYERS:
        got = GeometryReport.from_dict(data["layers"][name])
        assert torch.equal(got.tokens, expected[name].tokens)
        assert_same(got.expert["jac_sigma_max"], expected[name].expert["jac_sigma_max"])


def assert_same_values(got, want, where: str = "") -> None:
    """The same keys and structure; floats equal to 1e-10 (relative) or both NaN, everything else exactly equal."""
    assert type(got) is type(want), where
    if isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            assert_same_values(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_values(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, rel_tol=1e-10, abs_tol=1e-12), where
    else:
        assert got == want, where


@pytest.fixture(scope="module")
def sharded(workspace, tmp_path_factory) -> dict:
    """The tiny Mixtral saved in several safetensors shards, with its tokenizer, and its size in bytes."""
    model = workspace["models"]["mixtral"]
    checkpoint = tmp_path_factory.mktemp("sharded") / "mixtral"
    model.save_pretrained(checkpoint, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).write_bytes((workspace["root"] / "mixtral" / name).read_bytes())
    assert len(list(checkpoint.glob("*.safetensors"))) > 3
    return {"checkpoint": checkpoint, "size": sum(p.numel() * p.element_size() for p in model.parameters())}


def assert_offloaded_as_before(model: torch.nn.Module) -> None:
    """Every expert weight back on the meta device, and every module's accelerate hook the one it had."""
    from accelerate.hooks import AlignDevicesHook

    assert all(p.is_meta for name, p in model.named_parameters() if "experts" in name)
    assert all(type(m._hf_hook) is AlignDevicesHook for m in model.modules() if hasattr(m, "_hf_hook"))


@pytest.mark.integration  # `moe-lightning probe` end to end, twice
def test_checkpoint_over_its_memory_cap_is_probed_layer_by_layer(workspace, sharded, tmp_path, monkeypatch) -> None:
    """A checkpoint in several safetensors shards, probed with accelerate placing it under a CPU memory cap of a
    third of its size (the rest on disk), gives the in-memory probe's report, with one MoE layer's weights loaded at
    a time."""
    import moe_lightning.commands.probe.run as probe_run
    import moe_lightning.report

    monkeypatch.setattr(moe_lightning.report, "render_probe", lambda reports, out, title: [])  # numbers only here
    checkpoint, size = sharded["checkpoint"], sharded["size"]

    loaded, materialised = {}, {}
    prepare = probe_run.prepare_model

    def keep_model(*args, **kwargs):
        result = prepare(*args, **kwargs)
        loaded["model"] = result.model
        return result

    def spy_probe(view, x, config):
        # which MoE blocks have their expert weights off the meta device while this layer is probed
        materialised[view.name] = sorted(
            name.removesuffix(".experts.down_proj")
            for name, p in loaded["model"].named_parameters()
            if name.endswith("experts.down_proj") and not p.is_meta
        )
        return probe(view, x, config)

    argv = [str(checkpoint), "--text", str(workspace["text"]), "--max-tokens", str(MAX_TOKENS)]
    argv += ["--seq-len", str(SEQ_LEN), "--batch-size", "2", "--device", "cpu"]
    code, _, stderr = run_cli([*argv, "--out", str(tmp_path / "in-memory")])
    assert code == 0, stderr
    # under the cap, without a folder for the rest
    code, _, stderr = run_cli([*argv, "--device-map", "auto", "--max-memory", f"cpu={size // 3}"])
    assert code == 2 and f"do not fit in max_memory={{'cpu': {size // 3}}}: give --offload-folder" in stderr
    monkeypatch.setattr(probe_run, "prepare_model", keep_model)
    monkeypatch.setattr(probe_run, "probe", spy_probe)
    offload = tmp_path / "offload"
    capped = ["--device-map", "auto", "--max-memory", f"cpu={size // 3}", "--offload-folder", str(offload)]
    code, stdout, stderr = run_cli([*argv, *capped, "--out", str(tmp_path / "capped")])
    assert code == 0, stderr

    want = json.loads((tmp_path / "in-memory" / "probe.json").read_text())
    got = json.loads((tmp_path / "capped" / "probe.json").read_text())
    assert list(got["layers"]) == MIXTRAL_LAYERS
    assert_same_values(got["layers"], want["layers"])
    assert got["config"]["device_map"] == "auto" and got["config"]["max_memory"] == f"cpu={size // 3}"
    # the expert weights of both layers were written to the offload folder: they were on disk, not in memory
    assert {f"{layer}.experts.{w}.safetensors" for layer in MIXTRAL_LAYERS for w in ("gate_up_proj", "down_proj")} <= {
        p.name for p in offload.iterdir()
    }
    assert materialised == {layer: [layer] for layer in MIXTRAL_LAYERS}
    assert_offloaded_as_before(loaded["model"])
    for peak in (got["peak_memory"], want["peak_memory"]):
        assert peak["bytes"] > 0 and peak["measure"].startswith("peak resident set size")
    assert f"peak memory: {got['peak_memory']['bytes'] / 2**30:.4g} GiB" in stdout


@pytest.mark.parametrize(
    ("extra", "first_line"),
    [
        (["--device-map", "auto", "--max-memory", "cpu=lots"], "max_memory='cpu=lots' is not understood at"),
        (["--device-map", "auto", "--max-memory", "gpu0=1GiB"], "max_memory='gpu0=1GiB' is not understood at"),
        (["--device-map", "auto", "--max-memory", "cpu=2GiB,cpu=1GiB"], "max_memory='cpu=2GiB,cpu=1GiB' names cpu"),
        (["--max-memory", "cpu=2GiB"], "max_memory places the checkpoint with accelerate, which needs device_map"),
        (["--offload-folder", "off"], "offload_folder places the checkpoint with accelerate, which needs device_map"),
        (["--device-map", "auto", "--max-memory", "0=1GiB", "--device", "cpu"], "max_memory='0=1GiB' gives memory"),
        (["--device-map", "all"], "usage:"),  # argparse's own check of the choices
    ],
)
def test_bad_memory_options_fail_before_loading(extra, first_line, tmp_path, monkeypatch) -> None:
    (tmp_path / "mixtral").mkdir()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _refuse_to_load)
    code, stdout, stderr = run_cli([str(tmp_path / "mixtral"), "--text", str(tmp_path / "text.txt"), *extra])
    assert code == 2 and stdout == ""
    if first_line == "usage:":
        assert "argument --device-map: invalid choice: 'all'" in stderr
    else:
        assert stderr.splitlines()[0].startswith(f"moe-lightning probe: error: {first_line}")


def test_max_memory_is_read_as_accelerate_reads_it() -> None:
    from accelerate.utils import convert_file_size_to_int

    from moe_lightning.commands.probe.options import parse_max_memory

    assert parse_max_memory("0=70GiB, cpu=1.5GB") == {0: 70 * 2**30, "cpu": 1_500_000_000}
    assert parse_max_memory({1: "20MiB", "CPU": 4096}) == {1: 20 * 2**20, "cpu": 4096}
    for size in ("70GiB", "1GB", "512MiB", "3KB", "2.5GiB"):
        assert parse_max_memory(f"cpu={size}") == {"cpu": convert_file_size_to_int(size)}
    assert parse_max_memory("cpu=2TiB,0=1TB") == {"cpu": 2 * 2**40, 0: 10**12}


def test_a_model_dispatched_by_accelerate_is_probed_where_it_is(workspace, sharded, tmp_path) -> None:
    """A model loaded with from_pretrained(device_map=...) and given to probe_pretrained: each MoE layer's weights
    are brought from the disk for its probe, and the values are those of the same weights in memory."""
    size = sharded["size"]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        sharded["checkpoint"], device_map="auto", max_memory={"cpu": size // 3}, offload_folder=tmp_path
    ).eval()
    assert_offloaded_as_before(model)
    token_ids = reference_stream(workspace["root"] / "mixtral", workspace["text"], 32)
    options = dict(max_tokens=32, seq_len=16, layers="*.1.mlp")
    got = probe_pretrained(model, token_ids, **options)["model.layers.1.mlp"]
    want = probe_pretrained(workspace["models"]["mixtral"], token_ids, **options)["model.layers.1.mlp"]
    assert_same_values(got.to_dict(), want.to_dict())
    assert_offloaded_as_before(model)
    with pytest.raises(ValueError, match="would move a model that accelerate dispatched"):
        probe_pretrained(model, token_ids, device="cpu", **options)
    with pytest.raises(ValueError, match="device_map='auto' places a checkpoint the probe loads"):
        probe_pretrained(model, token_ids, device_map="auto", **options)
