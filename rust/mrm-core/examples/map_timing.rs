//! Timing of MAP adaptation without Python: best of several runs.
//! `cargo run --release -p mrm-core --example map_timing -- [users] [threads] [K] [linear 0|1] [max_iter]`
//! (defaults 100000, 1, 8, 1, 100): 32 support and 32 query pairs per user, uniform values in
//! [-1, 1]. Times the adaptation alone, then the adaptation with its implicit gradient.

use mrm_core::bench::{args, best_of as best, uniform_values};
use mrm_core::{map_backward, map_forward, Control, Csr, MapGradients, MapOutputs, MapSettings, Start, WeightMap};

fn main() {
    let [users, threads, k, linear, max_iter] = args([100_000, 1, 8, 1, 100]);
    let per_user = 32usize;
    let weight_map = if linear == 1 {
        WeightMap::Linear
    } else {
        WeightMap::Simplex
    };
    let support = uniform_values(users * per_user * k, 1);
    let offsets: Vec<i64> = (0..=users as i64).map(|u| u * per_user as i64).collect();
    let w0 = vec![0.1f32; k];
    let eta = vec![0.0f32; k];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let ctl = Control::new(&pool, 1 << 16);
    let s = Csr::new("support", &support, &offsets, k).unwrap();
    let query = uniform_values(users * per_user * k, 2);
    let q = Csr::new("query", &query, &offsets, k).unwrap();
    let settings = MapSettings {
        max_iter,
        tol: 1e-6,
        weight_map,
    };
    let (mut w, mut it, mut gn, mut conv) = (
        vec![0.0f32; users * k],
        vec![0i64; users],
        vec![0.0f32; users],
        vec![false; users],
    );
    let seconds = best(5, || {
        let out = MapOutputs::solution(&mut w, &mut it, &mut gn, &mut conv);
        map_forward(Start::Shared(&w0), &eta, s, None, None, &settings, out, &ctl).unwrap();
    });
    let mean_iterations = it.iter().sum::<i64>() as f64 / users as f64;
    let checksum: f64 = w.iter().map(|&x| x as f64).sum();
    println!(
        "map {weight_map:?}: {users} users, K {k}, {threads} threads: {seconds:.4} s ({:.2} us/user), {mean_iterations:.2} iterations, checksum {checksum:.6}",
        seconds * 1e6 / users as f64 * threads as f64
    );
    let grad_losses = vec![1.0f32 / users as f32; users];
    let (mut gw, mut ge, mut gs, mut gq) = (
        vec![0.0f32; k],
        vec![0.0f32; k],
        vec![0.0f32; support.len()],
        vec![0.0f32; query.len()],
    );
    let seconds = best(5, || {
        let grads = MapGradients {
            w0: &mut gw,
            eta: &mut ge,
            support: &mut gs,
            query: &mut gq,
        };
        map_backward(
            Start::Shared(&w0),
            &eta,
            s,
            q,
            &grad_losses,
            &settings,
            grads,
            None,
            &ctl,
        )
        .unwrap();
    });
    let checksum: f64 =
        gw.iter().chain(&ge).map(|&x| x as f64).sum::<f64>() + gs.iter().map(|&x| x as f64).sum::<f64>();
    println!(
        "  with the implicit gradient: {seconds:.4} s ({:.2} us/user), checksum {checksum:.6}",
        seconds * 1e6 / users as f64 * threads as f64
    );
}
