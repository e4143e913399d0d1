"""``moe-lightning probe`` on tiny random Hugging Face MoE checkpoints saved to disk (no download, no network).

The reference numbers come from an independent path: the model object kept in memory (not the reloaded
checkpoint), token ids from encoding the text file line by line, a plain forward hook on each MoE block, and
``moe_lightning.geometry.probe`` called directly.

Shape legend: ``N`` tokens, ``E`` experts, ``D`` model dim, ``r`` matrix-free rank.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
from pathlib import Path

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
        ]
    )
    assert code == 0, stderr
    data = json.loads((out / "probe.json").read_text())
    assert data["config"]["memory_budget_mib"] == 1
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
    assert "align_mean_offdiag" not in free.layer  # needs whole Jacobians
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
