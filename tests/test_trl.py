"""PersonalizedReward inside a real trl.GRPOTrainer run (tiny random Llama built from a config, CPU),
checked against the library path: the embedding cache and numpy φ · softmax(w_u)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from mrm.checkpoint import Checkpoint  # noqa: E402
from mrm.embed import EmbeddingCache  # noqa: E402
from mrm.integrations.trl import PersonalizedReward  # noqa: E402
from mrm.store import UserStore  # noqa: E402

D, K = 16, 2
USERS = {"alice": np.array([4.0, -4.0]), "bob": np.array([-4.0, 4.0])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from test_embed import save_tiny_llama

    tmp = tmp_path_factory.mktemp("trl")
    save_tiny_llama(tmp / "llama", hidden_size=D)
    rng = np.random.default_rng(0)
    checkpoint = Checkpoint(input_dim=D, num_bases=K, hidden_sizes=[], scale=1.0, activation=None,
                            layers=[(rng.normal(size=(K, D)), None)], w0=np.zeros(K))
    checkpoint.save(tmp / "model")
    with UserStore(tmp / "users.db", K) as s:
        for user, weights in USERS.items():
            s.put(user, weights)
    return tmp, Checkpoint.load(tmp / "model")


def library_rewards(tmp, checkpoint, users, pairs):
    embeddings = EmbeddingCache(tmp / "reference-cache", tmp / "llama").embed(pairs, progress=False)
    weights = np.stack([USERS.get(u, checkpoint.w0) for u in users])
    return checkpoint.rewards(embeddings.astype(np.float64), weights), checkpoint.features(embeddings)


def test_grpo_run_rewards_follow_each_users_weights(setup):
    tmp, checkpoint = setup
    reward = PersonalizedReward(tmp / "model", tmp / "llama", tmp / "users.db", cache_dir=tmp / "cache")
    calls = []

    def personalized_reward(prompts, completions, **columns):
        values = reward(prompts, completions, **columns)
        calls.append((list(columns["user_id"]), list(prompts), list(completions), values))
        return values

    prompts = ["tell me about cats", "what is the weather today", "explain dogs", "how good is it"]
    users = ["alice", "bob", "carol", "alice", "bob", "alice", "bob", "carol"]
    dataset = datasets.Dataset.from_dict({"prompt": [prompts[i % 4] for i in range(8)], "user_id": users})
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp / "llama")
    policy = transformers.AutoModelForCausalLM.from_pretrained(tmp / "llama")
    config = trl.GRPOConfig(
        output_dir=str(tmp / "grpo"), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
        max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], bf16=False, gradient_checkpointing=False,
        use_cpu=True, save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=[personalized_reward], args=config, train_dataset=dataset,
                              processing_class=tokenizer)
    trainer.train()

    assert len(calls) >= 2
    per_user = {}
    for call_users, call_prompts, completions, values in calls:
        assert all(isinstance(c, str) for c in completions)
        expected, features = library_rewards(tmp, checkpoint, call_users, list(zip(call_prompts, completions)))
        np.testing.assert_allclose(values, expected, rtol=0, atol=1e-6)
        for u, f, v in zip(call_users, features, values):
            per_user.setdefault(u, []).append((f, v))
    # alice's weights put ~all mass on base 0, bob's on base 1, carol is unknown (w0: the mean)
    p = {u: np.exp(w) / np.exp(w).sum() for u, w in USERS.items()}
    for user, rows in per_user.items():
        f = np.stack([r[0] for r in rows])
        v = np.array([r[1] for r in rows])
        if user == "carol":
            np.testing.assert_allclose(v, f.mean(axis=1), atol=1e-6)
        else:
            np.testing.assert_allclose(v, f @ p[user], atol=1e-6)
        print(f"GRPO: {user}: {len(v)} completions, mean reward {v.mean():+.4f}, base-0 {f[:, 0].mean():+.4f}, "
              f"base-1 {f[:, 1].mean():+.4f}")
    assert reward.unknown_users == sum(u == "carol" for c in calls for u in c[0]) > 0
    history = [entry for entry in trainer.state.log_history if "reward" in entry]
    assert history and all(np.isfinite(entry["reward"]) for entry in history)


def test_same_completion_scores_differ_as_the_weights_do_and_formats_agree(setup):
    tmp, checkpoint = setup
    reward = PersonalizedReward(tmp / "model", tmp / "llama", tmp / "users.db", cache_dir=tmp / "cache")
    prompt, completion = "tell me about cats", "cats are good"
    standard = reward([prompt] * 3, [completion] * 3, user_id=["alice", "bob", "dave"])
    conversational = reward([[{"role": "user", "content": prompt}]] * 3,
                            [[{"role": "assistant", "content": completion}]] * 3, user_id=["alice", "bob", "dave"])
    np.testing.assert_allclose(standard, conversational, atol=1e-6)
    _, features = library_rewards(tmp, checkpoint, ["alice"], [(prompt, completion)])
    f = features[0]
    p_alice, p_bob = (np.exp(USERS[u]) / np.exp(USERS[u]).sum() for u in ("alice", "bob"))
    np.testing.assert_allclose(standard, [f @ p_alice, f @ p_bob, f.mean()], atol=1e-6)
    assert abs(standard[0] - standard[1]) > 1e-3
    with pytest.raises(ValueError, match="no column 'user_id'"):
        reward([prompt], [completion], account=["x"])
    other = PersonalizedReward(tmp / "model", reward.service.embedder, tmp / "users.db", user_column="account",
                               uncertainty_penalty=0.5)
    penalised = other([prompt, prompt], [completion, completion], account=["alice", "nobody"])
    assert penalised[0] < standard[0] and penalised[1] < standard[2]
