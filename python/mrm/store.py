"""A per-user weight store on SQLite (WAL mode), and the one online-adaptation function.

Online serving (``mrm serve``, :class:`mrm.integrations.trl.PersonalizedReward`) needs each
user's adapted weights by id, updated as feedback arrives. The batch jobs keep them in a
user-weights Parquet table (:mod:`mrm.batch`); this module keeps the same rows in an embedded
database, so that one writer can update single users atomically while any number of readers
(threads or processes) look them up.

Database layout (one file, plus SQLite's ``-wal`` / ``-shm`` side files)::

    meta   (key TEXT PRIMARY KEY, value TEXT)          format, version, num_bases
    users  (user_id TEXT PRIMARY KEY,
            weights BLOB,          K float64 logits (little endian): what the user is scored with
            prior BLOB,            K float64 logits the user's adaptation started from (w0 or NULL)
            posterior BLOB,        K×K float64 covariance of the logits (Laplace), or NULL
            n_pairs INTEGER,       pairs absorbed so far (all updates)
            support_loss REAL,     Bradley–Terry loss of the last update's pairs at its result
            version INTEGER,       1 after the first update, +1 on each update
            updated_at REAL)       Unix time of the last update
    pairs  (user_id TEXT, version INTEGER, seq INTEGER, difference BLOB,
            PRIMARY KEY (user_id, version, seq))       the K-dim pair differences of each update

Concurrency and durability: WAL journal (readers never block the writer nor each other),
``synchronous=FULL`` by default (a committed update survives a power cut, not only a killed
process), a busy timeout instead of "database is locked" errors. Every update is one
``BEGIN IMMEDIATE`` transaction that reads the user's state, adapts, and writes the new state
(version + 1) and the update's pairs: it is applied whole or not at all, and two writers can
never both build on the same version. One :class:`UserStore` may be shared by threads (each
thread reads through its own connection; writes go through one connection under a lock).

Import/export: :meth:`UserStore.export_parquet` writes the batch jobs' user-weights table
(``user_id, weights, n_pairs, support_loss, version``; readable by ``mrm score --weights`` and
``mrm adapt --warm-start``), :meth:`UserStore.import_parquet` reads one (e.g. the output of
``mrm adapt``).

Adaptation: :func:`adapt_online` is the only place where a user's weights are computed from
their stored state and new pairs (``/feedback``, unknown users at scoring time, the TRL reward
function). It calls :func:`mrm.ops.adapt` with the checkpoint's adaptation settings
(:class:`AdaptSettings`); a different inner solver is a change there only.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from mrm import ops

__all__ = [
    "AdaptSettings",
    "UserState",
    "UserStore",
    "Update",
    "adapt_online",
    "laplace_covariance",
]

PathLike = Union[str, Path]

FORMAT = "mrm-fast/user-store"
FORMAT_VERSION = 1
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
MAX_USER_ID_LENGTH = 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    weights BLOB NOT NULL,
    prior BLOB,
    posterior BLOB,
    n_pairs INTEGER NOT NULL,
    support_loss REAL NOT NULL,
    version INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pairs (
    user_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    difference BLOB NOT NULL,
    PRIMARY KEY (user_id, version, seq)
);
"""


