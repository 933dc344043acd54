//! Faults on the links of a [`Net`]: bandwidth caps (`tc tbf`), dropped packets and
//! partitions (nftables tables in the host's namespace), latency, jitter and reordering
//! (a [`DelayLine`] in user space). Each fault can be set and removed at any moment, and
//! they combine; the machine's own namespace is never touched.
//!
//! The nftables rules on what a host sends match both `eth0` and the delay line's device:
//! a packet the host sends passes the output hook once, on its way to whichever of the
//! two its route names (the delay line then forwards it out of `eth0`).

use std::sync::atomic::Ordering;

use super::Net;
use super::delay::{DEVICE, DelayLine, RULE_PREF, Shape, StartError, TABLE};
use super::setup::{self, CmdError};

/// Which traffic of a host a partition cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Nothing in or out.
    Both,
    /// What the host sends is lost; it still receives.
    Outbound,
    /// What is sent to the host is lost; it still sends.
    Inbound,
}

/// Why a fault could not be set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultError {
    /// This machine cannot simulate it (no such qdisc, no nftables): skip, loudly.
    Unsupported(String),
    /// The command failed for another reason: a bug in the harness or the test.
    Failed(String),
}

impl std::fmt::Display for FaultError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FaultError::Unsupported(m) => write!(f, "not supported here: {m}"),
            FaultError::Failed(m) => f.write_str(m),
        }
    }
}

/// Sorts a command's error: a missing program or kernel feature is `Unsupported`.
fn classify(e: CmdError) -> FaultError {
    match e {
        CmdError::Missing(_) => FaultError::Unsupported(e.to_string()),
        CmdError::Failed(m)
            if m.contains("Specified qdisc kind is unknown")
                || m.contains("Operation not supported")
                || m.contains("Could not process rule: No such file or directory") =>
        {
            FaultError::Unsupported(m)
        }
        CmdError::Failed(m) => FaultError::Failed(m),
    }
}

/// The nftables table of packet loss.
const LOSS: &str = "scfm_loss";
/// The nftables table of partitions.
const PARTITION: &str = "scfm_partition";

impl Net {
    /// Runs `tc ARGS` in namespace `ns`.
    fn tc(&self, ns: &str, args: &[&str]) -> Result<(), FaultError> {
        let mut a = vec!["-n", ns];
        a.extend_from_slice(args);
        setup::run("tc", &a, None).map(drop).map_err(classify)
    }

    /// Replaces table `table` in host `i` with `body` (chains), atomically; an empty body
    /// only removes it.
    fn nft_table(&self, i: usize, table: &str, body: &str) -> Result<(), FaultError> {
        // `add` then `delete` removes the table whether or not it existed.
        let mut script = format!("add table inet {table}\ndelete table inet {table}\n");
        if !body.is_empty() {
            script.push_str(&format!("table inet {table} {{\n{body}}}\n"));
        }
        let ns = &self.host(i).ns;
        setup::run(
            "ip",
            &["netns", "exec", ns, "nft", "-f", "-"],
            Some(&script),
        )
        .map(drop)
        .map_err(classify)
    }

    /// Checks, on host 0, that the faults every netns test relies on can be set here:
    /// nftables rules (partitions, loss) with `numgen`, and a `tbf` bandwidth cap. A
    /// machine with `ip` but without `nft`, or a kernel without these, fails here, so
    /// the tests skip loudly instead of failing half-way.
    pub(super) fn probe(&self) -> Result<(), FaultError> {
        self.drop_packets(0, 1.0)?;
        self.drop_packets(0, 0.0)?;
        self.cap_bandwidth(0, 1000)?;
        self.clear_qdiscs(0);
        Ok(())
    }

    /// Limits host `i`'s link to `mbit` Mbit/s in both directions: a token bucket on its
    /// `eth0` (what it sends) and on the bridge's port to it (what it receives).
    pub fn cap_bandwidth(&self, i: usize, mbit: u32) -> Result<(), FaultError> {
        let rate = format!("{mbit}mbit");
        // A burst of 64 KB (a few ms at 100 Mbit/s) and at most 50 ms of queue.
        let tbf = [
            "root", "tbf", "rate", &rate, "burst", "64kb", "latency", "50ms",
        ];
        let h = self.host(i);
        for (ns, dev) in [(&h.ns, "eth0"), (&self.bridge_ns, h.port.as_str())] {
            let mut args = vec!["qdisc", "replace", "dev", dev];
            args.extend_from_slice(&tbf);
            self.tc(ns, &args)?;
        }
        Ok(())
    }

    /// Latency (`delay_ms` ± `jitter_ms`, uniform) and reordering (`reorder_pct` % of
    /// packets sent at once) on what host `i` sends, by a [`DelayLine`] (a TUN device in
    /// its namespace; this kernel has no `tc netem`). Replaces an earlier delay of the
    /// host; combines with its bandwidth cap, packet loss and partitions.
    /// [`FaultError::Unsupported`] where TUN devices cannot be made.
    pub fn delay(
        &self,
        i: usize,
        delay_ms: u32,
        jitter_ms: u32,
        reorder_pct: u32,
    ) -> Result<(), FaultError> {
        self.clear_delay(i);
        let shape = Shape {
            delay_ms,
            jitter_ms,
            reorder_pct,
        };
        let h = self.host(i);
        let line = DelayLine::start(&h.ns, shape, 1 + i as u64).map_err(|e| match e {
            StartError::Unsupported(m) => FaultError::Unsupported(m),
            StartError::Failed(m) => FaultError::Failed(m),
        })?;
        let [a, b, c] = super::SUBNET;
        let subnet = format!("{a}.{b}.{c}.0/24");
        let src = h.ip.to_string();
        let ns = h.ns.as_str();
        // The host's own packets (`iif lo`) to the subnet go into the device; what the
        // line writes back comes in from the device and leaves by the main table (eth0).
        let steps: [&[&str]; 3] = [
            &["-n", ns, "link", "set", DEVICE, "up"],
            &[
                "-n", ns, "route", "replace", &subnet, "dev", DEVICE, "src", &src, "table", TABLE,
            ],
            &[
                "-n", ns, "rule", "add", "pref", RULE_PREF, "iif", "lo", "lookup", TABLE,
            ],
        ];
        for args in steps {
            setup::ip(args).map_err(classify)?;
        }
        self.delays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(i, line);
        Ok(())
    }

