"""The paper's metric (SPEC §5) against a direct per-user computation."""

import csv

import numpy as np
import pytest

from mrm.data.pairs import PreferenceData, UserPairs
from mrm.evaluate import evaluate_features, worst_mean


def _softmax(w):
    e = np.exp(w - w.max())
    return e / e.sum()


def test_user_level_accuracy_and_worst_users_match_a_direct_computation(tmp_path):
    rng = np.random.default_rng(0)
    n_rows, k, n_users = 25, 3, 12
    features = rng.normal(size=(n_rows, k))
    w0 = rng.normal(size=k)
    train, test = [], []
    for u in range(n_users):
        train.append([(int(rng.integers(n_rows)), int(rng.integers(n_rows)), i) for i in range(int(rng.integers(0, 5)))])
        test.append([(int(rng.integers(n_rows)), int(rng.integers(n_rows)), i) for i in range(int(rng.integers(0 if u == 3 else 1, 6)))])
    test[3] = []  # a user without test pairs is left out and counted
    seen = np.arange(n_users) % 3 != 0
    data = PreferenceData([("", str(i)) for i in range(n_rows)], [f"u{u}" for u in range(n_users)],
                          UserPairs.from_lists(train), UserPairs.from_lists(test), seen)
    result = evaluate_features(features, w0, data, steps=0, lr=1.0)
    expected = np.full(n_users, np.nan)
    p = _softmax(w0)
    for u in range(n_users):
        if test[u]:
            expected[u] = np.mean([features[c] @ p > features[r] @ p for c, r, _ in test[u]])
    np.testing.assert_allclose(result.accuracy, expected, equal_nan=True)
    summary = result.summary()
    assert summary["users_without_test_pairs"] == 1
    for name, mask in (("seen", seen), ("unseen", ~seen)):
        acc = expected[mask & ~np.isnan(expected)]
        assert summary[name] == pytest.approx(acc.mean())
        worst = np.sort(acc)[: int(np.ceil(0.1 * len(acc)))]
        assert summary[f"{name}_worst10"] == pytest.approx(worst.mean())
    result.write_csv(tmp_path / "users.csv")
    rows = list(csv.DictReader(open(tmp_path / "users.csv")))
    assert len(rows) == n_users and rows[3]["accuracy"] == "" and rows[0]["user_id"] == "u0"


def test_ties_count_as_wrong():
    features = np.array([[1.0, 0.0], [1.0, 0.0]])
    data = PreferenceData([("", "a"), ("", "b")], ["u"], UserPairs.from_lists([[]]),
                          UserPairs.from_lists([[(0, 1, 0)]]), [False])
    assert evaluate_features(features, np.zeros(2), data, steps=0, lr=1.0).accuracy[0] == 0.0


def test_worst_mean_takes_at_least_one_user():
    assert worst_mean(np.array([0.9, 0.2, 0.5])) == pytest.approx(0.2)
    assert worst_mean(np.arange(20) / 20) == pytest.approx(0.025)
