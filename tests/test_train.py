"""MetaTrainer: the epoch split, parity with an independent per-user loop, ground-truth recovery
against a global Bradley–Terry model, RPO's weighting, resume, and bad input."""

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import reference  # noqa: E402
from mrm import ops  # noqa: E402
from mrm.data.pairs import PreferenceData, UserPairs  # noqa: E402
from mrm.model import MetaRewardModel  # noqa: E402
from mrm.train import MetaTrainer, TrainConfig, fit_global_bradley_terry, split_support_query  # noqa: E402


def _random_data(seed=0, n_users=8, n_rows=30, dim=8, max_pairs=9, groups=False):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n_rows, dim))
    per_user_train, per_user_test = [], []
    for u in range(n_users):
        n = int(rng.integers(1, max_pairs))
        g = rng.integers(0, 3, size=n) if groups else np.arange(n)
        per_user_train.append([(int(rng.integers(n_rows)), int(rng.integers(n_rows)), int(g[i])) for i in range(n)])
        per_user_test.append([(int(rng.integers(n_rows)), int(rng.integers(n_rows)), i) for i in range(4)])
    texts = [("p", f"r{i}") for i in range(n_rows)]
    seen = np.arange(n_users) < (n_users * 3) // 4
    data = PreferenceData(texts, [f"u{u}" for u in range(n_users)], UserPairs.from_lists(per_user_train),
                          UserPairs.from_lists(per_user_test), seen)
    return emb, data


@pytest.mark.parametrize("val_ratio", [0.9, 0.5])
def test_split_keeps_groups_together_and_follows_the_official_counts(val_ratio):
    _, data = _random_data(seed=1, n_users=30, max_pairs=12, groups=True)
    users = np.random.default_rng(0).permutation(30)
    plan = split_support_query(data.train, users, np.random.default_rng(5), val_ratio)
    for position, u in enumerate(users):
        own = set(range(data.train.offsets[u], data.train.offsets[u + 1]))
        query = plan.query_pairs[plan.query_offsets[position]:plan.query_offsets[position + 1]]
        support = plan.support_pairs[plan.support_offsets[position]:plan.support_offsets[position + 1]]
        assert set(query) <= own and set(support) <= own
        groups = {int(g) for g in data.train.groups[list(own)]}
        q_groups = {int(g) for g in data.train.groups[query]}
        s_groups = {int(g) for g in data.train.groups[support]}
        if len(groups) == 1:
            assert set(query) == set(support) == own
            continue
        assert set(query) | set(support) == own and not set(query) & set(support)
        assert not q_groups & s_groups  # a group never straddles the split
        assert len(q_groups) == max(1, int(len(groups) * val_ratio))


@pytest.mark.parametrize("layout", ["random", "stored by group", "one pair per group"])
def test_split_keeps_each_group_contiguous_in_stored_order(layout):
    rng = np.random.default_rng(3)
    lists = []
    for u in range(40):
        n = int(rng.integers(1, 10))
        g = {"random": rng.integers(0, 4, size=n), "stored by group": np.sort(rng.integers(0, 4, size=n)),
             "one pair per group": np.arange(n) + 100 * u}[layout]
        lists.append([(0, 0, int(x)) for x in g])
    pairs = UserPairs.from_lists(lists)
    users = rng.permutation(40)
    plan = split_support_query(pairs, users, np.random.default_rng(9), 0.5)
    for position, u in enumerate(users):
        own = set(range(pairs.offsets[u], pairs.offsets[u + 1]))
        query = plan.query_pairs[plan.query_offsets[position]:plan.query_offsets[position + 1]]
        support = plan.support_pairs[plan.support_offsets[position]:plan.support_offsets[position + 1]]
        n_groups = len(set(pairs.groups[list(own)].tolist()))
        if n_groups > 1:
            assert set(query) | set(support) == own and not set(query) & set(support)
            assert len(set(pairs.groups[query].tolist())) == max(1, int(n_groups * 0.5))
        for part in (query, support):
            g = pairs.groups[part]
            for value in set(g.tolist()):
                at = np.flatnonzero(g == value)
                assert np.all(np.diff(at) == 1) and np.all(np.diff(part[at]) > 0)


def test_split_changes_every_epoch_but_is_reproducible():
    emb, data = _random_data(seed=2, n_users=12, max_pairs=12)
    trainer = MetaTrainer(TrainConfig(scale=1.0, epochs=2), emb, data)
    a, b, a2 = trainer.epoch_plan(0), trainer.epoch_plan(1), trainer.epoch_plan(0)
    assert not np.array_equal(a.query_pairs, b.query_pairs)
    assert np.array_equal(a.query_pairs, a2.query_pairs) and np.array_equal(a.users, a2.users)


