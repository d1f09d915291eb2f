//! The TCP collective over real sockets on loopback: ranks are threads of this process or,
//! for the failure cases, a child process (this test binary re-run as one rank, see
//! [`child_rank_entry`]) that the test kills or that stops answering.

use std::net::TcpListener;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hindsight_collective::tcp::TcpConfig;
use hindsight_collective::{Collective, CollectiveError, Hello, TcpCollective, Wait};

const CHILD_ENV: &str = "HINDSIGHT_COLLECTIVE_TEST_CHILD";

fn hello(rank: u32, world_size: u32) -> Hello {
    Hello {
        rank,
        world_size,
        version: "test".into(),
        config_digest: "cfg".into(),
        model_fingerprint: "fp".into(),
        backend: "tcp".into(),
    }
}

fn config(chunk_bytes: usize, op_timeout: Duration) -> TcpConfig {
    TcpConfig {
        op_timeout,
        rendezvous_timeout: Duration::from_secs(30),
        chunk_bytes,
    }
}

/// Runs `f` on every rank of a `world`-rank group (one thread per rank, real sockets);
/// results in rank order.
fn run_ranks<T: Send + 'static>(
    world: u32,
    cfg: TcpConfig,
    hellos: impl Fn(u32) -> Hello,
    f: impl Fn(&mut TcpCollective) -> T + Send + Sync + Clone + 'static,
) -> Vec<hindsight_collective::Result<T>> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut handles = Vec::new();
    let h0 = hellos(0);
    let f0 = f.clone();
    handles.push(std::thread::spawn(
        move || -> hindsight_collective::Result<T> {
            let mut c = TcpCollective::serve(listener, h0, b"uid".to_vec(), cfg)?;
            Ok(f0(&mut c))
        },
    ));
    for r in 1..world {
        let (addr, h, f) = (addr.clone(), hellos(r), f.clone());
        handles.push(std::thread::spawn(
            move || -> hindsight_collective::Result<T> {
                let mut c = TcpCollective::connect(&addr, h, cfg)?;
                assert_eq!(c.unique_id(), b"uid");
                Ok(f(&mut c))
            },
        ));
    }
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Values whose sum depends on the order of addition (mixed magnitudes).
fn values(rank: u32, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let x = ((i as f64 + 1.0) * 0.618_033_988_7 + rank as f64 * 0.414_213_562).fract();
            let scale = 10f64.powi(((i + rank as usize) % 9) as i32 - 4);
            (x - 0.5) * scale
        })
        .collect()
}

#[test]
fn all_reduce_is_bit_identical_and_the_sequential_sum() {
    // 0, 1, odd, and larger than a chunk (64-byte chunks: 16 f32 / 8 f64 per chunk).
    for world in [2u32, 3] {
        for n in [0usize, 1, 17, 1001] {
            let cfg = config(64, Duration::from_secs(20));
            let out = run_ranks(
                world,
                cfg,
                |r| hello(r, world),
                move |c| {
                    let r = c.rank();
                    let mut a: Vec<f32> = values(r, n).iter().map(|&x| x as f32).collect();
                    c.all_reduce_f32(&mut a).unwrap();
                    let mut b = values(r, n);
                    c.all_reduce_f64(&mut b).unwrap();
                    (a, b)
                },
            );
            let out: Vec<_> = out.into_iter().map(Result::unwrap).collect();
            let mut want32: Vec<f32> = values(0, n).iter().map(|&x| x as f32).collect();
            let mut want64 = values(0, n);
            for r in 1..world {
                for (w, v) in want32.iter_mut().zip(values(r, n)) {
                    *w += v as f32;
                }
                for (w, v) in want64.iter_mut().zip(values(r, n)) {
                    *w += v;
                }
            }
            let bits32 = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let bits64 = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (r, (a, b)) in out.iter().enumerate() {
                assert_eq!(
                    bits32(a),
                    bits32(&want32),
                    "f32, world {world}, n {n}, rank {r}"
                );
                assert_eq!(
                    bits64(b),
                    bits64(&want64),
                    "f64, world {world}, n {n}, rank {r}"
                );
            }
        }
    }
}

#[test]
fn broadcast_gather_and_barrier() {
    let out = run_ranks(
        3,
        config(1 << 20, Duration::from_secs(20)),
        |r| hello(r, 3),
        |c| {
            let r = c.rank();
            let mut b = if r == 0 {
                b"from rank 0".to_vec()
            } else {
                b"junk".to_vec()
            };
            c.broadcast(&mut b, Wait::Bounded).unwrap();
            let mut empty = if r == 0 { Vec::new() } else { vec![1, 2, 3] };
            c.broadcast(&mut empty, Wait::For(Duration::from_secs(5)))
                .unwrap();
            let g = c.all_gather(&vec![r as u8; r as usize]).unwrap();
            c.barrier().unwrap();
            let mut m = [r as f64, -(r as f64)];
            hindsight_collective::all_max_f64(c, &mut m).unwrap();
            (b, empty, g, m, c.traffic())
        },
    );
    for (r, o) in out.into_iter().enumerate() {
        let (b, empty, g, m, traffic) = o.unwrap();
        assert_eq!(b, b"from rank 0", "rank {r}");
        assert!(empty.is_empty(), "rank {r}");
        assert_eq!(g, vec![vec![], vec![1u8], vec![2u8, 2]], "rank {r}");
        assert_eq!(m, [2.0, 0.0], "rank {r}");
        assert!(
            traffic.sent > 0 && traffic.received > 0,
            "rank {r}: {traffic:?}"
        );
    }
}