# ---- adaptation ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptSettings:
    """How a user's weights are adapted online: an :class:`mrm.ops.InnerLoop` (``inner``), the
    MAP prior's log precisions ``eta`` (for ``optimizer="map"``), and, for the step loops only,
    the prior precision behind their Gauss–Newton Laplace covariance (uncertainty)."""

    inner: ops.InnerLoop = field(default_factory=ops.InnerLoop)
    eta: Optional[Tuple[float, ...]] = None
    """The checkpoint's log prior precisions (1 or K values); required by the map solver."""
    prior_precision: float = 1.0
    """λ of the isotropic prior N(w0, λ⁻¹ I) of :func:`laplace_covariance` (sgd/adam only; the
    map solver's covariance is its exact Laplace posterior under ``eta``)."""

    @property
    def is_map(self) -> bool:
        return self.inner.is_map

    @property
    def optimizer(self) -> str:
        return self.inner.optimizer

    @property
    def steps(self) -> Optional[int]:
        return self.inner.steps

    @property
    def lr(self) -> Optional[float]:
        return self.inner.lr

    def validate(self) -> "AdaptSettings":
        if not isinstance(self.inner, ops.InnerLoop):
            raise TypeError(f"inner must be an mrm.ops.InnerLoop, got {type(self.inner).__name__}")
        if self.is_map and self.eta is None:
            raise ValueError("the map solver needs the checkpoint's prior (eta): use a checkpoint trained with "
                             "inner_optimizer='map'")
        if not (isinstance(self.prior_precision, (int, float)) and math.isfinite(self.prior_precision)
                and self.prior_precision > 0):
            raise ValueError(f"prior_precision must be finite and > 0, got {self.prior_precision!r}")
        return self

    def prior_covariance(self, k: int) -> np.ndarray:
        """The covariance of a user without pairs (the prior's)."""
        if self.is_map:
            return np.diag(np.exp(-np.broadcast_to(np.asarray(self.eta, np.float64), (k,))))
        return np.eye(k) / float(self.prior_precision)

    @classmethod
    def from_checkpoint(cls, checkpoint, *, steps=None, lr=None, optimizer=None, prior_precision=None) -> "AdaptSettings":
        """The adaptation settings a checkpoint was meta-trained with (its ``config.json``), with
        overrides (None: keep); a checkpoint with a MAP prior adapts with the map solver."""
        inner = checkpoint.inner_loop(optimizer=optimizer, steps=steps, lr=lr)
        eta = getattr(checkpoint, "eta", None)
        if getattr(checkpoint, "weight_map", "simplex") == "linear" and not inner.is_map:
            raise ValueError("the checkpoint has linear user weights: adapt it with optimizer 'map'")
        settings = cls(inner=inner, eta=None if eta is None else tuple(float(x) for x in np.ravel(eta)),
                       **({} if prior_precision is None else {"prior_precision": prior_precision}))
        return settings.validate()


