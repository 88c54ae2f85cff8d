"""Runs in a fresh environment holding only numpy and the built wheel (not collected by pytest)."""

import importlib.util

import numpy as np

import mrm

assert importlib.util.find_spec("torch") is None, "torch must not be needed (nor installed here)"
rng = np.random.default_rng(0)
support, query = rng.normal(size=(30, 4)).astype(np.float32), rng.normal(size=(20, 4)).astype(np.float32)
s_off, q_off = np.array([0, 10, 30]), np.array([0, 5, 20])
w0 = np.zeros(4, dtype=np.float32)
weights = mrm.ops.adapt(w0, support, s_off, steps=3, lr=0.1)
out = mrm.ops.meta_forward(w0, support, s_off, query, q_off, steps=3, lr=0.1, optimizer="sgd")
grads = mrm.ops.meta_backward(w0, support, s_off, query, q_off, np.ones(2, np.float32), steps=3, lr=0.1)
objective, grad = mrm.ops.rpo(out.losses, 0.5, 0.5)
rewards = mrm.ops.score(query, q_off, weights)
assert weights.shape == (2, 4) and rewards.shape == (20,) and grads[1].shape == support.shape
assert all(np.isfinite(a).all() for a in (weights, out.losses, *grads, grad, rewards))
print(f"wheel smoke test OK: mrm {mrm.__version__}, numpy {np.__version__}, no torch")