#[test]
fn a_mismatched_handshake_is_refused_naming_the_difference() {
    let out = run_ranks(
        2,
        config(64, Duration::from_secs(5)),
        |r| {
            let mut h = hello(r, 2);
            if r == 1 {
                h.model_fingerprint = "other".into();
                h.config_digest = "cfg2".into();
            }
            h
        },
        |_| (),
    );
    for (r, o) in out.into_iter().enumerate() {
        let e = o
            .expect_err("a mismatched group must be refused")
            .to_string();
        assert!(
            e.contains("model fingerprint: rank 0 has \"fp\", rank 1 has \"other\""),
            "rank {r}: {e}"
        );
        assert!(e.contains("config digest"), "rank {r}: {e}");
    }
}

#[test]
fn ranks_out_of_step_are_reported() {
    let out = run_ranks(
        2,
        config(64, Duration::from_secs(5)),
        |r| hello(r, 2),
        |c| {
            let mut a = vec![0f32; 10 + c.rank() as usize];
            c.all_reduce_f32(&mut a)
        },
    );
    for (r, o) in out.into_iter().enumerate() {
        let e = o.unwrap().expect_err("lengths differ");
        assert!(
            matches!(
                e,
                CollectiveError::OutOfStep(_) | CollectiveError::Closed { .. }
            ),
            "rank {r}: {e}"
        );
    }
}

/// Not a test of its own: the body of a child rank when this binary is re-run by
/// [`spawn_child`] (it returns at once otherwise). Joins as rank 1 of world 2, then either
/// waits in a broadcast (to be killed) or stops answering (`stall`).
#[test]
fn child_rank_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (mode, addr) = spec.split_once('@').unwrap();
    let rank: u32 = std::env::var("RANK").unwrap().parse().unwrap();
    let world: u32 = std::env::var("WORLD_SIZE").unwrap().parse().unwrap();
    let mut c = TcpCollective::connect(
        addr,
        hello(rank, world),
        config(64, Duration::from_secs(60)),
    )
    .unwrap();
    match mode {
        "stall" => loop {
            std::thread::sleep(Duration::from_secs(60));
        },
        _ => {
            let mut b = Vec::new();
            let _ = c.broadcast(&mut b, Wait::For(Duration::from_secs(600)));
            std::process::exit(3);
        }
    }
}

fn spawn_child(mode: &str, addr: &str, rank: u32, world: u32) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_rank_entry",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_ENV, format!("{mode}@{addr}"))
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .spawn()
        .unwrap()
}

/// World 3: rank 1 a thread, rank 2 a child process. Once joined, the child is killed
/// (`kill`) or stops answering (`stall`); rank 0 and rank 1 must both fail within bounds.
fn peer_failure(mode: &str) -> (CollectiveError, CollectiveError, Duration) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut child = spawn_child(mode, &addr, 2, 3);
    let timeout = Duration::from_secs(2);
    let a1 = addr.clone();
    let rank1 = std::thread::spawn(move || {
        let mut c = TcpCollective::connect(&a1, hello(1, 3), config(64, timeout)).unwrap();
        let mut buf = vec![1f32; 1000];
        c.all_reduce_f32(&mut buf).unwrap_err()
    });
    let mut c0 =
        TcpCollective::serve(listener, hello(0, 3), Vec::new(), config(64, timeout)).unwrap();
    if mode == "kill" {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let started = Instant::now();
    let mut buf = vec![1f32; 1000];
    let e0 = c0.all_reduce_f32(&mut buf).unwrap_err();
    drop(c0); // rank 0 gives up: its peers see the connection close.
    let e1 = rank1.join().unwrap();
    let took = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    (e0, e1, took)
}

#[test]
fn a_killed_peer_process_is_an_error_not_a_hang() {
    let (e0, e1, took) = peer_failure("kill");
    assert!(
        matches!(
            e0,
            CollectiveError::Closed { peer: 2, .. } | CollectiveError::Io { peer: 2, .. }
        ),
        "rank 0 should name rank 2: {e0}"
    );
    assert!(
        matches!(
            e1,
            CollectiveError::Closed { peer: 0, .. } | CollectiveError::Io { peer: 0, .. }
        ),
        "rank 1: {e1}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn a_stalled_peer_process_times_out() {
    let (e0, e1, took) = peer_failure("stall");
    assert!(
        matches!(e0, CollectiveError::Timeout { peer: 2, .. }),
        "rank 0 should name rank 2: {e0}"
    );
    assert!(e0.to_string().contains("stalled or dead"), "{e0}");
    assert!(
        matches!(
            e1,
            CollectiveError::Closed { peer: 0, .. }
                | CollectiveError::Timeout { peer: 0, .. }
                | CollectiveError::Io { peer: 0, .. }
        ),
        "rank 1: {e1}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
}