def _softmax(w: np.ndarray) -> np.ndarray:
    p = np.exp(w - w.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def laplace_covariance(weights: np.ndarray, differences: np.ndarray, prior_precision: float) -> np.ndarray:
    """Σ = (Jᵀ A J + λ I)⁻¹: the Gauss–Newton Laplace covariance of a user's logits ``weights``
    (K,) given all its pair differences (N, K), with ``A = Σ_i s_i (1 − s_i) d_i d_iᵀ``,
    ``s_i = σ(d_i · p)``, ``J = diag(p) − p pᵀ`` (SPEC §7, sum form, isotropic prior)."""
    w = np.asarray(weights, dtype=np.float64)
    d = np.asarray(differences, dtype=np.float64).reshape(-1, w.shape[0])
    p = _softmax(w)
    jac = np.diag(p) - np.outer(p, p)
    margins = d @ p
    s = 1.0 / (1.0 + np.exp(-margins))
    a = (d * (s * (1.0 - s))[:, None]).T @ d
    precision = jac.T @ a @ jac + float(prior_precision) * np.eye(w.shape[0])
    # Cholesky, not a general solve (SPEC §7's numerical note); precision is symmetric PD
    chol = np.linalg.cholesky(precision)
    inverse = np.linalg.inv(chol)
    return inverse.T @ inverse


def adapt_online(
    settings: AdaptSettings,
    w0: np.ndarray,
    states: Sequence[Optional["UserState"]],
    new_pairs: Sequence[np.ndarray],
    *,
    histories: Optional[Sequence[np.ndarray]] = None,
    num_threads: Optional[int] = 1,
) -> Tuple[np.ndarray, np.ndarray, Optional[List[np.ndarray]]]:
    """Adapted logits of several users from their stored state and new pairs, in one native call.

    The single place where online weights are computed (feedback, unknown users, TRL rewards).
    A user with a state starts from its stored weights (a warm start, as ``mrm adapt
    --warm-start``); a user without one (``None``: unknown) starts from ``w0``. Each user takes
    ``settings.inner`` on its ``new_pairs`` (N_u, K) pair
    differences (:func:`mrm.ops.adapt`); a user without new pairs keeps its start, so an unknown
    user with no pairs is scored with ``w0``.

    ``histories``: each user's earlier pair differences (as stored); with them the Laplace
    covariance of the result over all the user's pairs is returned too (else None).

    Returns ``(weights (U, K) float64, support_losses (U,), covariances or None)``.
    """
    w0 = np.asarray(w0, dtype=np.float64)
    k = w0.shape[0]
    if len(states) != len(new_pairs):
        raise ValueError(f"states has {len(states)} entries but new_pairs has {len(new_pairs)}")
    start = np.empty((len(states), k), dtype=np.float64)
    for u, state in enumerate(states):
        start[u] = w0 if state is None else state.weights
    blocks = [np.asarray(d, dtype=np.float64).reshape(-1, k) for d in new_pairs]
    offsets = np.zeros(len(blocks) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blocks], out=offsets[1:])
    support = np.concatenate(blocks) if blocks else np.zeros((0, k))
    if settings.is_map:
        # the posterior mode given ALL of the user's pairs under the meta-learned prior, warm-started
        # from the stored weights; its covariance is the exact Laplace posterior
        everything = [np.concatenate([np.asarray(histories[u], np.float64).reshape(-1, k), blocks[u]])
                      if histories is not None else blocks[u] for u in range(len(blocks))]
        all_offsets = np.zeros(len(everything) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in everything], out=all_offsets[1:])
        rows = np.concatenate(everything) if everything else np.zeros((0, k))
        result = ops.map_adapt(w0, np.asarray(settings.eta, np.float64), np.ascontiguousarray(rows), all_offsets,
                               inner=settings.inner, init=start, return_covariance=histories is not None,
                               num_threads=num_threads)
        result.raise_unconverged()
        covariances = None if histories is None else list(result.covariance)
        return result.weights, result.support_losses, covariances
    weights, losses = ops.adapt(start, np.ascontiguousarray(support), offsets, inner=settings.inner,
                                num_threads=num_threads, return_support_losses=True)
    covariances = None
    if histories is not None:
        covariances = [
            laplace_covariance(weights[u], np.concatenate([np.asarray(histories[u]).reshape(-1, k), blocks[u]]),
                               settings.prior_precision)
            for u in range(len(blocks))
        ]
    return weights, losses, covariances


# ---- the store -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserState:
    """One user's row of the store."""

    user_id: str
    weights: np.ndarray
    """(K,) float64 logits the user is scored with."""
    n_pairs: int
    support_loss: float
    version: int
    prior: Optional[np.ndarray] = None
    """(K,) logits the user's first adaptation started from (w0), if known."""
    posterior: Optional[np.ndarray] = None
    """(K, K) covariance of the logits, if known."""
    updated_at: float = 0.0

    def to_json(self) -> dict:
        return {
            "user_id": self.user_id,
            "weights": self.weights.tolist(),
            "n_pairs": self.n_pairs,
            "support_loss": self.support_loss,
            "version": self.version,
            "prior": None if self.prior is None else self.prior.tolist(),
            "posterior": None if self.posterior is None else self.posterior.tolist(),
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True)
class Update:
    """The outcome of one user's update in :meth:`UserStore.apply_feedback`."""

    state: UserState
    new_pairs: int


def _blob(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype="<f8").tobytes()


def _array(blob: Optional[bytes], shape: Tuple[int, ...]) -> Optional[np.ndarray]:
    if blob is None:
        return None
    values = np.frombuffer(blob, dtype="<f8").astype(np.float64)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"corrupt store row: {values.size} values where {shape} were expected")
    return values.reshape(shape)


def check_user_id(user_id, what: str = "user_id") -> str:
    """A user id is a non-empty string of at most 1024 characters (a ValueError/TypeError otherwise)."""
    if not isinstance(user_id, str):
        raise TypeError(f"{what} must be a string, got {type(user_id).__name__}")
    if not user_id or len(user_id) > MAX_USER_ID_LENGTH:
        raise ValueError(f"{what} must be a non-empty string of at most {MAX_USER_ID_LENGTH} characters, "
                         f"got {len(user_id)} characters")
    return user_id


