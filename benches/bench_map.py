"""MAP adaptation (SPEC §7) against a padded PyTorch batched Newton, in the same run.

    python benches/bench_map.py [--users 1000 100000 1000000] [--threads 2]

Synthetic users with 32 support + 32 query pairs, K = 8, float32, linear and simplex weight
maps. Times ``mrm.ops.map_adapt`` (adaptation alone) and ``mrm.ops.meta_value_and_grad`` with
the map solver (value and implicit meta-gradient), next to the fused T = 5 SGD call of the same
shapes, and a padded torch Newton baseline (all users at once: exact Hessians by the closed
form (the exact one where positive definite, else Gauss–Newton, as mrm), ``torch.linalg.cholesky`` solves — SPEC §7 notes that batched ``torch.linalg.solve``
hung in this torch build — a fixed 8 iterations, no line search) on up to 1e5 users.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import mrm.ops as ops


def make(users: int, k: int = 8, n: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    support = rng.normal(size=(users * n, k)).astype(np.float32)
    query = rng.normal(size=(users * n, k)).astype(np.float32)
    offsets = np.arange(0, users * n + 1, n, dtype=np.int64)
    return support, offsets, query, offsets.copy()


def best_of(f, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def torch_newton(support, k, n, w0, lam, weight_map, iterations=10, halvings=20):
    """Damped Newton for all users at once, padded (every user has n pairs here): the same
    steps as mrm (exact Hessian where positive definite, else Gauss–Newton; Armijo backtracking
    per user, vectorised), a fixed number of iterations."""
    import torch

    d = torch.from_numpy(support).view(-1, n, k)
    w = torch.from_numpy(np.broadcast_to(w0, (d.shape[0], k)).copy())
    lam_t = torch.from_numpy(lam)
    w0_t = w.clone()
    eye = torch.eye(k)

    def weights(x):
        return torch.softmax(x, -1) if weight_map == "simplex" else x

    def objective(x):
        z = torch.einsum("unk,uk->un", d, weights(x))
        return torch.nn.functional.softplus(-z).sum(-1) + 0.5 * (lam_t * (x - w0_t) ** 2).sum(-1)

    for _ in range(iterations):
        p = weights(w)
        z = torch.einsum("unk,uk->un", d, p)
        s = torch.sigmoid(-z)
        gp = -(s.unsqueeze(-1) * d).sum(1)
        a = torch.einsum("un,unk,unl->ukl", s * (1 - s), d, d)
        if weight_map == "simplex":
            jac = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
            grad = (jac @ gp.unsqueeze(-1)).squeeze(-1) + lam_t * (w - w0_t)
            gauss_newton = jac @ a @ jac + lam_t * eye
            # exact Hessian: + J (diag(g_p − p·g_p) − g_p pᵀ), symmetrised; Gauss–Newton where not PD
            c = (p * gp).sum(-1, keepdim=True)
            curvature = jac @ (torch.diag_embed(gp - c) - gp.unsqueeze(-1) * p.unsqueeze(-2))
            chol, info = torch.linalg.cholesky_ex(gauss_newton + 0.5 * (curvature + curvature.transpose(-1, -2)))
            bad = info != 0
            if bool(bad.any()):
                chol[bad] = torch.linalg.cholesky(gauss_newton[bad])
        else:
            grad = gp + lam_t * (w - w0_t)
            chol = torch.linalg.cholesky(a + lam_t * eye)
        step = -torch.cholesky_solve(grad.unsqueeze(-1), chol).squeeze(-1)
        f0, slope = objective(w), (grad * step).sum(-1)
        t = torch.ones(w.shape[0], dtype=w.dtype)
        done = torch.zeros(w.shape[0], dtype=torch.bool)
        for _ in range(halvings):
            ok = objective(w + t.unsqueeze(-1) * step) <= f0 + 1e-4 * t * slope
            done = done | ok
            if bool(done.all()):
                break
            t = torch.where(done, t, 0.5 * t)
        w = w + torch.where(done, t, torch.zeros_like(t)).unsqueeze(-1) * step
    return w


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch-max-users", type=int, default=100_000)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    k, n = 8, 32
    print(f"{'map':>8} {'users':>9} {'adapt s':>9} {'iters':>6} {'v+grad s':>9} {'fused T=5 s':>11} "
          f"{'ratio':>6} {'torch s':>9} {'speedup':>8}")
    for weight_map in ("linear", "simplex"):
        for users in args.users:
            support, so, query, qo = make(users, k, n)
            w0 = np.zeros(k, np.float32) if weight_map == "simplex" else np.full(k, 0.1, np.float32)
            eta = np.zeros(k, np.float32)
            inner = ops.InnerLoop("map", weight_map=weight_map)
            repeats = 3 if users <= 100_000 else 2
            result = ops.map_adapt(w0, eta, support, so, inner=inner, num_threads=args.threads)
            t_adapt = best_of(lambda: ops.map_adapt(w0, eta, support, so, inner=inner, num_threads=args.threads), repeats)
            gl = np.full(users, 1.0 / users, np.float32)
            t_grad = best_of(lambda: ops.meta_value_and_grad(w0, support, so, query, qo, gl, inner=inner, eta=eta,
                                                             num_threads=args.threads), repeats)
            sgd = ops.InnerLoop("sgd", steps=5, lr=0.1)
            t_fused = best_of(lambda: ops.meta_value_and_grad(w0, support, so, query, qo, gl, inner=sgd,
                                                              num_threads=args.threads), repeats)
            t_torch, speedup = float("nan"), float("nan")
            if users <= args.torch_max_users:
                lam = np.exp(eta).astype(np.float32)
                with torch.no_grad():
                    ref = torch_newton(support, k, n, w0, lam, weight_map).numpy()
                    t_torch = best_of(lambda: torch_newton(support, k, n, w0, lam, weight_map), repeats)
                gap = float(np.abs(ref - result.weights).max())
                # float32 torch: its line search stops where f32 cannot resolve F any more
                assert gap < 1e-2, f"torch Newton and mrm disagree by {gap}"
                speedup = t_torch / t_adapt
            print(f"{weight_map:>8} {users:>9} {t_adapt:>9.4f} {result.iterations.mean():>6.2f} {t_grad:>9.4f} "
                  f"{t_fused:>11.4f} {t_grad / t_fused:>6.2f} {t_torch:>9.4f} {speedup:>7.1f}x", flush=True)



if __name__ == "__main__":
    main()
