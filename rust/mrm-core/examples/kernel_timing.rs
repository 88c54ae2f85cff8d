//! Single-process timing of the kernels without Python: best of several runs.
//! `cargo run --release -p mrm-core --example kernel_timing -- [users] [threads] [K] [steps]`
//! (defaults 100000, 1, 8, 5); steps 0 leaves the part of each call that does not repeat per step.

use mrm_core::bench::best_of as best;
use mrm_core::{backward, forward, value_and_grad, Control, Csr, ForwardOutputs, InnerLoop, Optimizer, Start};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("integer argument"))
        .collect();
    let users = args.first().copied().unwrap_or(100_000);
    let threads = args.get(1).copied().unwrap_or(1);
    let (k, per_user) = (args.get(2).copied().unwrap_or(8), 32usize);
    let steps = args.get(3).copied().unwrap_or(5);
    let mut seed = 1u64;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let support: Vec<f32> = (0..users * per_user * k).map(|_| next()).collect();
    let query: Vec<f32> = (0..users * per_user * k).map(|_| next()).collect();
    let offsets: Vec<i64> = (0..=users as i64).map(|u| u * per_user as i64).collect();
    let w0 = vec![0.0f32; k];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let ctl = Control {
        pool: &pool,
        chunk_users: 1 << 16,
        keep_going: &|| true,
    };
    let check = best(5, || {
        Csr::new_in("support", &support, &offsets, k, Some(&pool)).unwrap();
    });
    println!("finite check of the support rows on the pool: {check:.4} s");
    let s = Csr::new("support", &support, &offsets, k).unwrap();
    let q = Csr::new("query", &query, &offsets, k).unwrap();
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
        let (mut w, mut l, mut sl, mut a) = (
            vec![0.0; users * k],
            vec![0.0; users],
            vec![0.0; users],
            vec![0.0; users],
        );
        let adapt = best(5, || {
            let out = ForwardOutputs {
                weights: &mut w,
                support_losses: None,
                losses: None,
                accuracy: None,
            };
            forward(Start::Shared(&w0), s, None, &inner, out, &ctl).unwrap();
        });
        let fwd = best(5, || {
            let out = ForwardOutputs {
                weights: &mut w,
                support_losses: Some(&mut sl),
                losses: Some(&mut l),
                accuracy: Some(&mut a),
            };
            forward(Start::Shared(&w0), s, Some(q), &inner, out, &ctl).unwrap();
        });
        let (mut gw, mut gs, mut gq) = (vec![0.0; k], vec![0.0; support.len()], vec![0.0; query.len()]);
        let ones = vec![1.0f32; users];
        let bwd = best(5, || {
            backward(
                Start::Shared(&w0),
                s,
                q,
                &ones,
                &inner,
                false,
                &mut gw,
                &mut gs,
                &mut gq,
                &ctl,
            )
            .unwrap();
        });
        let check: f64 = l.iter().map(|&x| x as f64).sum::<f64>() + gw.iter().map(|&x| x as f64).sum::<f64>();
        let fused = best(5, || {
            let out = ForwardOutputs {
                weights: &mut w,
                support_losses: Some(&mut sl),
                losses: Some(&mut l),
                accuracy: Some(&mut a),
            };
            value_and_grad(
                Start::Shared(&w0),
                s,
                q,
                &ones,
                &inner,
                false,
                Some(out),
                &mut gw,
                &mut gs,
                &mut gq,
                &ctl,
            )
            .unwrap();
        });
        println!(
            "{name}: users {users} threads {threads} K {k} steps {steps}: adapt {adapt:.4} s  forward {fwd:.4} s  backward {bwd:.4} s  \
             value_and_grad {fused:.4} s  (checksum {check:.6})"
        );
    }
}
