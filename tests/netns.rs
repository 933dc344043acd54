//! Many hosts on one machine (tests/netns_harness): a job's coordinator and workers each
//! in their own network namespace with its own address. This file checks the harness
//! itself, then a worker cut off by a partition and a worker paused past the heartbeat
//! timeout; tests/netns_coordinator.rs partitions the coordinator, tests/netns_links.rs
//! degrades the links (loss, latency, bandwidth). Without root or namespaces every test
//! here skips loudly.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use scfm_tests::netns_harness::{Direction, FaultError, Job, Net, setup, write_job};
use scfm_tests::{TINY, accounting, generations, skip};

/// Cells per worker and step.
const BATCH: u64 = 16;

/// The training section: the tiny model's steps, `max_steps` of them.
fn training(max_steps: u64) -> String {
    format!(
        "  seed: 7\n  batch_size: {BATCH}\n  max_steps: {max_steps}\n  threads: 1\n  log_every: 10\n  eval_every: 100000"
    )
}

/// The cluster section: 2 to 3 workers, heartbeats every 200 ms, silence of
/// `worker_timeout_s` loses a worker, parameter checksums compared every 10 steps.
fn cluster(worker_timeout_s: u64) -> String {
    format!(
        "  min_workers: 2\n  max_workers: 3\n  heartbeat_ms: 200\n  worker_timeout_s: {worker_timeout_s}\n  collective_timeout_s: 10\n  join_timeout_s: 60\n  checksum_every: 10"
    )
}

#[test]
fn the_harness_cuts_links_and_removes_its_namespaces() {
    let before = setup::ip(&["-o", "link", "show"]).unwrap_or_default();
    let Some(net) = Net::start(3, "harness self-check") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A listener in host 0: a coordinator that waits for workers.
    let job = write_job(dir.path(), &net, 0, TINY, &training(10), &cluster(5), 1000);
    let (coord, addr, _log) = net.launch_coordinator(0, &job.1);
    let to: SocketAddr = addr.parse().unwrap();
    assert_eq!(to.ip().to_string(), "10.231.0.1");
    assert!(net.can_connect(1, to, 5), "host 1 reaches host 0");

    net.partition(1, Direction::Both).unwrap();
    assert!(!net.can_connect(1, to, 1), "partitioned both ways");
    assert!(net.can_connect(2, to, 5), "the others still reach host 0");
    net.heal(1).unwrap();
    assert!(net.can_connect(1, to, 5), "healed");
    // One way: host 0 receives nothing; host 1 sends nothing.
    net.partition(0, Direction::Inbound).unwrap();
    assert!(!net.can_connect(1, to, 1), "host 0 cut inbound");
    net.heal(0).unwrap();
    net.partition(1, Direction::Outbound).unwrap();
    assert!(!net.can_connect(1, to, 1), "host 1 cut outbound");
    net.heal(1).unwrap();
    assert!(net.can_connect(1, to, 5));
    // From some hosts only: host 1 cut from host 0, not from host 2.
    net.partition_from(1, &[2], Direction::Both).unwrap();
    assert!(net.can_connect(1, to, 5), "cut from host 2 only");
    net.partition_from(1, &[0, 2], Direction::Both).unwrap();
    assert!(!net.can_connect(1, to, 1), "cut from hosts 0 and 2");
    net.heal(1).unwrap();

    // Loss: all of host 1's packets dropped, and counted.
    net.drop_packets(1, 100.0).unwrap();
    assert!(!net.can_connect(1, to, 1));
    assert!(net.dropped_packets(1) > 0);
    net.drop_packets(1, 0.0).unwrap();
    assert!(net.can_connect(1, to, 5));
    net.cap_bandwidth(1, 100).unwrap();
    assert!(net.can_connect(1, to, 5), "capped, not cut");
    net.clear_qdiscs(1);
    match net.delay(1, 50, 10, 25) {
        Ok(()) => {
            assert!(net.can_connect(1, to, 5), "delayed, not cut");
            assert!(
                net.delayed_packets(1).0 > 0,
                "the delay line passed nothing"
            );
            net.clear_delay(1);
            assert!(net.can_connect(1, to, 5), "delay removed");
        }
        Err(FaultError::Unsupported(why)) => skip(
            "delay-line",
            &format!("latency, jitter and reordering cannot be simulated: {why}"),
        ),
        Err(e) => panic!("delay line: {e}"),
    }
    // The machine's own interfaces are as they were.
    assert_eq!(
        setup::ip(&["-o", "link", "show"]).unwrap_or_default(),
        before,
        "the harness changed the machine's own interfaces"
    );

    // Dropped, even by a panicking test, the net leaves no namespace behind.
    drop(coord);
    let name = net.name().to_string();
    assert_eq!(
        setup::namespaces()
            .iter()
            .filter(|n| n.starts_with(&name))
            .count(),
        4
    );
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _net = net;
        panic!("a failing test (on purpose)");
    }));
    assert!(r.is_err());
    let left: Vec<String> = setup::namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&name))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // A namespace of a process that is gone (a pid above pid_max never lives) is removed
    // by the next net; one of a live process stays.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stale = format!("{}{}-0-h0", setup::PREFIX, pid_max + 1);
    setup::ip(&["netns", "add", &stale]).unwrap();
    let next = Net::new(1).unwrap();
    let all = setup::namespaces();
    assert!(!all.contains(&stale), "{stale} was not removed");
    assert!(all.iter().any(|n| n.starts_with(next.name())));
}

