"""`mrm serve` over real HTTP on 127.0.0.1: a uvicorn server in a subprocess per test module.

Checked against the library path (numpy φ and softmax, the autograd reference adaptation, the
embedding cache used directly), with concurrent clients, bad requests, and a kill -9 during a
burst of /feedback followed by a restart that still holds every acknowledged update.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
torch = pytest.importorskip("torch")

import reference  # noqa: E402
from mrm.checkpoint import Checkpoint  # noqa: E402
from mrm.ops import InnerLoop  # noqa: E402
from mrm.store import AdaptSettings, UserStore  # noqa: E402

D, K = 16, 3
SETTINGS = AdaptSettings(InnerLoop("sgd", steps=2, lr=0.5))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mrm serve` in a subprocess, on a free loopback port."""

    def __init__(self, tmp: Path, checkpoint: Path, store: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the installed mrm-fast, as a user's would run it (a clean checkout has no compiled extension)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MRM_CACHE_DIR=str(tmp / "cache"))
        self.log = open(tmp / f"server-{self.port}.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mrm.cli", "serve", "--checkpoint", str(checkpoint), "--store", str(store),
             "--host", "127.0.0.1", "--port", str(self.port), "--steps", str(SETTINGS.steps), "--lr", str(SETTINGS.lr),
             "--optimizer", SETTINGS.optimizer, *extra],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.read_log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become healthy: {self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def kill9(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)
        self.log.close()


def make_checkpoint(path: Path, seed: int = 0) -> Checkpoint:
    rng = np.random.default_rng(seed)
    checkpoint = Checkpoint(
        input_dim=D, num_bases=K, hidden_sizes=[5], scale=0.5, activation="tanh",
        layers=[(rng.normal(size=(5, D)), rng.normal(size=5)), (rng.normal(size=(K, 5)), rng.normal(size=K))],
        w0=rng.normal(size=K),
    )
    checkpoint.save(path)
    return Checkpoint.load(path)


def library_rewards(checkpoint: Checkpoint, store_path: Path, users, embeddings) -> np.ndarray:
    """φ(e) · softmax(w_u) with numpy, weights read straight from the database (w0 when unknown)."""
    with UserStore(store_path, readonly=True) as s:
        weights = np.stack([s.get(u).weights if (u is not None and s.get(u) is not None) else checkpoint.w0
                            for u in users])
    return checkpoint.rewards(np.asarray(embeddings, np.float64), weights)


def reference_replay(checkpoint: Checkpoint, blocks) -> np.ndarray:
    w = torch.as_tensor(checkpoint.w0, dtype=torch.float64)
    for block in blocks:
        w = reference.adapt_user(w, torch.as_tensor(block), SETTINGS.steps, SETTINGS.lr, SETTINGS.optimizer).detach()
    return w.numpy()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from test_embed import save_tiny_bert

    path = tmp_path_factory.mktemp("bert") / "bert"
    save_tiny_bert(path, hidden_size=D)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("serve")
    checkpoint = make_checkpoint(tmp / "model")
    store = tmp / "users.db"
    rng = np.random.default_rng(5)
    with UserStore(store, K) as s:
        for i in range(4):
            s.put(f"known{i}", rng.normal(size=K) * 2, n_pairs=3)
    srv = Server(tmp, tmp / "model", store, "--backbone", str(tiny_bert), "--max-body-mb", "0.25",
                 "--max-items", "64")
    srv.checkpoint, srv.store = checkpoint, store
    yield srv
    srv.stop()


def test_score_embeddings_equals_library_path(server):
    rng = np.random.default_rng(0)
    users = ["known0", "known1", "nobody", "known0", "known3", None]
    embeddings = rng.normal(size=(len(users), D))
    reply = httpx.post(server.url + "/score", json={"user_ids": users, "embeddings": embeddings.tolist()}, timeout=30)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    np.testing.assert_allclose(body["rewards"], library_rewards(server.checkpoint, server.store, users, embeddings),
                               rtol=0, atol=1e-12)
    assert body["fallback"] == [False, False, True, False, False, True]
    assert body["versions"][0] == 1 and body["versions"][2] == 0


def test_get_reward_openrlhf_shape_equals_library_path(server, tiny_bert, tmp_path):
    from mrm.embed import EmbeddingCache

    prompts = ["what is the weather today", "tell me about cats", "why"]
    responses = [" it is sunny", " cats are good", " because"]
    labels = ["known1", "stranger", "known2"]
    reply = httpx.post(server.url + "/get_reward", timeout=60,
                       json={"query": [p + r for p, r in zip(prompts, responses)], "prompts": prompts, "labels": labels})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert set(body) == {"rewards", "scores", "extra_logs"} and body["rewards"] == body["scores"]
    assert body["extra_logs"]["fallback"] == [False, True, False]
    embeddings = EmbeddingCache(tmp_path / "cache", tiny_bert).embed(list(zip(prompts, responses)), progress=False)
    np.testing.assert_allclose(body["rewards"], library_rewards(server.checkpoint, server.store, labels, embeddings),
                               rtol=0, atol=1e-6)


def test_feedback_adapts_from_the_stored_state(server):
    rng = np.random.default_rng(1)
    blocks_e = [(rng.normal(size=(3, D)), rng.normal(size=(3, D))), (rng.normal(size=(2, D)), rng.normal(size=(2, D)))]
    for version, (chosen, rejected) in enumerate(blocks_e, start=1):
        reply = httpx.post(server.url + "/feedback", timeout=30, json={
            "user_id": "learner", "chosen_embeddings": chosen.tolist(), "rejected_embeddings": rejected.tolist()})
        assert reply.status_code == 200, reply.text
        assert reply.json()["version"] == version
    phi = server.checkpoint.features
    blocks = [phi(c) - phi(r) for c, r in blocks_e]
    state = httpx.get(server.url + "/users/learner", timeout=10).json()
    assert state["version"] == 2 and state["n_pairs"] == 5
    np.testing.assert_allclose(state["weights"], reference_replay(server.checkpoint, blocks), atol=1e-12)
    # text feedback goes through the backbone; the user's next score uses the new weights
    reply = httpx.post(server.url + "/feedback", timeout=60, json={
        "user_id": "learner", "pairs": [{"prompt": "tell me about dogs", "chosen": "dogs are good", "rejected": "no"}]})
    assert reply.status_code == 200 and reply.json()["version"] == 3


def test_bad_requests_are_clear_4xx(server):
    post = lambda path, payload: httpx.post(server.url + path, json=payload, timeout=30)  # noqa: E731
    r = post("/score", {"user_id": "a", "embeddings": [[0.0] * (D - 1)]})
    assert r.status_code == 400 and "input_dim" in r.json()["detail"]
    nan_row = "[" + ",".join(["NaN"] * D) + "]"
    r = httpx.post(server.url + "/score", content=f'{{"user_id": "a", "embeddings": [{nan_row}]}}'.encode(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code in (400, 422) and "finite" in r.text.lower()
    r = post("/score", {"user_id": "a"})
    assert r.status_code == 400 and "responses" in r.json()["detail"]
    r = post("/score", {"user_id": "a", "responses": ["x"], "colour": "red"})
    assert r.status_code == 422 and "colour" in r.text
    r = post("/score", {"user_ids": ["a", "b"], "embeddings": [[0.0] * D]})
    assert r.status_code == 400 and "user_ids has 2 entries" in r.json()["detail"]
    r = post("/score", {"user_id": "a", "embeddings": [[0.0] * D] * 65})  # over --max-items 64
    assert r.status_code == 422
    r = post("/get_reward", {"query": ["a", "b"], "labels": ["u"]})
    assert r.status_code == 400 and "labels has 1 entries" in r.json()["detail"]
    r = post("/feedback", {"user_id": "a", "pairs": [{"prompt": "p", "chosen": "same", "rejected": "same"}]})
    assert r.status_code == 400 and "chosen equals rejected" in r.json()["detail"]
    r = post("/feedback", {"user_id": "", "chosen_embeddings": [[0.0] * D], "rejected_embeddings": [[1.0] * D]})
    assert r.status_code == 422
    r = httpx.post(server.url + "/score", content=b"x" * (300 << 10), headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 413
    r = httpx.post(server.url + "/score", content=b"{not json", headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 422
    assert httpx.get(server.url + "/users/never-seen", timeout=10).status_code == 404
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_concurrent_clients(server):
    rng = np.random.default_rng(2)
    n_threads, n_requests = 6, 8
    payloads = [[(rng.normal(size=(2, D)), rng.normal(size=(2, D)), rng.normal(size=(3, D)))
                 for _ in range(n_requests)] for _ in range(n_threads)]
    failures, scored = [], []

    def client(t):
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for chosen, rejected, probe in payloads[t]:
                r = c.post("/feedback", json={"user_id": f"conc{t}", "chosen_embeddings": chosen.tolist(),
                                              "rejected_embeddings": rejected.tolist()})
                if r.status_code != 200:
                    failures.append(r.text)
                r = c.post("/score", json={"user_ids": [f"conc{t}", "known0", "zzz"], "embeddings": probe.tolist()})
                if r.status_code != 200:
                    failures.append(r.text)
                else:
                    scored.append(r.json()["rewards"])

    threads = [threading.Thread(target=client, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures and len(scored) == n_threads * n_requests
    phi = server.checkpoint.features
    for t in range(n_threads):
        state = httpx.get(server.url + f"/users/conc{t}", timeout=10).json()
        assert state["version"] == n_requests
        blocks = [phi(c) - phi(r) for c, r, _ in payloads[t]]
        np.testing.assert_allclose(state["weights"], reference_replay(server.checkpoint, blocks), atol=1e-12)
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'mrm_requests_total{path="/feedback",status="200"}' in metrics
    assert "mrm_batches_total" in metrics


def test_kill_9_mid_feedback_loses_no_acknowledged_update(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "model", seed=3)
    store = tmp_path / "users.db"
    server = Server(tmp_path, tmp_path / "model", store)  # no backbone: embeddings only, quick start
    rng = np.random.default_rng(4)
    acked = []  # (user, version, chosen, rejected)
    lock = threading.Lock()
    stop = threading.Event()

    def client(t):
        local = np.random.default_rng(100 + t)
        with httpx.Client(base_url=server.url, timeout=10) as c:
            for i in range(10_000):  # bounded; the kill ends it long before
                if stop.is_set():
                    return
                user = f"burst{t}-{i % 3}"
                chosen, rejected = local.normal(size=(2, D)), local.normal(size=(2, D))
                try:
                    r = c.post("/feedback", json={"user_id": user, "chosen_embeddings": chosen.tolist(),
                                                  "rejected_embeddings": rejected.tolist()})
                except httpx.HTTPError:
                    return  # the server died: this request was not acknowledged
                if r.status_code == 200:
                    with lock:
                        acked.append((user, r.json()["version"], chosen, rejected))

    threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(acked) < 60:
        time.sleep(0.01)
    server.kill9()  # mid-burst: requests are in flight
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acked) >= 60
    del rng

    restarted = Server(tmp_path, tmp_path / "model", store)
    try:
        phi = checkpoint.features
        with UserStore(store, readonly=True) as s:
            for user, version, chosen, rejected in acked:
                history, versions = s.history(user)
                np.testing.assert_allclose(history[versions == version], phi(chosen) - phi(rejected), atol=1e-12)
                assert s.get(user).version >= version
            for user in {a[0] for a in acked}:
                history, versions = s.history(user)
                state = s.get(user)
                # versions are 1..n with no gap, and the weights are the replay of the whole history
                assert sorted(set(versions.tolist())) == list(range(1, state.version + 1))
                blocks = [history[versions == v] for v in range(1, state.version + 1)]
                np.testing.assert_allclose(state.weights, reference_replay(checkpoint, blocks), atol=1e-10)
                served = httpx.get(restarted.url + f"/users/{user}", timeout=10).json()
                assert served["version"] == state.version
        print(f"kill -9 test: {len(acked)} acknowledged updates, all present after restart")
    finally:
        restarted.stop()