def _lr_factor(step, total, warmup):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@pytest.mark.parametrize("objective", ["rpo", "mean"])
def test_official_epoch_equals_an_independent_per_user_loop(objective):
    """Released configuration (tasks_per_batch 2, one inner Adam step, RPO, cosine + warm-up,
    clipping) in float64: the trainer's parameters after two epochs equal a plain per-user
    PyTorch loop (autograd through the unrolled inner step) fed the same batches."""
    emb, data = _random_data(seed=3, n_users=10, dim=6, max_pairs=8)
    config = TrainConfig(hidden_sizes=[4], scale=0.5, dtype="float64", epochs=2, warmup_ratio=0.3,
                         objective=objective, inner_lr=0.05, meta_lr=0.02, grad_clip=0.05, eval_every=100)
    trainer = MetaTrainer(config, emb, data)
    ref_model = copy.deepcopy(trainer.model)
    plans = [trainer.epoch_plan(e) for e in range(config.epochs)]
    trainer.train_epoch()
    trainer.train_epoch()

    emb_t = torch.as_tensor(emb, dtype=torch.float64)
    optim = torch.optim.Adam(ref_model.parameters(), lr=config.meta_lr)
    n_batches = math.ceil(len(plans[0].users) / 2)
    total, warmup = config.epochs * n_batches, int(0.3 * config.epochs * n_batches)
    step = 0
    for plan in plans:
        for first in range(0, len(plan.users), 2):
            for group in optim.param_groups:
                group["lr"] = config.meta_lr * _lr_factor(step, total, warmup)
            losses = []
            for position in range(first, min(first + 2, len(plan.users))):
                s = plan.support_pairs[plan.support_offsets[position]:plan.support_offsets[position + 1]]
                q = plan.query_pairs[plan.query_offsets[position]:plan.query_offsets[position + 1]]
                phi = ref_model.features(emb_t)
                d_s = phi[data.train.chosen[s]] - phi[data.train.rejected[s]]
                d_q = phi[data.train.chosen[q]] - phi[data.train.rejected[q]]
                w = reference.adapt_user(ref_model.shared_weight, d_s, steps=1, lr=config.inner_lr, optimizer="adam")
                losses.append(reference.bt_loss(w, d_q))
            losses = torch.stack(losses)
            if objective == "rpo":
                tau = torch.quantile(losses, 1 - config.tail)
                meta = (torch.sigmoid((losses - tau) / config.gamma) * losses).sum()
            else:
                meta = losses.mean()
            optim.zero_grad()
            meta.backward()
            grads = torch.cat([p.grad.flatten() for p in ref_model.parameters()])
            factor = min(1.0, config.grad_clip / (float(grads.norm()) + 1e-6))
            for p in ref_model.parameters():
                p.grad.mul_(factor)
            optim.step()
            step += 1
    for (name, got), want in zip(trainer.model.named_parameters(), ref_model.parameters()):
        np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-8, atol=1e-10, err_msg=name)
    assert any((got - p0).abs().max() > 1e-4 for got, p0 in zip(trainer.model.parameters(), MetaTrainer(config, emb, data).model.parameters()))