    /// Ends host `i`'s delay (if any): its packets leave by `eth0` directly again.
    pub fn clear_delay(&self, i: usize) {
        let line = self
            .delays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&i);
        if line.is_some() {
            let ns = &self.host(i).ns;
            // No rule there is no error worth reporting.
            let _ = setup::ip(&["-n", ns, "rule", "del", "pref", RULE_PREF]);
        }
        // Dropping the line closes its device, and the device's route goes with it.
        drop(line);
    }

    /// Packets host `i`'s delay line has passed on, and how many of them overtook a
    /// packet sent before them (0, 0 without a delay).
    pub fn delayed_packets(&self, i: usize) -> (u64, u64) {
        let lines = self.delays.lock().unwrap_or_else(|p| p.into_inner());
        lines.get(&i).map_or((0, 0), |l| {
            let c = l.counters();
            (
                c.passed.load(Ordering::Relaxed),
                c.reordered.load(Ordering::Relaxed),
            )
        })
    }

    /// Removes host `i`'s bandwidth cap (both directions).
    pub fn clear_qdiscs(&self, i: usize) {
        let h = self.host(i);
        for (ns, dev) in [(&h.ns, "eth0"), (&self.bridge_ns, h.port.as_str())] {
            // No qdisc of ours there is no error worth reporting.
            let _ = self.tc(ns, &["qdisc", "del", "dev", dev, "root"]);
        }
    }

    /// Drops `percent` % (in steps of 0.01) of the packets host `i` sends on its link, at
    /// random; every packet between two hosts passes one sender's rule, so this on every
    /// host is that loss on every link. 0 removes it.
    pub fn drop_packets(&self, i: usize, percent: f64) -> Result<(), FaultError> {
        assert!((0.0..=100.0).contains(&percent), "a percentage");
        let basis_points = (percent * 100.0).round() as u32;
        let pick = if basis_points >= 10_000 {
            String::new()
        } else {
            format!("numgen random mod 10000 < {basis_points} ")
        };
        let body = if basis_points == 0 {
            String::new()
        } else {
            format!(
                "chain out {{\ntype filter hook output priority 0; policy accept;\n\
                 oifname {{ \"eth0\", \"{DEVICE}\" }} {pick}counter drop\n}}\n"
            )
        };
        self.nft_table(i, LOSS, &body)
    }

    /// How many packets [`Net::drop_packets`] has dropped on host `i` so far (its rule's
    /// counter; 0 without the rule).
    pub fn dropped_packets(&self, i: usize) -> u64 {
        let ns = &self.host(i).ns;
        let listed = setup::run(
            "ip",
            &["netns", "exec", ns, "nft", "list", "table", "inet", LOSS],
            None,
        )
        .unwrap_or_default();
        listed
            .split("packets ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Cuts host `i` off from the others (`Both` ways, or one way): its packets on the
    /// link are dropped, not refused, as on a broken cable. Replaces an earlier partition
    /// of the host.
    pub fn partition(&self, i: usize, dir: Direction) -> Result<(), FaultError> {
        let out = format!("oifname {{ \"eth0\", \"{DEVICE}\" }}");
        self.cut(i, "iifname \"eth0\"", &out, dir)
    }

    /// Cuts host `i` off from the hosts `peers` only (`Both` ways, or one way, as seen
    /// from host `i`); it still reaches the others. Replaces an earlier partition of the
    /// host.
    pub fn partition_from(
        &self,
        i: usize,
        peers: &[usize],
        dir: Direction,
    ) -> Result<(), FaultError> {
        let set = peers
            .iter()
            .map(|&p| self.host(p).ip.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let from = format!("ip saddr {{ {set} }}");
        let to = format!("ip daddr {{ {set} }}");
        self.cut(i, &from, &to, dir)
    }

    /// The partition table of host `i`: packets in that match `inbound` and packets out
    /// that match `outbound` are dropped (as `dir` says).
    fn cut(
        &self,
        i: usize,
        inbound: &str,
        outbound: &str,
        dir: Direction,
    ) -> Result<(), FaultError> {
        let input = format!(
            "chain in {{\ntype filter hook input priority 0; policy accept;\n{inbound} drop\n}}\n"
        );
        let output = format!(
            "chain out {{\ntype filter hook output priority 0; policy accept;\n{outbound} drop\n}}\n"
        );
        let body = match dir {
            Direction::Both => format!("{input}{output}"),
            Direction::Inbound => input,
            Direction::Outbound => output,
        };
        self.nft_table(i, PARTITION, &body)
    }

    /// Ends host `i`'s partition.
    pub fn heal(&self, i: usize) -> Result<(), FaultError> {
        self.nft_table(i, PARTITION, "")
    }
}
