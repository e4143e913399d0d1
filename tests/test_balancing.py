"""DeepSeek-V3 routing: sigmoid scores, the aux-free selection bias and its per-optimiser-step update, the sequence
balance loss, shared experts, and the new config fields, against hand-computed and independent references."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import load_script, run_test_script
from torch.utils.data import DataLoader, TensorDataset

from moe_lightning.lightning.modules import MLPMoEModule
from moe_lightning.nn.balancing import bias_update, sequence_load_balance_loss, update_expert_biases
from moe_lightning.nn.layer import DenseFFN, MoEConfig, MoELayer, Router
from moe_lightning.nn.models import MLPMoE, MLPMoEConfig, param_counts

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(dim=8, expert_hidden=16, num_experts=4, top_k=2)


def test_sigmoid_selection_uses_score_plus_bias_and_weights_use_the_score():
    router = Router(MoEConfig(**TINY, scoring="sigmoid", load_balancing="aux_free", routed_scaling=2.0)).double()
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    x = logits @ torch.linalg.pinv(router.weight.detach()).T  # inputs whose logits are exactly `logits`
    torch.testing.assert_close(x @ router.weight.detach().T, logits)
    s = 1 / (1 + torch.exp(-logits[0]))
    # Without a bias experts 0 and 1 win; a bias of +0.5 on expert 3 makes it beat expert 1 (0.269+0.5 > 0.731).
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.5]))
    out = router(x)
    assert sorted(out.expert_index[0].tolist()) == [0, 3]
    expected = 2.0 * torch.stack([s[0], s[3]]) / (s[0] + s[3])
    torch.testing.assert_close(out.gates[0, [0, 3]], expected)
    assert out.gates[0, [1, 2]].abs().sum() == 0
    torch.testing.assert_close(out.probs[0], s / s.sum())
    torch.testing.assert_close(router.gates(x), out.gates)


def test_router_matches_transformers_deepseek_v3():
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    E, D, K = 8, 16, 3
    hf_config = DeepseekV3Config(
        hidden_size=D, n_routed_experts=E, num_experts_per_tok=K, n_group=1, topk_group=1, routed_scaling_factor=2.5
    )
    hf_config.norm_topk_prob = True
    torch.manual_seed(0)
    reference = DeepseekV3TopkRouter(hf_config)
    ours = Router(
        MoEConfig(dim=D, num_experts=E, top_k=K, scoring="sigmoid", load_balancing="aux_free", routed_scaling=2.5)
    )
    with torch.no_grad():
        reference.weight.normal_()
        ours.weight.copy_(reference.weight)
        bias = torch.randn(E) * 0.3
        reference.e_score_correction_bias.copy_(bias)
        ours.expert_bias.copy_(bias)
    x = torch.randn(64, D)
    _, ref_weight, ref_index = reference(x)
    ref_gates = torch.zeros(64, E).scatter(1, ref_index, ref_weight)
    torch.testing.assert_close(ours(x).gates, ref_gates)


def test_bias_update_on_a_known_load_vector():
    # mean 3: expert 0 overloaded (down), 1 and 3 under (up), 2 exactly at the mean (unchanged).
    delta = bias_update(torch.tensor([6, 1, 3, 2]), rate=0.01)
    torch.testing.assert_close(delta, torch.tensor([-0.01, 0.01, 0.0, 0.01]))


def test_update_expert_biases_uses_the_pending_loads_once():
    layer = MoELayer(MoEConfig(**TINY, load_balancing="aux_free", bias_update_rate=0.5))
    layer.router.record_load(torch.tensor([5, 1, 1, 1]))
    layer.router.record_load(torch.tensor([0, 0, 0, 4]))  # sum [5, 1, 1, 5], mean 3
    reduced = []
    assert update_expert_biases(layer, reduce=lambda t: reduced.append(t.clone()) or t * 2) == 1
    assert reduced[0].tolist() == [5, 1, 1, 5]
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.5, 0.5, 0.5, -0.5]))
    assert layer.router.pending_load is None
    update_expert_biases(layer)  # no loads recorded since: no change
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.5, 0.5, 0.5, -0.5]))


def test_aux_free_bias_is_a_buffer_and_other_modes_have_none():
    layer = MoELayer(MoEConfig(**TINY, load_balancing="aux_free"))
    assert "router.expert_bias" in layer.state_dict()
    assert all(p is not layer.router.expert_bias for p in layer.parameters())
    assert "router.expert_bias" not in MoELayer(MoEConfig(**TINY)).state_dict()  # old checkpoints still load


def test_sequence_loss_on_a_hand_made_case():
    # 2 sequences of T=2 tokens, E=2, K=1.
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5], [0.2, 0.8]])
    index = torch.tensor([[0], [0], [0], [1]])
    # seq 1: f = E/(K T) * counts = [2, 0], P = [0.75, 0.25] -> 1.5; seq 2: f = [1, 1], P = [0.35, 0.65] -> 1.0
    assert sequence_load_balance_loss(probs, index, 2).item() == pytest.approx(1.25)
    # one sequence of 4: f = 2/4 * [3, 1] = [1.5, 0.5], P = [0.55, 0.45] -> 1.05
    assert sequence_load_balance_loss(probs, index, 1).item() == pytest.approx(1.05)
    with pytest.raises(ValueError, match="num_sequences"):
        sequence_load_balance_loss(probs, index, 3)


def test_layer_sequence_loss_reads_sequences_from_the_input_shape():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**TINY, load_balancing="sequence_aux_loss"))
    x = torch.randn(3, 5, 8)
    aux = layer(x)[1]
    expected = sequence_load_balance_loss(aux.router.probs, aux.router.expert_index, 3)
    torch.testing.assert_close(aux.load_balance, expected)
    assert not math.isclose(
        float(expected), float(sequence_load_balance_loss(aux.router.probs, aux.router.expert_index, 1))
    )
    for mode in ("aux_free", "none"):
        torch.manual_seed(0)
        assert MoELayer(MoEConfig(**TINY, load_balancing=mode))(x)[1].load_balance.item() == 0.0


def test_shared_experts_add_an_always_on_ffn_and_routed_scaling_scales_the_rest():
    torch.manual_seed(0)
    base = MoELayer(MoEConfig(**TINY, scoring="sigmoid"))
    torch.manual_seed(0)
    layer = MoELayer(
        MoEConfig(**TINY, scoring="sigmoid", num_shared_experts=2, shared_expert_hidden=4, routed_scaling=3.0)
    )
    assert isinstance(layer.shared_experts, DenseFFN) and layer.shared_experts.hidden == 8
    torch.testing.assert_close(layer.w_in, base.w_in)  # shared experts drawn after the routed ones
    x = torch.randn(10, 8)
    shared = layer.shared_experts(x)[0]
    torch.testing.assert_close(layer(x)[0], 3.0 * base(x)[0] + shared)


def test_param_counts_and_capacity_match_count_shared_experts():
    fields = dict(TINY, activation="swiglu", num_shared_experts=1, shared_expert_hidden=24)
    config = MLPMoEConfig(**fields, input_dim=8, output_dim=8)
    model = MLPMoE(config)
    layer = model.blocks[0].ffn
    layer_params = sum(p.numel() for p in layer.parameters())
    assert config.param_counts()["total"] == layer_params
    shared = sum(p.numel() for p in layer.shared_experts.parameters())
    routed_per_expert = (layer.w_in.numel() + layer.w_out.numel()) // 4
    assert config.param_counts()["active"] == layer.router.weight.numel() + 2 * routed_per_expert + shared
    counts = param_counts(model)
    assert counts["total"] - counts["active"] == 2 * routed_per_expert
    for match, routed in (("total", 4), ("active", 2)):
        dense = MoEConfig(**fields, routing="dense", capacity_match=match)
        assert dense.dense_hidden == routed * 16 + 24
        assert dense.param_counts()["total"] == sum(p.numel() for p in DenseFFN(dense).parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scoring": "tanh"}, "scoring='tanh'.*'softmax', 'sigmoid'"),
        ({"load_balancing": "loss"}, "load_balancing='loss'.*'aux_free'"),
        ({"num_shared_experts": -1}, "num_shared_experts must be >= 0"),
        ({"num_shared_experts": 1.5}, "num_shared_experts must be an int"),
        ({"shared_expert_hidden": 0}, "shared_expert_hidden must be positive"),
        ({"bias_update_rate": -1e-3}, "bias_update_rate must be >= 0"),
        ({"routed_scaling": 0.0}, "routed_scaling must be positive"),
        ({"routing": "soft", "scoring": "sigmoid"}, "scoring='sigmoid' applies to routing='topk' only"),
        ({"routing": "soft", "load_balancing": "aux_free"}, "load_balancing='aux_free' applies to routing='topk'"),
    ],
)
def test_bad_routing_fields_raise_clear_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**TINY, **kwargs})


def test_dense_routing_ignores_the_router_fields():
    MoEConfig(**TINY, routing="dense", scoring="sigmoid", load_balancing="aux_free")


# -- the bias update inside training ------------------------------------------------------------------------------

AUX_FREE = MLPMoEConfig(
    input_dim=8, output_dim=4, dim=8, expert_hidden=8, num_experts=4, top_k=1, num_blocks=2,
    scoring="sigmoid", load_balancing="aux_free", bias_update_rate=0.01,
)  # fmt: skip


def _fit(
    batch_size: int, accumulate: int, max_steps=-1, max_epochs=None, tmp_path=None, ckpt_path=None, checkpoint=False
):
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = MLPMoEModule(AUX_FREE, lr=1e-2)
    x = torch.randn(96, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randn(96, 4, generator=torch.Generator().manual_seed(2))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        max_epochs=max_epochs,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=checkpoint,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module, trainer


def _biases(module) -> list[torch.Tensor]:
    return [block.ffn.router.expert_bias.clone() for block in module.model.blocks]


def test_gradient_accumulation_gives_the_bias_of_one_large_batch():
    large, _ = _fit(batch_size=32, accumulate=1, max_steps=3)
    accumulated, _ = _fit(batch_size=8, accumulate=4, max_steps=3)
    for a, b in zip(_biases(large), _biases(accumulated), strict=True):
        assert a.abs().sum() > 0  # the bias moved
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # one step per optimiser step: 3 steps of +-0.01 (or 0) per expert, never 12
    assert all(b.abs().max() <= 0.03 + 1e-7 for b in _biases(accumulated))


def test_bias_is_saved_in_checkpoints_and_resumed_exactly(tmp_path):
    # Whole epochs (3 steps each), so the resumed run sees the batches the straight run sees.
    straight, _ = _fit(batch_size=32, accumulate=1, max_epochs=2)
    first, trainer = _fit(batch_size=32, accumulate=1, max_epochs=1, tmp_path=tmp_path, checkpoint=True)
    ckpt = trainer.checkpoint_callback.best_model_path
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    torch.testing.assert_close(state["model.blocks.0.ffn.router.expert_bias"], _biases(first)[0], rtol=0, atol=0)
    resumed, _ = _fit(batch_size=32, accumulate=1, max_epochs=2, tmp_path=tmp_path, ckpt_path=ckpt)
    for a, b in zip(_biases(straight), _biases(resumed), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(_biases(first), _biases(resumed), strict=True))
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_probe_forward_passes_do_not_move_the_bias():
    module = MLPMoEModule(AUX_FREE)
    batch = (torch.randn(16, 8), torch.randn(16, 4))
    module.loss(batch)  # stage="probe", as CurvatureMonitor calls it
    assert all(block.ffn.router.pending_load is None for block in module.model.blocks)
    module.loss(batch, "train")
    assert all(int(block.ffn.router.pending_load.sum()) == 16 for block in module.model.blocks)


@pytest.mark.integration  # two gloo processes
def test_two_process_ddp_bias_and_router_monitor_match_one_process_on_the_union(tmp_path):
    """Both ranks apply the same bias steps, from the loads of both ranks' batches; RouterMonitor's window is the
    union of both ranks' batches of the window."""
    from moe_lightning.geometry.router import routing_sums, window_statistics
    from moe_lightning.nn.models import MLPMoE

    run_test_script("ddp_routing.py", tmp_path, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and sorted(ranks[0]["loads"]) == [0, 1, 2]
    # the ranks routed different tokens, so a rank's own loads would give a different bias
    assert any(not torch.equal(a, b) for a, b in zip(ranks[0]["loads"][0], ranks[1]["loads"][0], strict=True))
    for layer in range(2):
        expected = torch.zeros(4)
        for step in range(3):
            expected += bias_update(ranks[0]["loads"][step][layer] + ranks[1]["loads"][step][layer], 0.01)
        for rank in ranks:
            torch.testing.assert_close(rank["bias"][layer], expected, rtol=0, atol=1e-7)
    # RouterMonitor at step 2: the window of steps 1 and 2 on both ranks, as one process would see it
    assert ranks[0]["logged_step"] == 2
    model = MLPMoE(load_script(ROOT / "tests" / "scripts" / "ddp_routing.py").CONFIG)
    metrics = ranks[0]["metrics"]
    for layer in range(2):
        gates, probs, logits = [], [], []
        for rank in ranks:
            for step in (1, 2):
                x, state = rank["batches"][step]
                model.load_state_dict(state)
                aux = model.train()(x).aux[layer]
                gates.append(aux.router.gates.detach())
                probs.append(aux.router.probs.detach())
                logits.append(aux.router.logits.detach().double())
        expected = window_statistics(routing_sums(torch.cat(gates), torch.cat(probs)))
        name = f"router/blocks.{layer}.ffn"
        # balance: per micro-batch (each rank's batch of each step), averaged; and of the loads summed over all
        micro = np.array([numpy_maxvio_cv((g > 0).sum(0).double().numpy()) for g in gates])
        assert metrics[f"{name}/maxvio_micro"] == pytest.approx(micro[:, 0].mean(), rel=1e-9)
        assert metrics[f"{name}/load_cv_micro"] == pytest.approx(micro[:, 1].mean(), rel=1e-9)
        union = numpy_maxvio_cv(sum((g > 0).sum(0) for g in gates).double().numpy())
        assert metrics[f"{name}/maxvio_global"] == pytest.approx(union[0], rel=1e-9)
        assert metrics[f"{name}/load_cv"] == pytest.approx(union[1], rel=1e-9)
        lse = torch.logsumexp(torch.cat(logits), dim=-1)
        assert metrics[f"{name}/logit_lse_mean"] == pytest.approx(float(lse.mean()), rel=1e-6)
        assert metrics[f"{name}/logit_lse_max"] == pytest.approx(float(lse.max()), rel=1e-6)
        assert metrics[f"{name}/logit_max"] == pytest.approx(float(torch.cat(logits).max()), rel=1e-6)
        assert float(torch.cat(logits[:2]).max()) != float(torch.cat(logits[2:]).max())  # the ranks' maxima differ
        for e, share in enumerate(expected.pop("load").tolist()):
            assert metrics[f"{name}/load/e{e}"] == pytest.approx(share, rel=1e-6)
        for key, value in expected.items():
            assert metrics[f"{name}/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        assert metrics[f"{name}/bias_range"] > 0


def numpy_maxvio_cv(load: np.ndarray) -> tuple[float, float]:
    """MaxVio ``(max - mean) / mean`` and population std / mean of per-expert loads."""
    return (load.max() - load.mean()) / load.mean(), load.std() / load.mean()


@pytest.mark.integration  # two gloo processes
def test_global_aux_loss_on_two_processes_equals_the_switch_loss_of_the_union(tmp_path):
    """Value and DDP-averaged gradient of the global-batch loss equal one process's Switch loss on the union batch,
    with unequal batch sizes; each rank's own Switch loss differs from it."""
    script = load_script(ROOT / "tests" / "scripts" / "ddp_global_balance.py")
    run_test_script("ddp_global_balance.py", tmp_path, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    torch.manual_seed(0)
    layer = MoELayer(dataclasses.replace(script.CONFIG, load_balancing="aux_loss")).train()
    _, aux = layer(script.union_batch())
    aux.load_balance.backward()
    for rank in ranks:
        torch.testing.assert_close(rank["loss"], aux.load_balance.detach(), rtol=1e-6, atol=0)
        assert abs(float(rank["own"]) - float(aux.load_balance)) > 1e-3  # the per-rank loss is another loss
    average = (ranks[0]["grad"] + ranks[1]["grad"]) / 2  # DDP's gradient all-reduce
    torch.testing.assert_close(average, layer.router.weight.grad, rtol=1e-5, atol=1e-7)
    assert (ranks[0]["grad"] - layer.router.weight.grad).abs().max() > 1e-4


def test_global_aux_loss_in_one_process_is_the_switch_loss():
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    losses = []
    for mode in ("aux_loss", "global_aux_loss"):
        torch.manual_seed(0)
        losses.append(MoELayer(MoEConfig(**TINY, load_balancing=mode)).train()(x)[1].load_balance)
    assert float(losses[0]) == float(losses[1])