/// The first connection to `listener` within `limit` (a panic past it: no test waits for
/// a peer forever), in blocking mode.
fn accept_within(listener: &TcpListener, limit: Duration) -> TcpStream {
    listener.set_nonblocking(true).unwrap();
    let end = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("no connection within {limit:?}: {e}"),
        }
    }
}

/// The median of `rounds` round trips of one byte from host 1 to an echo in host 0.
fn echo_rtt(net: &Net, rounds: usize) -> Duration {
    let listener = net.run_in(0, || TcpListener::bind("10.231.0.1:0").unwrap());
    let addr = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let mut s = accept_within(&listener, Duration::from_secs(10));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).is_ok() {
            s.write_all(&b).unwrap();
        }
    });
    let mut s = net.run_in(1, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap()
    });
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            s.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            t.elapsed()
        })
        .collect();
    drop(s);
    echo.join().unwrap();
    times.sort();
    times[rounds / 2]
}

/// The delay line (latency, jitter, reordering on what a host sends) does what it says,
/// seen from sockets in the hosts: a round trip from host 1 takes host 1's delay more;
/// with jitter and reordering, numbered datagrams arrive out of order but all arrive, and
/// a TCP stream still delivers every byte in order.
#[test]
fn a_delay_line_delays_jitters_and_reorders_what_a_host_sends() {
    let Some(net) = Net::start(2, "delay line") else {
        return;
    };
    let clean = echo_rtt(&net, 20);
    match net.delay(1, 50, 0, 0) {
        Err(FaultError::Unsupported(why)) => {
            skip("delay-line", &format!("cannot delay packets here: {why}"));
            return;
        }
        r => r.unwrap(),
    }
    let delayed = echo_rtt(&net, 20);
    eprintln!("round trip host 1 -> 0: {clean:?} clean, {delayed:?} with 50 ms on host 1");
    assert!(clean < Duration::from_millis(20), "{clean:?}");
    assert!(
        delayed >= Duration::from_millis(50)
            && delayed < Duration::from_millis(50) + clean + Duration::from_millis(20),
        "{delayed:?} (clean {clean:?})"
    );

    // 20 ± 10 ms, a quarter sent at once: 2,000 numbered datagrams, 1 ms apart.
    net.delay(1, 20, 10, 25).unwrap();
    let rx = net.run_in(0, || UdpSocket::bind("10.231.0.1:0").unwrap());
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let to = rx.local_addr().unwrap();
    let tx = net.run_in(1, || UdpSocket::bind("10.231.0.2:0").unwrap());
    let n = 2_000u32;
    let sender = std::thread::spawn(move || {
        for k in 0..n {
            tx.send_to(&k.to_le_bytes(), to).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let mut got = Vec::new();
    let mut b = [0u8; 4];
    while let Ok(len) = rx.recv(&mut b) {
        assert_eq!(len, 4);
        got.push(u32::from_le_bytes(b));
        if got.len() == n as usize {
            break;
        }
    }
    sender.join().unwrap();
    let late = got.windows(2).filter(|w| w[1] < w[0]).count();
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..n).collect::<Vec<_>>(),
        "a datagram was lost or doubled"
    );
    let (passed, reordered) = net.delayed_packets(1);
    eprintln!(
        "2,000 datagrams: {late} arrived after a later one; the line passed {passed}, {reordered} overtaken"
    );
    assert!(late > 100, "only {late} of {n} out of order");
    assert!(reordered > 0);

    // TCP over the same line: 4 MB arrive whole and in order.
    let listener = net.run_in(0, || TcpListener::bind("10.231.0.1:0").unwrap());
    let addr = listener.local_addr().unwrap();
    let bytes: Vec<u8> = (0..4_000_000u32).map(|k| (k % 251) as u8).collect();
    let expect = bytes.clone();
    let reader = std::thread::spawn(move || {
        let mut s = accept_within(&listener, Duration::from_secs(10));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let mut s = net.run_in(1, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap()
    });
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let t = Instant::now();
    s.write_all(&bytes).unwrap();
    drop(s);
    let got = reader.join().unwrap();
    eprintln!(
        "4 MB over TCP with 20 +- 10 ms and 25% reordering: {:?}",
        t.elapsed()
    );
    assert!(
        got == expect,
        "TCP delivered other bytes ({} of {})",
        got.len(),
        expect.len()
    );
    net.clear_delay(1);
    assert!(
        echo_rtt(&net, 5) < Duration::from_millis(20),
        "the delay was not removed"
    );
}

/// A worker cut off from everyone (both ways) is lost after `worker_timeout_s`, and the
/// other two go on as a new generation; once the partition heals, the cut-off worker
/// hears that it was dropped and exits 3 (the design: a dropped worker leaves, it does
/// not come back by itself). A replacement started on its host joins the next
/// generation with a peer's state, and the job completes with one set of parameters.
#[test]
fn a_partitioned_worker_is_dropped_and_a_replacement_on_its_host_joins() {
    let Some(net) = Net::start(4, "partitioned worker") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let files = write_job(dir.path(), &net, 0, TINY, &training(500), &cluster(3), 1000);
    let mut job = Job::start(&net, dir.path(), files, 0, &[1, 2, 3]);
    let t_start = Instant::now();
    job.wait_log("train step=20 ", Duration::from_secs(120));

    net.partition(3, Direction::Both).unwrap();
    let t0 = Instant::now();
    let lost = job.wait_log("worker lost", Duration::from_secs(30));
    let lost_after = t0.elapsed();
    job.wait_log("first step of the new generation", Duration::from_secs(30));
    let recovered_after = t0.elapsed();
    assert!(
        lost.contains("no heartbeat for 3 s") && lost.contains("ring=10.231.0.4:"),
        "{lost}"
    );
    // Lost after the timeout (3 s), not long after it; the others go on soon after.
    assert!(
        lost_after >= Duration::from_millis(2500) && lost_after < Duration::from_secs(8),
        "lost after {lost_after:?}"
    );
    net.heal(3).unwrap();
    let healed = Instant::now();
    let status = job.wait_worker(2, Duration::from_secs(60));
    let exit_after = healed.elapsed();
    let cut = job.workers[2].1.log_text();
    assert_eq!(status.code(), Some(3), "{cut}");
    assert!(cut.contains("the coordinator dropped this worker"), "{cut}");

    // A replacement on the same host joins the running job.
    let r = job.add_worker(3);
    job.wait_log("worker joined", Duration::from_secs(60));
    let (status, text) = job.finish(Duration::from_secs(300));
    assert!(status.success(), "{text}\n{}", job.worker_logs());
    for i in [0, 1, r] {
        let s = job.wait_worker(i, Duration::from_secs(60));
        assert!(s.success(), "worker {i}: {s}\n{}", job.worker_logs());
    }
    let lines = job.metrics();
    assert_eq!(generations(&lines), vec![(2, 2), (3, 3)], "{text}");
    let (steps, _, worlds) = accounting(&lines, BATCH);
    assert_eq!(*steps.keys().last().unwrap(), 500);
    assert_eq!(worlds, [2, 3].into());
    let prints = job.fingerprints(&[0, 1, r]);
    assert!(prints.iter().all(|p| *p == prints[0]), "{prints:?}");
    assert!(
        job.workers[r]
            .1
            .log_text()
            .contains("took the state of rank"),
        "{}",
        job.worker_logs()
    );
    eprintln!(
        "partitioned worker: lost {lost_after:?} after the cut, next generation after {recovered_after:?}, \
         the cut-off worker exited {exit_after:?} after the heal; {:?} in all",
        t_start.elapsed()
    );
}

/// A worker paused (SIGSTOP) past `worker_timeout_s` is lost and the other two go on as a
/// new generation. Resumed (SIGCONT), it does not disturb them: the coordinator no longer
/// knows it, so it exits 3; the survivors' generation is never re-formed, every step
/// counts once, and they end with the same parameters.
#[test]
fn a_paused_worker_resumed_after_it_was_dropped_leaves_the_new_generation_alone() {
    let Some(net) = Net::start(4, "paused worker") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let files = write_job(dir.path(), &net, 0, TINY, &training(400), &cluster(3), 1000);
    let mut job = Job::start(&net, dir.path(), files, 0, &[1, 2, 3]);
    let t_start = Instant::now();
    job.wait_log("train step=20 ", Duration::from_secs(120));
    job.workers[2].1.pause();
    job.wait_log("no heartbeat for 3 s", Duration::from_secs(30));
    job.wait_log("first step of the new generation", Duration::from_secs(30));
    // Let the new generation train a while, then wake the old worker in the middle of it.
    std::thread::sleep(Duration::from_secs(1));
    job.workers[2].1.resume();
    let status = job.wait_worker(2, Duration::from_secs(60));
    let woke = job.workers[2].1.log_text();
    assert_eq!(status.code(), Some(3), "{woke}");
    assert!(
        woke.contains("the coordinator dropped this worker"),
        "{woke}"
    );

    let (status, text) = job.finish(Duration::from_secs(300));
    assert!(status.success(), "{text}\n{}", job.worker_logs());
    for i in [0, 1] {
        let s = job.wait_worker(i, Duration::from_secs(60));
        assert!(s.success(), "worker {i}: {s}\n{}", job.worker_logs());
    }
    let lines = job.metrics();
    // One new generation (the two survivors) and no other: the woken worker broke nothing.
    assert_eq!(generations(&lines), vec![(2, 2)], "{text}");
    let (steps, _, worlds) = accounting(&lines, BATCH);
    assert_eq!(*steps.keys().last().unwrap(), 400);
    assert_eq!(worlds, [2, 3].into());
    // The ranks compared parameter checksums every 10 steps during the run (a difference
    // fails the job), and end with the same parameters.
    let prints = job.fingerprints(&[0, 1]);
    assert_eq!(prints[0], prints[1]);
    eprintln!("paused worker: {:?} in all", t_start.elapsed());
}
