"""MetaRewardModel: checkpoints (exact round trip, corrupt files, mismatches) and the import of
official MRM state dicts against an independent re-implementation of the official forward."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mrm.model import MetaRewardModel, ModelConfig  # noqa: E402


def _random_model(config, seed=0):
    torch.manual_seed(seed)
    model = MetaRewardModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


CONFIGS = [
    ModelConfig(input_dim=6, num_bases=2),
    ModelConfig(input_dim=6, num_bases=4, hidden_sizes=[5, 3], bias=True, scale=0.5),
    ModelConfig(input_dim=6, num_bases=3, hidden_sizes=[8], activation="gelu", scale=1.0),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_save_load_round_trip_is_exact(tmp_path, config):
    model = _random_model(config)
    model.save_pretrained(tmp_path / "ckpt", extra_config={"note": "x"})
    loaded = MetaRewardModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == config
    assert loaded.extra_config == {"note": "x"}
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    emb = torch.randn(9, 6)
    assert torch.equal(model.reward(emb), loaded.reward(emb))


def test_overwrite_keeps_no_stale_files(tmp_path):
    _random_model(CONFIGS[0]).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "stale.txt").write_text("old")
    _random_model(CONFIGS[1], seed=1).save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    old = _random_model(CONFIGS[0])
    old.save_pretrained(tmp_path / "ckpt")
    import safetensors.torch

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        _random_model(CONFIGS[0], seed=3).save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    loaded = MetaRewardModel.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(loaded.shared_weight, old.shared_weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_truncated_weights_file_is_a_clear_error(tmp_path):
    _random_model(CONFIGS[1]).save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-20])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        MetaRewardModel.from_pretrained(tmp_path / "ckpt")


def test_garbage_config_is_a_clear_error(tmp_path):
    _random_model(CONFIGS[0]).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text('{"format": "mrm-fast/meta-reward-mo')
    with pytest.raises(ValueError, match="not valid JSON"):
        MetaRewardModel.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text('{"input_dim": 6}')
    with pytest.raises(ValueError, match="not an mrm-fast model config"):
        MetaRewardModel.from_pretrained(tmp_path / "ckpt")


def test_missing_checkpoint_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere not found"):
        MetaRewardModel.from_pretrained(tmp_path / "nowhere")


def test_expected_config_mismatch_names_the_field(tmp_path):
    _random_model(CONFIGS[1]).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="num_bases = 4, but the config asks for 2"):
        MetaRewardModel.from_pretrained(tmp_path / "ckpt", expected=ModelConfig(input_dim=6, num_bases=2, hidden_sizes=[5, 3]))
    with pytest.raises(ValueError, match="hidden_sizes"):
        MetaRewardModel.from_pretrained(tmp_path / "ckpt", expected=ModelConfig(input_dim=6, num_bases=4, hidden_sizes=[7]))


def test_weights_from_other_hidden_sizes_are_rejected(tmp_path):
    """A config.json edited to claim other hidden sizes than the weights have."""
    _random_model(CONFIGS[1]).save_pretrained(tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    raw = json.loads(config_path.read_text())
    raw["hidden_sizes"] = [7, 3]
    config_path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"layers.0.(weight|bias) has shape \(5(, 6)?,?\) but the model expects \(7"):
        MetaRewardModel.from_pretrained(tmp_path / "ckpt")


def test_non_finite_weights_are_rejected(tmp_path):
    from safetensors.torch import save_file

    model = _random_model(CONFIGS[0])
    model.save_pretrained(tmp_path / "ckpt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["shared_weight"][0] = float("inf")
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(ValueError, match="shared_weight contains non-finite"):
        MetaRewardModel.from_pretrained(tmp_path / "ckpt")


def _official_reward(state, embeddings, scale=0.01):
    """The official MRM forward, written out: x = scale·e, then each layer x ← x Wᵀ (+ b),
    reward = x · softmax(shared_weight)."""
    x = embeddings * scale
    n = 0
    while f"layers.{n}.weight" in state:
        x = x @ state[f"layers.{n}.weight"].T
        if f"layers.{n}.bias" in state:
            x = x + state[f"layers.{n}.bias"]
        n += 1
    return x @ torch.softmax(state["shared_weight"], dim=0)


@pytest.mark.parametrize("widths,bias", [([16, 2], False), ([16, 8, 2], False), ([16, 6, 3], True)])
def test_official_checkpoint_import_reproduces_official_rewards(tmp_path, widths, bias):
    gen = torch.Generator().manual_seed(sum(widths))
    state = {}
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        state[f"layers.{i}.weight"] = torch.randn(b, a, generator=gen, dtype=torch.float64)
        if bias:
            state[f"layers.{i}.bias"] = torch.randn(b, generator=gen, dtype=torch.float64)
    state["shared_weight"] = torch.randn(widths[-1], generator=gen, dtype=torch.float64)
    state = {k: v.float() for k, v in state.items()}  # official checkpoints are float32
    path = tmp_path / "official.pt"
    torch.save(state, path)
    model = MetaRewardModel.from_official_checkpoint(path).double()
    state = {k: v.double() for k, v in state.items()}
    assert model.config.hidden_sizes == widths[1:-1] and model.config.num_bases == widths[-1]
    emb = torch.randn(11, widths[0], generator=gen, dtype=torch.float64) * 10
    assert torch.allclose(model.reward(emb), _official_reward(state, emb), rtol=1e-12, atol=1e-14)


def test_official_checkpoint_errors(tmp_path):
    path = tmp_path / "official.pt"
    torch.save({"layers.0.weight": torch.randn(2, 4), "shared_weight": torch.zeros(2)}, path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        MetaRewardModel.from_official_checkpoint(path)
    torch.save({"layers.0.weight": torch.randn(2, 4)}, path)
    with pytest.raises(ValueError, match="shared_weight"):
        MetaRewardModel.from_official_checkpoint(path)
    torch.save({"layers.0.weight": torch.randn(3, 4), "layers.1.weight": torch.randn(2, 5), "shared_weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="inconsistent"):
        MetaRewardModel.from_official_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        MetaRewardModel.from_official_checkpoint(tmp_path / "missing.pt")


def test_adapt_uses_native_kernel_on_phi_differences():
    import reference

    model = _random_model(ModelConfig(input_dim=5, num_bases=3, scale=1.0)).double()
    emb = torch.randn(10, 5, dtype=torch.float64)
    chosen, rejected = np.array([0, 1, 2, 3, 4]), np.array([5, 6, 7, 8, 9])
    offsets = np.array([0, 2, 5])
    got = model.adapt(emb, chosen, rejected, offsets, steps=3, lr=0.2, optimizer="sgd")
    with torch.no_grad():
        phi = model.features(emb)
        d = phi[chosen] - phi[rejected]
        for u in range(2):
            want = reference.adapt_user(model.shared_weight, d[offsets[u]:offsets[u + 1]], steps=3, lr=0.2, optimizer="sgd")
            np.testing.assert_allclose(got[u], want.numpy(), rtol=1e-12)


@pytest.mark.parametrize("n_rows, n_pairs", [(12, 40), (100, 20), (1000, 3)])  # all rows, some, few
def test_pair_differences_and_their_gradient_match_direct_indexing(n_rows, n_pairs):
    model = _random_model(CONFIGS[1]).double()
    rng = np.random.default_rng(n_rows)
    emb = torch.randn(n_rows, 6, dtype=torch.float64)
    chosen, rejected = rng.integers(n_rows, size=n_pairs), rng.integers(n_rows, size=n_pairs)
    upstream = torch.randn(n_pairs, 4, dtype=torch.float64)

    def gradients(differences):
        model.zero_grad()
        d = differences()
        (d * upstream).sum().backward()
        return d.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    got, got_grads = gradients(lambda: model.pair_differences(emb, chosen, rejected))
    want, want_grads = gradients(lambda: model.features(emb[chosen]) - model.features(emb[rejected]))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert len(got_grads) == len(want_grads) == len(model.layers) * 2  # every weight and bias
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_pair_differences_index_out_of_range_is_named():
    model = _random_model(CONFIGS[0])
    emb = torch.randn(5, 6)
    for chosen, rejected, message in [([0, 5], [1, 1], r"chosen\[1\] = 5"), ([0, 1], [-1, 2], r"rejected\[0\] = -1")]:
        with pytest.raises(ValueError, match=message + " is out of range for 5 embedding rows"):
            model.pair_differences(emb, np.array(chosen), np.array(rejected))