class UserStore:
    """Per-user weights in a SQLite database (see the module doc).

    Args:
        path: the database file (created with ``num_bases`` when missing).
        num_bases: K; required to create a store, checked against an existing one.
        readonly: open for reading only (no writes; any number of such processes).
        synchronous: SQLite's ``synchronous`` setting for writes (``FULL``: durable on power loss;
            ``NORMAL``: durable when the process is killed, not on power loss).
        timeout: seconds a writer waits for another writer's lock before failing.
    """

    def __init__(self, path: PathLike, num_bases: Optional[int] = None, *, readonly: bool = False,
                 synchronous: str = "FULL", timeout: float = 30.0):
        self.path = Path(path)
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, got {synchronous!r}")
        if num_bases is not None and (isinstance(num_bases, bool) or not isinstance(num_bases, int) or num_bases < 1):
            raise ValueError(f"num_bases must be a positive integer, got {num_bases!r}")
        self.readonly = readonly
        self._synchronous = synchronous
        self._timeout = float(timeout)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._connections: List[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        if not self.path.exists():
            if readonly:
                raise FileNotFoundError(f"user store {self.path} does not exist")
            if num_bases is None:
                raise ValueError(f"user store {self.path} does not exist: pass num_bases to create it")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = None if readonly else self._connect(write=True)
        if self._writer is not None:
            with self._writer:
                self._writer.executescript(_SCHEMA)
                stored = dict(self._writer.execute("SELECT key, value FROM meta").fetchall())
                if not stored:
                    if num_bases is None:
                        raise ValueError(f"{self.path} has no store metadata: pass num_bases to initialise it")
                    self._writer.executemany("INSERT INTO meta VALUES (?, ?)", [
                        ("format", FORMAT), ("format_version", str(FORMAT_VERSION)), ("num_bases", str(num_bases)),
                    ])
        stored = dict(self._reader().execute("SELECT key, value FROM meta").fetchall())
        if stored.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not an mrm-fast user store (format {stored.get('format')!r})")
        if int(stored.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"{self.path} was written by a newer mrm-fast (store format {stored['format_version']})")
        self.num_bases = int(stored["num_bases"])
        if num_bases is not None and num_bases != self.num_bases:
            raise ValueError(f"user store {self.path} holds K = {self.num_bases} weights, but K = {num_bases} was asked for")

    # ---- connections ---------------------------------------------------------------------------

    def _connect(self, write: bool) -> sqlite3.Connection:
        if write:
            conn = sqlite3.connect(str(self.path), timeout=self._timeout, isolation_level=None,
                                   check_same_thread=False)
        else:
            uri = f"file:{self.path}?mode=ro"
            try:
                conn = sqlite3.connect(uri, uri=True, timeout=self._timeout, isolation_level=None,
                                       check_same_thread=False)
            except sqlite3.OperationalError as exc:
                raise FileNotFoundError(f"user store {self.path} could not be opened: {exc}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            if write:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise ValueError(f"{self.path}: could not switch SQLite to WAL mode (got {mode!r})")
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise ValueError(f"{self.path} is not a readable SQLite database (corrupt?): {exc}") from None
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def _reader(self) -> sqlite3.Connection:
        if self._closed:
            raise ValueError(f"user store {self.path} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect(write=False)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Close every connection (pending writes are already committed)."""
        self._closed = True
        with self._connections_lock:
            for conn in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()

    def __enter__(self) -> "UserStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: the write lock is taken at the start, so the
        state read inside it is the one the update is built on)."""
        if self._writer is None:
            raise ValueError(f"user store {self.path} was opened read-only")
        if self._closed:
            raise ValueError(f"user store {self.path} is closed")
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # ---- reading ---------------------------------------------------------------------------------

    _COLUMNS = "user_id, weights, prior, posterior, n_pairs, support_loss, version, updated_at"

    def _state(self, row) -> UserState:
        k = self.num_bases
        return UserState(
            user_id=row[0], weights=_array(row[1], (k,)), prior=_array(row[2], (k,)),
            posterior=_array(row[3], (k, k)), n_pairs=int(row[4]), support_loss=float(row[5]),
            version=int(row[6]), updated_at=float(row[7]),
        )

    def get(self, user_id: str, *, _conn: Optional[sqlite3.Connection] = None) -> Optional[UserState]:
        """The user's state, or None for a user the store does not know."""
        check_user_id(user_id)
        conn = _conn or self._reader()
        row = conn.execute(f"SELECT {self._COLUMNS} FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return None if row is None else self._state(row)

    def get_many(self, user_ids: Sequence[str], *, _conn: Optional[sqlite3.Connection] = None
                 ) -> Dict[str, UserState]:
        """The states of the known users among ``user_ids`` (a consistent snapshot: one read)."""
        wanted = list(dict.fromkeys(check_user_id(u, "user_ids[]") for u in user_ids))
        conn = _conn or self._reader()
        found: Dict[str, UserState] = {}
        # one read transaction, so every state comes from the same snapshot
        own = _conn is None
        if own:
            conn.execute("BEGIN")
        try:
            for lo in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
                chunk = wanted[lo:lo + 500]
                marks = ",".join("?" * len(chunk))
                for row in conn.execute(f"SELECT {self._COLUMNS} FROM users WHERE user_id IN ({marks})", chunk):
                    found[row[0]] = self._state(row)
        finally:
            if own:
                conn.execute("COMMIT")
        return found

    def history(self, user_id: str, *, _conn: Optional[sqlite3.Connection] = None
                ) -> Tuple[np.ndarray, np.ndarray]:
        """Every stored pair difference of the user, in update order: ((N, K) float64, versions (N,))."""
        check_user_id(user_id)
        conn = _conn or self._reader()
        rows = conn.execute("SELECT version, difference FROM pairs WHERE user_id = ? ORDER BY version, seq",
                            (user_id,)).fetchall()
        k = self.num_bases
        if not rows:
            return np.zeros((0, k)), np.zeros(0, np.int64)
        return (np.stack([_array(r[1], (k,)) for r in rows]), np.array([r[0] for r in rows], np.int64))

    def __len__(self) -> int:
        return int(self._reader().execute("SELECT COUNT(*) FROM users").fetchone()[0])

    def __contains__(self, user_id) -> bool:
        return isinstance(user_id, str) and self._reader().execute(
            "SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is not None

    def user_ids(self) -> List[str]:
        """Every user id, sorted."""
        return [r[0] for r in self._reader().execute("SELECT user_id FROM users ORDER BY user_id")]

    # ---- writing ---------------------------------------------------------------------------------

    def _check_weights(self, name: str, values, shape: Tuple[int, ...]) -> np.ndarray:
        array = np.asarray(values, dtype=np.float64)
        if array.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contains non-finite values")
        return array

    def _write_user(self, conn: sqlite3.Connection, user_id: str, weights: np.ndarray, *, n_pairs: int,
                    support_loss: float, version: int, prior, posterior) -> UserState:
        now = time.time()
        conn.execute(
            "INSERT INTO users VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(user_id) DO UPDATE SET "
            "weights = excluded.weights, prior = excluded.prior, posterior = excluded.posterior, "
            "n_pairs = excluded.n_pairs, support_loss = excluded.support_loss, version = excluded.version, "
            "updated_at = excluded.updated_at",
            (user_id, _blob(weights), None if prior is None else _blob(prior),
             None if posterior is None else _blob(posterior), int(n_pairs), float(support_loss), int(version), now),
        )
        return UserState(user_id=user_id, weights=np.array(weights, np.float64), n_pairs=int(n_pairs),
                         support_loss=float(support_loss), version=int(version),
                         prior=None if prior is None else np.array(prior, np.float64),
                         posterior=None if posterior is None else np.array(posterior, np.float64), updated_at=now)

    def put(self, user_id: str, weights, *, n_pairs: int = 0, support_loss: float = 0.0,
            version: Optional[int] = None, prior=None, posterior=None,
            expected_version: Optional[int] = None) -> UserState:
        """Set one user's weights atomically. ``version`` None: the stored version + 1 (1 for a
        new user). ``expected_version``: fail (ValueError) unless the stored version is that
        (0: the user must be new) — an optimistic check for read-modify-write callers."""
        check_user_id(user_id)
        k = self.num_bases
        weights = self._check_weights("weights", weights, (k,))
        prior = None if prior is None else self._check_weights("prior", prior, (k,))
        posterior = None if posterior is None else self._check_weights("posterior", posterior, (k, k))
        if isinstance(n_pairs, bool) or not isinstance(n_pairs, (int, np.integer)) or n_pairs < 0:
            raise ValueError(f"n_pairs must be a non-negative integer, got {n_pairs!r}")
        if not math.isfinite(support_loss):
            raise ValueError(f"support_loss must be finite, got {support_loss!r}")
        with self._transaction() as conn:
            current = self.get(user_id, _conn=conn)
            stored_version = 0 if current is None else current.version
            if expected_version is not None and stored_version != expected_version:
                raise ValueError(f"user {user_id!r} is at version {stored_version}, not {expected_version}")
            new_version = stored_version + 1 if version is None else int(version)
            return self._write_user(conn, user_id, weights, n_pairs=n_pairs, support_loss=support_loss,
                                    version=new_version, prior=prior, posterior=posterior)

    def delete(self, user_id: str) -> bool:
        """Remove a user and its pair history; True when it existed."""
        check_user_id(user_id)
        with self._transaction() as conn:
            conn.execute("DELETE FROM pairs WHERE user_id = ?", (user_id,))
            return conn.execute("DELETE FROM users WHERE user_id = ?", (user_id,)).rowcount > 0

    def apply_feedback(self, feedback: Sequence[Tuple[str, np.ndarray]], settings: AdaptSettings, w0,
                       *, num_threads: Optional[int] = 1, keep_history: bool = True) -> List[Update]:
        """Adapt users on new pair differences and store the results, in ONE transaction.

        ``feedback``: (user_id, differences (N, K)) items; a user may appear more than once (its
        items are applied in order, each a version of its own). Each item's new weights come from
        :func:`adapt_online` started from the user's state as of the previous item. When this
        returns, every update is committed (durable per ``synchronous``); if it raises, none is.
        """
        k = self.num_bases
        w0 = self._check_weights("w0", w0, (k,))
        items = []
        for i, (user_id, differences) in enumerate(feedback):
            check_user_id(user_id, f"feedback[{i}].user_id")
            d = np.asarray(differences, dtype=np.float64)
            if d.ndim != 2 or d.shape[1] != k:
                raise ValueError(f"feedback[{i}] (user {user_id!r}): pair differences must have shape (N, {k}), "
                                 f"got {d.shape}")
            if not np.isfinite(d).all():
                raise ValueError(f"feedback[{i}] (user {user_id!r}): pair differences contain non-finite values")
            items.append((user_id, d))
        updates: List[Update] = []
        if not items:
            return updates
        with self._transaction() as conn:
            states: Dict[str, Optional[UserState]] = {}
            histories: Dict[str, np.ndarray] = {}
            for user_id, _ in items:
                if user_id not in states:
                    states[user_id] = self.get(user_id, _conn=conn)
                    histories[user_id] = self.history(user_id, _conn=conn)[0]
            # Users' items in rounds: the r-th item of every user in one native call.
            pending = list(range(len(items)))
            results: Dict[int, Update] = {}
            while pending:
                this_round, later, taken = [], [], set()
                for i in pending:
                    (later if items[i][0] in taken else this_round).append(i)
                    taken.add(items[i][0])
                users = [items[i][0] for i in this_round]
                weights, losses, covariances = adapt_online(
                    settings, w0, [states[u] for u in users], [items[i][1] for i in this_round],
                    histories=[histories[u] for u in users], num_threads=num_threads)
                for row, i in enumerate(this_round):
                    user_id, d = items[i]
                    previous = states[user_id]
                    version = 1 if previous is None else previous.version + 1
                    prior = w0 if previous is None else previous.prior
                    n_pairs = (0 if previous is None else previous.n_pairs) + len(d)
                    state = self._write_user(conn, user_id, weights[row], n_pairs=n_pairs,
                                             support_loss=float(losses[row]), version=version, prior=prior,
                                             posterior=covariances[row])
                    if keep_history and len(d):
                        conn.executemany("INSERT INTO pairs VALUES (?, ?, ?, ?)",
                                         [(user_id, version, j, _blob(row_d)) for j, row_d in enumerate(d)])
                    states[user_id] = state
                    histories[user_id] = np.concatenate([histories[user_id], d])
                    results[i] = Update(state=state, new_pairs=len(d))
                pending = later
        updates = [results[i] for i in range(len(items))]
        return updates

    # ---- Parquet import / export -----------------------------------------------------------------

    def export_parquet(self, path: PathLike, *, dtype=np.float64, overwrite: bool = False,
                       batch_users: int = 8192) -> int:
        """Write every user as the batch jobs' user-weights table (``mrm score --weights``,
        ``mrm adapt --warm-start``), atomically; returns the number of users. One read snapshot."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from mrm import batch
        from mrm._io import atomic_file

        path = Path(path)
        batch.check_output(path, overwrite)
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        schema = batch.weights_schema(dtype)
        conn = self._reader()
        count = 0
        conn.execute("BEGIN")
        try:
            cursor = conn.execute("SELECT user_id, weights, n_pairs, support_loss, version FROM users ORDER BY user_id")
            with atomic_file(path) as handle, pq.ParquetWriter(handle, schema, **batch.WRITE_OPTIONS) as writer:
                while True:
                    rows = cursor.fetchmany(batch_users)
                    if not rows:
                        break
                    weights = np.stack([_array(r[1], (self.num_bases,)) for r in rows]).astype(dtype)
                    writer.write_batch(batch.weights_batch(
                        schema, pa.array([r[0] for r in rows], pa.string()), weights,
                        np.array([r[2] for r in rows], np.int64), np.array([r[3] for r in rows], np.float64),
                        np.array([r[4] for r in rows], np.int64)))
                    count += len(rows)
                if count == 0:
                    writer.write_table(schema.empty_table())
        finally:
            conn.execute("COMMIT")
        return count

    def import_parquet(self, path: PathLike, *, on_conflict: str = "replace") -> int:
        """Load a user-weights table (a file or a directory of them, as ``mrm adapt`` writes) in
        one transaction. ``on_conflict`` for users already stored: ``"replace"`` (the table's row
        wins), ``"newer"`` (only where the table's version is higher) or ``"skip"``. Versions,
        pair counts and losses are taken from the table. Returns the number of users written."""
        from mrm import batch

        if on_conflict not in ("replace", "newer", "skip"):
            raise ValueError(f"on_conflict must be 'replace', 'newer' or 'skip', got {on_conflict!r}")
        table = batch.read_weights(path, self.num_bases, np.float64)
        ids = table.user_ids.to_pylist()
        written = 0
        with self._transaction() as conn:
            for row, user_id in enumerate(ids):
                check_user_id(user_id, f"{path}: user_id")
                current = self.get(user_id, _conn=conn)
                if current is not None and (on_conflict == "skip" or
                                            (on_conflict == "newer" and current.version >= table.version[row])):
                    continue
                if table.version[row] < 0 or table.n_pairs[row] < 0:
                    raise ValueError(f"{path}: user {user_id!r} has a negative version or pair count")
                self._write_user(conn, user_id, table.weights[row], n_pairs=int(table.n_pairs[row]),
                                 support_loss=float(table.support_loss[row]), version=int(table.version[row]),
                                 prior=None, posterior=None)
                written += 1
        return written

    def info(self) -> dict:
        """Counts for health/metrics endpoints."""
        conn = self._reader()
        users, pairs = conn.execute("SELECT COUNT(*), COALESCE(SUM(n_pairs), 0) FROM users").fetchone()
        return {"path": str(self.path), "num_bases": self.num_bases, "users": int(users), "pairs": int(pairs)}
