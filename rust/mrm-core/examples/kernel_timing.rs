//! Single-process timing of the kernels without Python: best of several runs.
//! `cargo run --release -p mrm-core --example kernel_timing -- [users] [threads] [K] [steps]`
//! (defaults 100000, 1, 8, 5); steps 0 leaves the part of each call that does not repeat per step.

use mrm_core::bench::{args, best_of as best, uniform_values, Outputs};
use mrm_core::{forward, value_and_grad, Control, Csr, ForwardOutputs, InnerLoop, Optimizer, Start};

fn main() {
    let [users, threads, k, steps] = args([100_000, 1, 8, 5]);
    let per_user = 32usize;
    // Support rows, then query rows: one sequence of values.
    let values = uniform_values(2 * users * per_user * k, 1);
    let (support, query) = values.split_at(users * per_user * k);
    let offsets: Vec<i64> = (0..=users as i64).map(|u| u * per_user as i64).collect();
    let w0 = vec![0.0f32; k];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let ctl = Control::new(&pool, 1 << 16);
    let check = best(5, || {
        Csr::new_in("support", support, &offsets, k, Some(&pool)).unwrap();
    });
    println!("finite check of the support rows on the pool: {check:.4} s");
    let s = Csr::new("support", support, &offsets, k).unwrap();
    let q = Csr::new("query", query, &offsets, k).unwrap();
    for (name, optimizer, lr) in [
        ("sgd", Optimizer::Sgd, 0.1),
        (
            "adam",
            Optimizer::Adam {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            0.01,
        ),
    ] {
        let inner = InnerLoop { steps, lr, optimizer };
        let mut out = Outputs::new(users, k);
        let adapt = best(5, || {
            let weights = ForwardOutputs::weights_only(&mut out.weights);
            forward(Start::Shared(&w0), s, None, &inner, weights, &ctl).unwrap();
        });
        let fwd = best(5, || {
            forward(Start::Shared(&w0), s, Some(q), &inner, out.all(), &ctl).unwrap();
        });
        let (mut gw, mut gs, mut gq) = (vec![0.0; k], vec![0.0; support.len()], vec![0.0; query.len()]);
        let (start, gl) = (Start::Shared(&w0), vec![1.0f32; users]);
        // Gradients alone (the backward pass), then with forward's outputs from the same pass.
        let mut grads = |with_values: bool| {
            best(5, || {
                let values = with_values.then(|| out.all());
                value_and_grad(start, s, q, &gl, &inner, false, values, &mut gw, &mut gs, &mut gq, &ctl).unwrap();
            })
        };
        let bwd = grads(false);
        let fused = grads(true);
        // The fused pass rewrites the same losses and gradients, bit for bit.
        let check: f64 = out.losses.iter().map(|&x| x as f64).sum::<f64>() + gw.iter().map(|&x| x as f64).sum::<f64>();
        println!(
            "{name}: users {users} threads {threads} K {k} steps {steps}: adapt {adapt:.4} s  forward {fwd:.4} s  backward {bwd:.4} s  \
             value_and_grad {fused:.4} s  (checksum {check:.6})"
        );
    }
}