def _dirichlet_population(seed, n_seen=300, n_unseen=150, n_items=400, dim=12, k=3, alpha=0.2,
                          seen_pairs=40, unseen_pairs=10, test_pairs=40):
    """PersonalLLM-style ground truth: user u's true reward is Σ_k π_uk B_k(e), π_u ~ Dir(α)."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n_items, dim))
    bases = emb @ rng.normal(size=(dim, k))
    users = n_seen + n_unseen
    mix = rng.dirichlet(np.full(k, alpha), size=users)
    train, test = [], []
    for u in range(users):
        reward = bases @ mix[u]
        def pairs(n):
            a, b = rng.integers(n_items, size=n), rng.integers(n_items, size=n)
            keep = reward[a] != reward[b]
            a, b = a[keep], b[keep]
            chosen = np.where(reward[a] > reward[b], a, b)
            rejected = np.where(reward[a] > reward[b], b, a)
            return [(int(c), int(r), i) for i, (c, r) in enumerate(zip(chosen, rejected))]
        train.append(pairs(seen_pairs if u < n_seen else unseen_pairs))
        test.append(pairs(test_pairs))
    seen = np.arange(users) < n_seen
    data = PreferenceData([("", str(i)) for i in range(n_items)], [str(u) for u in range(users)],
                          UserPairs.from_lists(train), UserPairs.from_lists(test), seen)
    return emb, data


def test_ground_truth_mixture_beats_the_best_global_model_on_unseen_users():
    emb, data = _dirichlet_population(seed=0)
    config = TrainConfig(num_bases=3, scale=1.0, inner_optimizer="sgd", inner_steps=5, inner_lr=3.0,
                         meta_lr=0.05, epochs=25, tasks_per_batch=32, val_ratio=0.5, objective="mean",
                         warmup_ratio=0.05, eval_every=25, seed=0)
    trainer = MetaTrainer(config, emb, data)
    trainer.fit(progress=False)
    mrm_unseen = trainer.evaluate().summary()["unseen"]
    global_model = fit_global_bradley_terry(emb, data.train, config.model_config(emb.shape[1]))
    with torch.no_grad():
        phi = global_model.features(torch.as_tensor(emb)).numpy()
    from mrm.evaluate import evaluate_features

    global_unseen = evaluate_features(phi, np.zeros(1), data, steps=0, lr=1.0).summary()["unseen"]
    assert mrm_unseen > global_unseen + 0.03, (mrm_unseen, global_unseen)


def test_rpo_gradient_puts_more_weight_on_high_loss_users_than_the_mean():
    rng = np.random.default_rng(0)
    for _ in range(20):
        losses = rng.gamma(2.0, 0.3, size=64)
        _, grad_rpo = ops.rpo(losses, 0.5, 0.5)
        hard = losses > np.median(losses)
        share_rpo = grad_rpo[hard].sum() / grad_rpo.sum()
        assert share_rpo > 0.5  # the mean objective gives the upper half exactly 0.5
        assert np.corrcoef(losses, grad_rpo)[0, 1] > 0


def test_resume_continues_exactly(tmp_path):
    emb, data = _random_data(seed=4, n_users=10)
    config = TrainConfig(scale=0.5, dtype="float64", epochs=4, inner_lr=0.05, meta_lr=0.01, select_on="last")
    straight = MetaTrainer(config, emb, data)
    straight.fit(progress=False)
    partial_config = TrainConfig(**{**config.__dict__})
    first = MetaTrainer(partial_config, emb, data, output_dir=tmp_path / "run")
    first.config.epochs = 4
    first.train_epoch(), first._checkpoint()
    first.train_epoch(), first._checkpoint()
    resumed = MetaTrainer(config, emb, data, output_dir=tmp_path / "run", resume=True)
    assert resumed.epoch == 2
    resumed.fit(progress=False)
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    best = MetaRewardModel.from_pretrained(tmp_path / "run" / "best")
    assert best.config.num_bases == 2 and (tmp_path / "run" / "history.json").is_file()


def test_resume_with_another_k_is_refused(tmp_path):
    emb, data = _random_data(seed=4)
    MetaTrainer(TrainConfig(scale=0.5, epochs=1), emb, data, output_dir=tmp_path / "run").fit(progress=False)
    with pytest.raises(ValueError, match="num_bases = 2, but the config asks for 3"):
        MetaTrainer(TrainConfig(scale=0.5, epochs=1, num_bases=3), emb, data, output_dir=tmp_path / "run", resume=True)


def test_large_tasks_per_batch_is_one_call_per_batch(monkeypatch):
    emb, data = _random_data(seed=5, n_users=40)
    import mrm.train as train_module

    calls = []
    original = train_module.user_losses
    monkeypatch.setattr(train_module, "user_losses", lambda *a, **k: calls.append(1) or original(*a, **k))
    trainer = MetaTrainer(TrainConfig(scale=0.5, epochs=1, tasks_per_batch=1024), emb, data)
    trainer.fit(progress=False)
    assert len(calls) == 1


def test_bad_input_is_named(tmp_path):
    emb, data = _random_data(seed=6)
    bad = emb.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="embeddings row 7 contains NaN"):
        MetaTrainer(TrainConfig(), bad, data)
    with pytest.raises(ValueError, match="embeddings has 29 rows but the data has 30 texts"):
        MetaTrainer(TrainConfig(), emb[:29], data)
    empty_user = PreferenceData(data.texts, data.user_ids, data.train.select_users([0, 1, 2, 3, 4, 5, 6, 7]), data.test, data.seen)
    empty_user.train = UserPairs.from_lists([[(0, 1, 0)], [], [(2, 3, 0)], [(1, 2, 0)], [(1, 2, 0)], [(1, 2, 0)], [(1, 2, 0)], [(1, 2, 0)]])
    with pytest.raises(ValueError, match="seen user 'u1' .* has no training pairs"):
        MetaTrainer(TrainConfig(), emb, empty_user)
    out_of_range = UserPairs(data.train.offsets, data.train.chosen.copy(), data.train.rejected, data.train.groups)
    out_of_range.chosen[3] = 99
    with pytest.raises(ValueError, match="index 99 of pair 3"):
        PreferenceData(data.texts, data.user_ids, out_of_range, data.test, data.seen)
    with pytest.raises(ValueError, match="inner_optimizer"):
        MetaTrainer(TrainConfig(inner_optimizer="rmsprop"), emb, data)
