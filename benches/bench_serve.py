"""Benchmark `mrm serve`'s /score against a plain per-request PyTorch server, same run, same HTTP stack.

Both servers run FastAPI + uvicorn on 127.0.0.1 in their own process and answer the same
requests: one user, ``--rows`` rows per request, ``--clients`` concurrent clients for
``--seconds`` each. Two input forms: precomputed embeddings (D = 384) and texts through the
MiniLM backbone. The baseline does per request what a straightforward implementation does: look
the user's weights up in the same SQLite store, run the backbone (texts) on that request's rows
alone, then φ and the softmax-weighted sum in torch. mrm micro-batches concurrent requests into
one backbone forward and one scoring pass.

    python benches/bench_serve.py [--seconds 10] [--clients 16] [--rows 4]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

BASELINE = r'''
import sqlite3, sys
import numpy as np, torch, uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from typing import List, Optional
sys.path.insert(0, sys.argv[4])
from mrm.checkpoint import Checkpoint
torch.set_num_threads(1)
ck = Checkpoint.load(sys.argv[1])
W = [torch.tensor(w, dtype=torch.float32) for w, _ in ck.layers]
w0 = torch.tensor(ck.w0, dtype=torch.float32)
backbone = None
if sys.argv[3] != "-":
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(sys.argv[3])
    enc = transformers.AutoModel.from_pretrained(sys.argv[3]).eval()
app = FastAPI()
class Req(BaseModel):
    user_id: str
    embeddings: Optional[List[List[float]]] = None
    prompts: Optional[List[str]] = None
    responses: Optional[List[str]] = None
@app.post("/score")
def score(r: Req):
    db = sqlite3.connect(sys.argv[2])
    row = db.execute("SELECT weights FROM users WHERE user_id = ?", (r.user_id,)).fetchone()
    db.close()
    w = torch.tensor(np.frombuffer(row[0], "<f8"), dtype=torch.float32) if row else w0
    with torch.inference_mode():
        if r.embeddings is not None:
            x = torch.tensor(r.embeddings)
        else:
            t = tok(r.prompts, r.responses, padding=True, truncation=True, max_length=256, return_tensors="pt")
            h = enc(**t)[0]
            m = t["attention_mask"].unsqueeze(-1).float()
            x = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        x = x * ck.scale
        for w_l in W:
            x = x @ w_l.T
        return {"rewards": (x * torch.softmax(w, 0)).sum(-1).tolist()}
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[5]), log_level="warning", access_log=False)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process, path: str) -> None:
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            httpx.get(url + path, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def load(url: str, payloads, clients: int, seconds: float):
    import httpx

    latencies, errors = [], [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(c):
        with httpx.Client(base_url=url, timeout=60) as session:
            i = c
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = session.post("/score", json=payloads[i % len(payloads)])
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        errors[0] += 1
                i += clients

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = np.array(latencies) * 1000
    return len(lat) / wall, float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), errors[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="load per configuration (default 10)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--rows", type=int, default=4, help="rows scored per request (default 4)")
    parser.add_argument("--users", type=int, default=1000, help="users in the store (default 1000)")
    args = parser.parse_args()

    from mrm.checkpoint import Checkpoint
    from mrm.embed import minilm_path
    from mrm.store import UserStore

    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    d, k = 384, 8
    Checkpoint(input_dim=d, num_bases=k, hidden_sizes=[], scale=1.0, activation=None,
               layers=[(rng.normal(size=(k, d)).astype(np.float32) * 0.1, None)],
               w0=np.zeros(k, np.float32)).save(tmp / "model")
    with UserStore(tmp / "users.db", k) as s:
        for u in range(args.users):
            s.put(f"user{u}", rng.normal(size=k))
    words = "the a good bad movie film plot actor scene music story great boring long short fun".split()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"), HF_HUB_OFFLINE="1", MRM_NUM_THREADS="1",
               MRM_CACHE_DIR=str(tmp / "cache"), OMP_NUM_THREADS="1")
    results = []
    for form in ("embeddings", "minilm"):
        payloads = []
        for i in range(512):
            user = f"user{rng.integers(0, args.users * 1.1)}"  # ~9 % unknown users
            if form == "embeddings":
                e = rng.normal(size=(args.rows, d))
                payloads.append({"user_id": user, "embeddings": (e / np.linalg.norm(e, axis=1, keepdims=True)).tolist()})
            else:
                # fresh texts: every request needs a backbone forward (no cache hits)
                texts = [" ".join(rng.choice(words, 8)) + f" {i} {j}" for j in range(args.rows)]
                payloads.append({"user_id": user, "prompts": ["review this"] * args.rows, "responses": texts})
        for impl in ("mrm serve", "per-request torch"):
            port = free_port()
            backbone = str(minilm_path()) if form == "minilm" else None
            if impl == "mrm serve":
                cmd = [sys.executable, "-m", "mrm.cli", "serve", "--checkpoint", str(tmp / "model"),
                       "--store", str(tmp / "users.db"), "--port", str(port), "--max-wait-ms", "2"]
                if backbone:
                    cmd += ["--backbone", backbone, "--cache-dir", str(tmp / f"cache-{port}")]
                health = "/health"
            else:
                cmd = [sys.executable, "-c", BASELINE, str(tmp / "model"), str(tmp / "users.db"), backbone or "-",
                       str(ROOT / "python"), str(port)]
                health = "/docs"
            process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                url = f"http://127.0.0.1:{port}"
                wait_healthy(url, process, health)
                load(url, payloads[:8], 2, 1.0)  # warm-up
                rps, p50, p99, errors = load(url, payloads, args.clients, args.seconds)
            finally:
                process.terminate()
                process.wait(timeout=30)
            results.append((form, impl, rps, p50, p99, errors))
            print(f"{form:>10} {impl:>18}: {rps:8.1f} req/s  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  errors {errors}",
                  flush=True)
    print()
    print("| input | server | requests/s | p50 ms | p99 ms | rows/request | clients |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for form, impl, rps, p50, p99, errors in results:
        print(f"| {form} | {impl} | {rps:.1f} | {p50:.1f} | {p99:.1f} | {args.rows} | {args.clients} |")
    for form in ("embeddings", "minilm"):
        mine = next(r for r in results if r[0] == form and r[1] == "mrm serve")
        base = next(r for r in results if r[0] == form and r[1] != "mrm serve")
        print(f"{form}: mrm serve / per-request torch throughput = {mine[2] / base[2]:.2f}x")


if __name__ == "__main__":
    main()
