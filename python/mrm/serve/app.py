"""``mrm serve``: the reward service over HTTP (FastAPI + uvicorn, the ``mrm-fast[serve]`` extra).

Endpoints (JSON):

``POST /get_reward``  OpenRLHF's remote reward model: ``{"query": [full text, ...], "prompts":
    [prompt, ...], "labels": [user id, ...]}`` → ``{"rewards": [...], "scores": [...],
    "extra_logs": {"fallback": [...], "version": [...]}}``. The response is ``query`` minus its
    leading ``prompt`` (the whole query when it does not start with it); the user id rides in
    ``labels`` (missing or null: the shared start w0).
``POST /score``  ``{"user_ids": [...] | "user_id": str, "prompts": [...], "responses": [...]}`` or
    ``{"user_ids"/"user_id", "embeddings": [[D floats], ...]}`` → ``{"rewards", "fallback",
    "versions"}`` (+ ``"stddev"`` with an uncertainty penalty).
``POST /feedback``  ``{"user_id": str, "pairs": [{"prompt", "chosen", "rejected"}, ...]}`` or
    ``{"user_id", "chosen_embeddings": [...], "rejected_embeddings": [...]}``: adapts the user from
    its stored state (:func:`mrm.store.adapt_online`) and replies only after the new state is
    committed → ``{"user_id", "version", "n_pairs", "weights", "support_loss", "new_pairs"}``.
``GET /users/{user_id}``  the stored state (404 for an unknown user).
``GET /health``, ``GET /metrics`` (Prometheus text format).

Concurrent requests are micro-batched: scoring requests arriving within ``max_wait_ms`` (up to
``max_batch`` rows) share one backbone forward and one scoring pass; feedback requests share one
store transaction (one fsync). Limits: ``max_body_bytes`` per request body (413), ``max_items``
rows per request and ``max_text_chars`` per text (422). Bad input is a 4xx with a ``detail``
message naming the field; the server binds to 127.0.0.1 unless told otherwise.
"""

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np

from mrm.serve.service import RewardService

__all__ = ["ServeLimits", "create_app"]

MessageList = List[Dict[str, str]]


@dataclass(frozen=True)
class ServeLimits:
    max_body_bytes: int = 8 << 20
    max_items: int = 1024
    max_text_chars: int = 32_768
    max_batch: int = 512
    """Rows per micro-batch (scoring) / requests per transaction (feedback)."""
    max_wait_ms: float = 2.0
    """How long a micro-batch waits for more requests after the first one."""


def _require_fastapi():
    try:
        import fastapi
        import pydantic
    except ImportError as exc:
        raise ImportError(f"mrm serve needs FastAPI and uvicorn: pip install 'mrm-fast[serve]' ({exc})") from None
    return fastapi, pydantic


