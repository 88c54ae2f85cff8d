//! Per-operation timing of one user's SGD step on its rows held in L1 (32 rows, K = 8, f32; the
//! row kernels this CPU runs, softmax and its Jacobian, from `mrm_core::bench`): each operation
//! repeated on its own, then one whole SGD step
//! (softmax, margins, sigmoids, row sums, softmax Jacobian, update) repeated on the same user,
//! where each step waits on the one before. The gap between the sum of the parts and the whole
//! step is time spent waiting on dependencies, not on arithmetic.
//! `cargo run --release -p mrm-core --example op_timing`
use std::hint::black_box;
use std::time::Instant;

use mrm_core::bench::{softmax_into, softmax_jvp, with_row_ops, Rank2Terms, RowOps, WithRowOps};

struct Job;
impl WithRowOps<f32> for Job {
    type Output = ();
    fn run<R: RowOps<f32>>(self, ops: R) {
        let (k, n, reps) = (8usize, 32usize, 2_000_000usize);
        let mut seed = 1u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let rows: Vec<f32> = (0..n * k).map(|_| next()).collect();
        let mut w: Vec<f32> = (0..k).map(|_| 0.1 * next()).collect();
        let (mut p, mut gp, mut g) = (vec![0.0f32; k], vec![0.0f32; k], vec![0.0f32; k]);
        let mut z: Vec<f32> = Vec::new();
        let mut grad = vec![0.0f32; n * k];
        let time = |name: &str, f: &mut dyn FnMut()| -> f64 {
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            let ns = t.elapsed().as_secs_f64() / reps as f64 * 1e9;
            println!("{name:>16}: {ns:6.2} ns");
            ns
        };
        softmax_into(&w, &mut p);
        ops.margins(&rows, k, &p, &mut z);
        let mut zz = z.clone();
        let mut parts = 0.0;
        parts += time("softmax", &mut || {
            softmax_into(black_box(&w), &mut p);
            black_box(&p);
        });
        parts += time("margins", &mut || {
            ops.margins(black_box(&rows), k, black_box(&p), &mut z);
            black_box(&z);
        });
        let z0 = z.clone();
        parts += time("neg_sigmoids", &mut || {
            z.copy_from_slice(black_box(&z0));
            ops.neg_sigmoids(&mut z);
            black_box(&z);
        });
        time("neg_softplus", &mut || {
            z.copy_from_slice(black_box(&z0));
            ops.neg_softplus(&mut z);
            black_box(&z);
        });
        parts += time("row_sums", &mut || {
            ops.weighted_row_sums(black_box(&rows), k, black_box(&z0), &mut gp);
            black_box(&gp);
        });
        parts += time("softmax_jvp", &mut || {
            softmax_jvp(black_box(&p), black_box(&gp), &mut g);
            black_box(&g);
        });
        time("rank2_sums", &mut || {
            let terms = Rank2Terms {
                s: black_box(&z0),
                c: black_box(&z0),
                stride: n,
                mu: black_box(&p),
                p: black_box(&g),
                row_stride: k,
            };
            ops.rank2_sums(&mut grad, k, 1, terms, false);
            black_box(&grad);
        });
        time("outer", &mut || {
            ops.outer(&mut grad, k, 0.1, black_box(&z0), black_box(&p), false);
            black_box(&grad);
        });
        println!(
            "{:>16}: {parts:6.2} ns (softmax, margins, sigmoids, row sums, Jacobian)",
            "parts of a step"
        );
        time("chain: softmax", &mut || {
            softmax_into(black_box(&w), &mut p);
            for (a, b) in w.iter_mut().zip(&p) {
                *a -= 0.001 * b;
            }
        });
        time("+ margins", &mut || {
            softmax_into(&w, &mut p);
            ops.margins(&rows, k, &p, &mut zz);
            w[0] -= 1e-6 * zz[31];
        });
        time("+ sigmoids", &mut || {
            softmax_into(&w, &mut p);
            ops.margins(&rows, k, &p, &mut zz);
            ops.neg_sigmoids(&mut zz);
            w[0] -= 1e-6 * zz[31];
        });
        time("+ row sums", &mut || {
            softmax_into(&w, &mut p);
            ops.margins(&rows, k, &p, &mut zz);
            ops.neg_sigmoids(&mut zz);
            ops.weighted_row_sums(&rows, k, &zz, &mut gp);
            for (a, b) in w.iter_mut().zip(&gp) {
                *a -= 0.001 * b;
            }
        });
        time("one sgd step", &mut || {
            softmax_into(black_box(&w), &mut p);
            ops.margins(&rows, k, &p, &mut zz);
            ops.neg_sigmoids(&mut zz);
            ops.weighted_row_sums(&rows, k, &zz, &mut gp);
            softmax_jvp(&p, &gp, &mut g);
            for (a, b) in w.iter_mut().zip(&g) {
                *a -= 0.001 * b;
            }
            black_box(&w);
        });
    }
}

fn main() {
    with_row_ops::<f32, _>(8, Job);
}
