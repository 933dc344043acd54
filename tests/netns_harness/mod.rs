//! Many hosts on one machine: a [`Net`] of N "hosts", each a network namespace with its
//! own address, joined by a bridge that lives in a namespace of its own, so that the
//! machine's own interfaces, routes and firewall are never touched. A job's coordinator
//! and workers run in hosts of a net (`ip netns exec`), the workers' ring sockets bound to
//! their host's address, and the test breaks the network under them:
//!
//! - [`Net::cap_bandwidth`]: a host's link limited to a rate, both ways (`tc` `tbf`);
//! - [`Net::drop_packets`]: a fraction of the packets a host sends dropped (nftables);
//! - [`Net::partition`]: a host cut off from the others, both ways or one way (nftables);
//! - [`Net::delay`]: latency, jitter and reordering of what a host sends, by a delay line
//!   in user space (a TUN device in the host's namespace, [`delay`]; this kernel has no
//!   `tc netem`); [`FaultError::Unsupported`] where TUN devices cannot be made, and the
//!   test skips that part loudly;
//! - [`Proc::pause`] / [`Proc::resume`] (SIGSTOP/SIGCONT) and [`Proc::kill`] on the
//!   processes started with [`Net::command`], [`Net::launch_coordinator`] and
//!   [`Net::join_worker`]; [`Job`] holds a whole job (its coordinator, workers and logs).
//!
//! Layout: namespace `NAME-br` holds bridge `br0`; host `i` is namespace `NAME-hI` with
//! interface `eth0` at `10.231.0.(I+1)/24`, a veth whose other end `pI` is a port of
//! `br0`. The veths are made inside the namespaces (never in the machine's own). Every net
//! has its own bridge and namespaces, so nets (tests running in parallel) share nothing,
//! not even an address space. Dropping the net kills whatever still runs in its
//! namespaces and deletes them, also when the test panicked ([`setup`] explains the
//! clean-up of nets left by a killed test process).
//!
//! Where namespaces cannot be made (not root, no `ip`, no veth or bridge support),
//! [`Net::start`] records a `SKIPPED` line through [`crate::skip`] and the test returns.

mod cluster;
pub mod delay;
mod faults;
mod job;
mod procs;
pub mod setup;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;

pub use cluster::Job;
pub use faults::{Direction, FaultError};
pub use job::write_job;
pub use procs::{Proc, TOKEN, fingerprint};

/// The first three octets of every host address (`10.231.0.1` is host 0).
pub const SUBNET: [u8; 3] = [10, 231, 0];

/// One host of a [`Net`].
#[derive(Debug, Clone)]
pub struct Host {
    /// Its network namespace.
    pub ns: String,
    /// Its address (on `eth0`).
    pub ip: Ipv4Addr,
    /// The bridge's end of its link (in the bridge's namespace).
    port: String,
}

/// N hosts on a bridge, each in its own network namespace (see the module documentation).
#[derive(Debug)]
pub struct Net {
    name: String,
    bridge_ns: String,
    hosts: Vec<Host>,
    /// Namespaces made so far (removed on drop, hosts first).
    made: Vec<String>,
    /// The running delay lines, by host.
    delays: Mutex<BTreeMap<usize, delay::DelayLine>>,
}

impl Net {
    /// Makes a net of `n` hosts, or says why it cannot be made here.
    pub fn new(n: usize) -> Result<Net, String> {
        assert!((1..=200).contains(&n), "1 to 200 hosts");
        if !setup::is_root() {
            return Err("network namespaces need root".into());
        }
        if let Err(e) = setup::ip(&["-V"]) {
            return Err(format!("no `ip` command (iproute2): {e}"));
        }
        setup::remove_stale();
        let name = setup::new_name();
        let mut net = Net {
            bridge_ns: format!("{name}-br"),
            name,
            hosts: Vec::new(),
            made: Vec::new(),
            delays: Mutex::new(BTreeMap::new()),
        };
        // On an error, `net` is dropped and removes what was made.
        net.build(n)
            .map_err(|e| format!("cannot make network namespaces here: {e}"))?;
        net.probe()
            .map_err(|e| format!("cannot filter or shape links here (nftables, tc tbf): {e}"))?;
        Ok(net)
    }

    /// [`Net::new`], or `None` after a loud skip of `what` (the test then returns).
    pub fn start(n: usize, what: &str) -> Option<Net> {
        match Net::new(n) {
            Ok(net) => Some(net),
            Err(why) => {
                crate::skip("netns", &format!("{what}: {why}"));
                None
            }
        }
    }

    fn build(&mut self, n: usize) -> Result<(), setup::CmdError> {
        let br = self.bridge_ns.clone();
        setup::ip(&["netns", "add", &br])?;
        self.made.push(br.clone());
        setup::ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        setup::ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = format!("{}-h{i}", self.name);
            let port = format!("p{i}");
            let [a, b, c] = SUBNET;
            let ip = Ipv4Addr::new(a, b, c, i as u8 + 1);
            setup::ip(&["netns", "add", &ns])?;
            self.made.push(ns.clone());
            setup::ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            // Made in the host's namespace, its other end moved straight into the bridge's.
            setup::ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &br,
            ])?;
            setup::ip(&["-n", &br, "link", "set", &port, "master", "br0"])?;
            setup::ip(&["-n", &br, "link", "set", &port, "up"])?;
            setup::ip(&["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            setup::ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            self.hosts.push(Host { ns, ip, port });
        }
        Ok(())
    }

    /// The net's name: every namespace of it starts with it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Host `i`.
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// How many hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether the net has no hosts (never: [`Net::new`] makes at least one).
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// `program` run in host `i` (`ip netns exec NS program`): the child's pid is the
    /// program's, since `ip netns exec` replaces itself with it.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i].ns]).arg(program);
        c
    }

    /// Runs `f` on a thread in host `i`'s namespace and returns what it returns: a socket
    /// `f` makes belongs to host `i`, whichever thread uses it afterwards.
    pub fn run_in<T: Send + 'static>(&self, i: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = self.hosts[i].ns.clone();
        std::thread::spawn(move || {
            delay::enter_namespace(&ns).unwrap_or_else(|e| panic!("host namespace: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// Whether host `from` can open a TCP connection to `to` within `timeout_s` seconds
    /// (bash's `/dev/tcp`, run in host `from`).
    pub fn can_connect(&self, from: usize, to: std::net::SocketAddr, timeout_s: u32) -> bool {
        let script = format!("exec 3<>/dev/tcp/{}/{}", to.ip(), to.port());
        setup::run(
            "ip",
            &[
                "netns",
                "exec",
                &self.hosts[from].ns,
                "timeout",
                &timeout_s.to_string(),
                "bash",
                "-c",
                &script,
            ],
            None,
        )
        .is_ok()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Each delay line's thread sits in its host's namespace: stop them first.
        self.delays
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for ns in self.made.iter().rev() {
            setup::remove(ns);
        }
    }
}