class _Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.counters: Dict[str, float] = {}

    def add(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        with self.lock:
            self.counters[key] = self.counters.get(key, 0.0) + value

    def text(self, gauges: Dict[str, float]) -> str:
        with self.lock:
            items = sorted(self.counters.items())
        lines = [f"mrm_{k} {v:g}" for k, v in items] + [f"mrm_{k} {v:g}" for k, v in sorted(gauges.items())]
        return "\n".join(lines) + "\n"


class _Batcher:
    """Collects jobs for up to ``max_wait`` seconds / ``max_size`` units, runs ``fn(jobs)`` on the
    service's worker thread, hands each job its result. If the batch fails with a ValueError or
    TypeError, each job is rerun alone, so one bad request never fails the others."""

    def __init__(self, fn: Callable[[List[Any]], List[Any]], executor: ThreadPoolExecutor, max_size: int,
                 max_wait: float, metrics: _Metrics, name: str):
        self.fn, self.executor, self.max_size, self.max_wait = fn, executor, max_size, max_wait
        self.metrics, self.name = metrics, name
        self.queue: Optional[asyncio.Queue] = None
        self.task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def submit(self, job: Any, size: int) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((job, size, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch, total = [first], first[1]
            deadline = loop.time() + self.max_wait
            while total < self.max_size:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                batch.append(item)
                total += item[1]
            live = [entry for entry in batch if not entry[2].done()]  # a client may have gone
            if not live:
                continue
            self.metrics.add("batches_total", 1, kind=self.name)
            self.metrics.add("batch_items_total", total, kind=self.name)
            jobs = [entry[0] for entry in live]
            try:
                results = await loop.run_in_executor(self.executor, self.fn, jobs)
            except (ValueError, TypeError) as exc:
                if len(jobs) == 1:
                    self._fail(live[0][2], exc)
                    continue
                for job, _, future in live:  # isolate the bad request
                    try:
                        (result,) = await loop.run_in_executor(self.executor, self.fn, [job])
                    except Exception as single:  # noqa: BLE001 - handed to that request
                        self._fail(future, single)
                    else:
                        if not future.done():
                            future.set_result(result)
                continue
            except Exception as exc:  # noqa: BLE001 - every waiting request gets the error
                for _, _, future in live:
                    self._fail(future, exc)
                continue
            for (_, _, future), result in zip(live, results):
                if not future.done():
                    future.set_result(result)

    @staticmethod
    def _fail(future: asyncio.Future, exc: BaseException) -> None:
        if not future.done():
            future.set_exception(exc)


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 without reading it all."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(send)
        received = 0
        too_large = False

        async def limited_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    too_large = True
                    raise _TooLarge()
            return message

        try:
            return await self.app(scope, limited_receive, send)
        except _TooLarge:
            return await self._reject(send)

    async def _reject(self, send):
        body = f'{{"detail":"request body larger than {self.limit} bytes"}}'.encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(service: RewardService, limits: ServeLimits = ServeLimits()):
    """The FastAPI application over ``service`` (start it with uvicorn, see :func:`mrm.serve.run`)."""
    _, pydantic = _require_fastapi()
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from pydantic import BaseModel, ConfigDict

    max_items, max_chars = limits.max_items, limits.max_text_chars
    Text = pydantic.constr(max_length=max_chars)  # noqa: N806 - a type
    UserId = pydantic.constr(min_length=1, max_length=1024)  # noqa: N806
    Prompt = Union[Text, List[Dict[str, Text]]]  # noqa: N806
    Vector = pydantic.conlist(float, max_length=service.input_dim)  # noqa: N806
    Vectors = Optional[pydantic.conlist(Vector, max_length=max_items)]  # noqa: N806

    class _Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class GetRewardRequest(BaseModel):
        query: pydantic.conlist(Text, min_length=1, max_length=max_items)
        prompts: Optional[pydantic.conlist(Text, max_length=max_items)] = None
        labels: Optional[pydantic.conlist(Optional[Union[UserId, int]], max_length=max_items)] = None

    class ScoreRequest(_Strict):
        user_id: Optional[UserId] = None
        user_ids: Optional[pydantic.conlist(Optional[UserId], max_length=max_items)] = None
        prompts: Optional[pydantic.conlist(Optional[Prompt], max_length=max_items)] = None
        responses: Optional[pydantic.conlist(Text, max_length=max_items)] = None
        embeddings: Vectors = None

    class Pair(_Strict):
        prompt: Prompt = ""
        chosen: Text
        rejected: Text

    class FeedbackRequest(_Strict):
        user_id: UserId
        pairs: Optional[pydantic.conlist(Pair, max_length=max_items)] = None
        chosen_embeddings: Vectors = None
        rejected_embeddings: Vectors = None

    metrics = _Metrics()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrm-serve")
    started_at = time.time()

    def score_batch(jobs: List[dict]) -> List[dict]:
        # one backbone forward over every text job, one scoring pass over every row
        text_jobs = [j for j in jobs if "responses" in j]
        embedded: Dict[int, np.ndarray] = {}
        if text_jobs:
            prompts = [p for j in text_jobs for p in j["prompts"]]
            responses = [r for j in text_jobs for r in j["responses"]]
            all_rows = service.embed(prompts, responses)
            lo = 0
            for j in text_jobs:
                embedded[id(j)] = all_rows[lo:lo + len(j["responses"])]
                lo += len(j["responses"])
        matrices = [embedded[id(j)] if id(j) in embedded else j["embeddings"] for j in jobs]
        users = [u for j in jobs for u in j["user_ids"]]
        scores = service.score_embeddings(users, np.concatenate(matrices))
        out, lo = [], 0
        for j, m in zip(jobs, matrices):
            part = slice(lo, lo + len(m))
            lo += len(m)
            result = {"rewards": scores.rewards[part].tolist(), "fallback": scores.fallback[part].tolist(),
                      "versions": scores.versions[part].tolist()}
            if scores.stddev is not None:
                result["stddev"] = scores.stddev[part].tolist()
            out.append(result)
        return out

    def feedback_batch(jobs: List[dict]) -> List[dict]:
        items = []
        for j in jobs:
            if "pairs" in j:
                d = service.text_differences(*j["pairs"])
            else:
                d = service.differences(j["chosen"], j["rejected"])
            items.append((j["user_id"], d))
        updates = service.feedback(items)  # committed when this returns
        return [{"user_id": u.state.user_id, "version": u.state.version, "n_pairs": u.state.n_pairs,
                 "weights": u.state.weights.tolist(), "support_loss": u.state.support_loss,
                 "new_pairs": u.new_pairs} for u in updates]

    wait = limits.max_wait_ms / 1000.0
    scorer = _Batcher(score_batch, executor, limits.max_batch, wait, metrics, "score")
    feeder = _Batcher(feedback_batch, executor, limits.max_batch, wait, metrics, "feedback")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scorer.start()
        feeder.start()
        try:
            yield
        finally:
            await scorer.stop()
            await feeder.stop()
            executor.shutdown(wait=True)
            service.store.close()

    app = FastAPI(title="mrm-fast reward service", lifespan=lifespan)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError):
        return JSONResponse(status_code=400, content={"detail": " ".join(str(exc).split())})

    @app.exception_handler(TypeError)
    async def type_error(request: Request, exc: TypeError):
        return JSONResponse(status_code=400, content={"detail": " ".join(str(exc).split())})

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.add("requests_total", 1, path=path, status=str(response.status_code))
        metrics.add("request_seconds_sum", time.perf_counter() - t0, path=path)
        return response

    def _embeddings(name: str, rows) -> np.ndarray:
        array = np.asarray(rows, dtype=np.float64) if rows else np.zeros((0, service.input_dim))
        if array.ndim != 2 or array.shape[1] != service.input_dim:
            raise ValueError(f"{name} must be a list of {service.input_dim}-float vectors (the checkpoint's input_dim)")
        return service.check_embeddings(array, name)

    def _user_list(user_id, user_ids, n: int) -> List[Optional[str]]:
        if user_id is not None and user_ids is not None:
            raise ValueError("give user_id or user_ids, not both")
        if user_ids is None:
            return [user_id] * n
        if len(user_ids) != n:
            raise ValueError(f"user_ids has {len(user_ids)} entries but there are {n} rows to score")
        return list(user_ids)

    @app.post("/score")
    async def score(body: ScoreRequest):
        if (body.embeddings is None) == (body.responses is None):
            raise ValueError("give either responses (with prompts) or embeddings")
        if body.embeddings is not None:
            if body.prompts is not None:
                raise ValueError("prompts go with responses, not with embeddings")
            matrix = _embeddings("embeddings", body.embeddings)
            job = {"embeddings": matrix, "user_ids": _user_list(body.user_id, body.user_ids, len(matrix))}
            n = len(matrix)
        else:
            n = len(body.responses)
            prompts = body.prompts if body.prompts is not None else [""] * n
            if len(prompts) != n:
                raise ValueError(f"prompts has {len(prompts)} entries but responses has {n}")
            job = {"prompts": prompts, "responses": list(body.responses),
                   "user_ids": _user_list(body.user_id, body.user_ids, n)}
        if n == 0:
            return {"rewards": [], "fallback": [], "versions": []}
        metrics.add("scored_rows_total", n)
        return await scorer.submit(job, n)

    @app.post("/get_reward")
    async def get_reward(body: GetRewardRequest):
        n = len(body.query)
        prompts = body.prompts if body.prompts is not None else [""] * n
        if len(prompts) != n:
            raise ValueError(f"prompts has {len(prompts)} entries but query has {n}")
        labels = body.labels if body.labels is not None else [None] * n
        if len(labels) != n:
            raise ValueError(f"labels has {len(labels)} entries but query has {n}")
        responses = [q[len(p):] if p and q.startswith(p) else q for q, p in zip(body.query, prompts)]
        users = [None if label is None else str(label) for label in labels]
        metrics.add("scored_rows_total", n)
        result = await scorer.submit({"prompts": prompts, "responses": responses, "user_ids": users}, n)
        extra = {"fallback": result["fallback"], "version": result["versions"]}
        if "stddev" in result:
            extra["stddev"] = result["stddev"]
        return {"rewards": result["rewards"], "scores": result["rewards"], "extra_logs": extra}

    @app.post("/feedback")
    async def feedback(body: FeedbackRequest):
        if (body.pairs is None) == (body.chosen_embeddings is None and body.rejected_embeddings is None):
            raise ValueError("give either pairs (prompt/chosen/rejected texts) or chosen_embeddings and "
                             "rejected_embeddings")
        if body.pairs is not None:
            if not body.pairs:
                raise ValueError("pairs is empty")
            for i, pair in enumerate(body.pairs):
                if pair.chosen == pair.rejected:
                    raise ValueError(f"pairs[{i}]: chosen equals rejected")
            job = {"user_id": body.user_id,
                   "pairs": ([p.prompt for p in body.pairs], [p.chosen for p in body.pairs],
                             [p.rejected for p in body.pairs])}
            n = len(body.pairs)
        else:
            if body.chosen_embeddings is None or body.rejected_embeddings is None:
                raise ValueError("chosen_embeddings and rejected_embeddings go together")
            chosen = _embeddings("chosen_embeddings", body.chosen_embeddings)
            rejected = _embeddings("rejected_embeddings", body.rejected_embeddings)
            if len(chosen) != len(rejected) or len(chosen) == 0:
                raise ValueError(f"chosen_embeddings ({len(chosen)} rows) and rejected_embeddings "
                                 f"({len(rejected)} rows) must be non-empty and of the same length")
            job = {"user_id": body.user_id, "chosen": chosen, "rejected": rejected}
            n = len(chosen)
        result = await feeder.submit(job, 1)
        metrics.add("feedback_pairs_total", n)
        metrics.add("feedback_updates_total", 1)
        return result

    @app.get("/users/{user_id}")
    async def user(user_id: str):
        state = service.user(user_id)
        if state is None:
            raise HTTPException(status_code=404, detail=f"unknown user {user_id!r}")
        return state

    @app.get("/health")
    async def health():
        return {"status": "ok", "num_bases": service.checkpoint.num_bases, "input_dim": service.input_dim,
                "backbone": None if service.embedder is None else str(getattr(service.embedder, "backbone_id", "")),
                "adaptation": service.settings.inner.to_dict(),
                "store": service.store.info(), "uptime_s": time.time() - started_at}

    @app.get("/metrics")
    async def metrics_endpoint():
        info = service.store.info()
        gauges = {"store_users": info["users"], "store_pairs": info["pairs"],
                  "unknown_users_scored_total": service.unknown_users_scored}
        return PlainTextResponse(metrics.text(gauges))

    return _BodyLimit(app, limits.max_body_bytes)
