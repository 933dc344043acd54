//! Which backend all-reduces the gradients of a generation (`cluster.collective`).
//!
//! - `ring`: the TCP ring; NCCL is never loaded.
//! - `nccl`: every worker checks at start that it can use NCCL (a CUDA device, the
//!   `nccl` feature, the library loaded: `nccl_lib` lists where it is looked for) and
//!   fails with the reason otherwise; a generation whose ranks share a GPU fails too.
//! - `auto`: NCCL when every rank of the generation can use it, each on its own GPU;
//!   else the ring. Each generation logs which and why.
//!
//! Every rank must take the same decision (a rank on NCCL and one on the ring would wait
//! for each other forever), so the ranks exchange a [`Vote`] over the freshly formed ring:
//! whether they can use NCCL and which GPU they hold. NCCL refuses two ranks on one GPU
//! ("Duplicate GPU detected"), so two ranks with the same GPU (same host and boot, same
//! physical device after `CUDA_VISIBLE_DEVICES`) make `auto` take the ring and `nccl` fail
//! with a message saying so: scfm does not try to make them distinct NCCL hosts.

use scfm_common::config::Device as DeviceChoice;
use scfm_common::manifest::CollectiveBackend;
use sha2::{Digest, Sha256};

use super::{Collective, CollectiveError};

/// What this worker offers NCCL, found once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNccl {
    /// `Ok(the loaded NCCL, e.g. "NCCL 2.29.7 (path)")`, or why this worker cannot use it.
    pub usable: Result<String, String>,
    /// The GPU this worker trains on, e.g. `GPU 0 of host node1`.
    pub gpu_label: String,
    /// Identity of that GPU: two workers with the same key share one GPU.
    pub gpu_key: [u32; 3],
}

impl LocalNccl {
    /// Probes this process for NCCL (loading the library) with the job's device setting.
    pub fn probe(device: DeviceChoice) -> LocalNccl {
        let usable = usable_here(device);
        // The GPU matters only to a worker that can use NCCL.
        let (gpu_label, gpu_key) = match usable {
            Ok(_) => gpu_identity(),
            Err(_) => ("no GPU for NCCL".to_string(), [0; 3]),
        };
        LocalNccl {
            usable,
            gpu_label,
            gpu_key,
        }
    }
}

/// Whether this process can use NCCL, and if not why (naming every place NCCL was looked
/// for where it was looked for).
fn usable_here(device: DeviceChoice) -> Result<String, String> {
    if device == DeviceChoice::Cpu {
        return Err("cluster.device is `cpu`".into());
    }
    #[cfg(not(feature = "nccl"))]
    {
        Err(
            "this scfm-worker was built without the `nccl` cargo feature \
             (cargo build --release -p scfm-worker --features nccl)"
                .into(),
        )
    }
    #[cfg(feature = "nccl")]
    {
        let lib = super::nccl::load();
        if !tch::Cuda::is_available() {
            return Err(format!(
                "CUDA is not available to this worker (no GPU or driver visible); {}",
                match lib {
                    Ok(l) => format!("{} was found", super::nccl::describe(l)),
                    Err(e) => e.to_string(),
                }
            ));
        }
        lib.map(super::nccl::describe).map_err(str::to_string)
    }
}

/// The GPU a worker trains on (its first visible CUDA device): a label, and a key made of
/// the host name, the boot id and the physical device — its PCI bus id from the CUDA
/// driver (what NCCL compares; right also where every worker sees its own GPU as device 0,
/// as under Slurm's device cgroups), else `CUDA_VISIBLE_DEVICES`'s first entry, else 0.
pub fn gpu_identity() -> (String, [u32; 3]) {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let mut host = read("/proc/sys/kernel/hostname");
    if host.is_empty() {
        host = std::env::var("HOSTNAME").unwrap_or_default();
    }
    let boot = read("/proc/sys/kernel/random/boot_id");
    let device = pci_bus_id()
        .unwrap_or_else(|| physical_device(std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref()));
    gpu_key(&host, &boot, &device)
}

/// The PCI bus id of this process's CUDA device 0 (only a build with `nccl` asks the driver).
#[cfg(feature = "nccl")]
fn pci_bus_id() -> Option<String> {
    super::nccl::cuda_pci_bus_id()
}

/// The PCI bus id of this process's CUDA device 0 (only a build with `nccl` asks the driver).
#[cfg(not(feature = "nccl"))]
fn pci_bus_id() -> Option<String> {
    None
}

/// The physical device behind CUDA device 0 given `CUDA_VISIBLE_DEVICES`.
pub fn physical_device(visible: Option<&str>) -> String {
    visible
        .and_then(|v| v.split(',').map(str::trim).find(|s| !s.is_empty()))
        .unwrap_or("0")
        .to_string()
}

/// The label and key of `device` on `host` booted as `boot`.
pub fn gpu_key(host: &str, boot: &str, device: &str) -> (String, [u32; 3]) {
    let h = Sha256::digest(format!("{host}\0{boot}\0{device}").as_bytes());
    let x = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
    // Three 22-bit parts: each is exact in an f32 (the ring's all-gather carries f32).
    let part = |i: u32| ((x >> (22 * i)) & 0x3f_ffff) as u32;
    (
        format!("GPU {device} of host {host}"),
        [part(0), part(1), part(2)],
    )
}

/// The start-up check of `cluster.collective: nccl`: the reason this worker cannot honour it.
pub fn require_nccl(setting: CollectiveBackend, local: &LocalNccl) -> Result<(), String> {
    match (&local.usable, setting) {
        (Err(why), CollectiveBackend::Nccl) => Err(format!(
            "cluster.collective is `nccl`, but this worker cannot use NCCL: {why}"
        )),
        _ => Ok(()),
    }
}

/// One rank's contribution to the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vote {
    /// Whether the rank can use NCCL.
    pub usable: bool,
    /// The key of its GPU ([`LocalNccl::gpu_key`]).
    pub gpu: [u32; 3],
}

impl Vote {
    /// This worker's vote.
    pub fn of(local: &LocalNccl) -> Vote {
        Vote {
            usable: local.usable.is_ok(),
            gpu: local.gpu_key,
        }
    }

    fn encode(&self) -> [f32; 4] {
        [
            if self.usable { 1.0 } else { 0.0 },
            self.gpu[0] as f32,
            self.gpu[1] as f32,
            self.gpu[2] as f32,
        ]
    }

    fn decode(v: &[f32]) -> Vote {
        Vote {
            usable: v[0] == 1.0,
            gpu: [v[1] as u32, v[2] as u32, v[3] as u32],
        }
    }
}

/// The backend of one generation, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The TCP ring.
    Ring(String),
    /// NCCL.
    Nccl(String),
}

/// The choice that needs no vote (the same on every rank: it depends on the manifest and
/// the world size only); `None`: the ranks vote.
pub fn without_vote(
    setting: CollectiveBackend,
    device: DeviceChoice,
    world: usize,
) -> Option<Choice> {
    if setting == CollectiveBackend::Ring {
        Some(Choice::Ring("cluster.collective is `ring`".into()))
    } else if world == 1 {
        Some(Choice::Ring(
            "a single worker: there is nothing to all-reduce".into(),
        ))
    } else if device == DeviceChoice::Cpu {
        Some(Choice::Ring("cluster.device is `cpu`".into()))
    } else {
        None
    }
}

/// Decides from every rank's vote (indexed by rank): NCCL when all can use it on distinct
/// GPUs; else the ring with `auto`, an error with `nccl`.
pub fn decide(setting: CollectiveBackend, votes: &[Vote]) -> Result<Choice, String> {
    let ranks = |v: Vec<usize>| {
        v.iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let unusable: Vec<usize> = (0..votes.len()).filter(|&r| !votes[r].usable).collect();
    let shared = (0..votes.len()).find_map(|j| {
        (0..j)
            .find(|&i| votes[i].gpu == votes[j].gpu)
            .map(|i| (i, j))
    });
    let why = if !unusable.is_empty() {
        format!(
            "rank(s) {} cannot use NCCL (each says why in its log)",
            ranks(unusable)
        )
    } else if let Some((i, j)) = shared {
        format!(
            "ranks {i} and {j} train on the same GPU, and NCCL refuses two ranks on one GPU \
             (give each worker its own GPU, e.g. with CUDA_VISIBLE_DEVICES, or set \
             cluster.collective: ring)"
        )
    } else {
        return Ok(Choice::Nccl(format!(
            "all {} ranks can use NCCL, each on its own GPU",
            votes.len()
        )));
    };
    match setting {
        CollectiveBackend::Nccl => Err(format!("cluster.collective is `nccl`, but {why}")),
        _ => Ok(Choice::Ring(why)),
    }
}

/// Exchanges the ranks' votes over `coll` (every rank calls it at the same point).
pub fn exchange_votes(coll: &mut dyn Collective, mine: Vote) -> Result<Vec<Vote>, CollectiveError> {
    let all = coll.all_gather(&mine.encode())?;
    Ok(all.chunks_exact(4).map(Vote::decode).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use CollectiveBackend::{Auto, Nccl, Ring};

    fn vote(usable: bool, device: &str) -> Vote {
        Vote {
            usable,
            gpu: gpu_key("node1", "boot-a", device).1,
        }
    }

    #[test]
    fn votes_survive_the_f32_encoding() {
        for d in ["0", "1", "GPU-8f2e", "7"] {
            let v = vote(true, d);
            assert_eq!(Vote::decode(&v.encode()), v);
            assert!(v.gpu.iter().all(|&p| p < (1 << 22)));
        }
        assert_ne!(vote(true, "0").gpu, vote(true, "1").gpu);
        assert_ne!(gpu_key("node1", "b", "0").1, gpu_key("node2", "b", "0").1);
        assert_eq!(gpu_key("n", "b", "3").0, "GPU 3 of host n");
    }

    #[test]
    fn the_physical_device_follows_cuda_visible_devices() {
        assert_eq!(physical_device(None), "0");
        assert_eq!(physical_device(Some("")), "0");
        assert_eq!(physical_device(Some("2,3")), "2");
        assert_eq!(physical_device(Some(" GPU-ab12 ,1")), "GPU-ab12");
    }

    #[test]
    fn settings_that_need_no_vote() {
        let cuda = DeviceChoice::Auto;
        assert!(
            matches!(without_vote(Ring, cuda, 4), Some(Choice::Ring(w)) if w.contains("`ring`"))
        );
        assert!(
            matches!(without_vote(Auto, cuda, 1), Some(Choice::Ring(w)) if w.contains("single worker"))
        );
        assert!(
            matches!(without_vote(Auto, DeviceChoice::Cpu, 2), Some(Choice::Ring(w)) if w.contains("cpu"))
        );
        assert_eq!(without_vote(Auto, cuda, 2), None);
        assert_eq!(without_vote(Nccl, DeviceChoice::Cuda, 2), None);
    }

    #[test]
    fn auto_takes_nccl_only_when_every_rank_can_on_its_own_gpu() {
        let ok = [vote(true, "0"), vote(true, "1")];
        assert!(matches!(decide(Auto, &ok), Ok(Choice::Nccl(_))));
        assert!(matches!(decide(Nccl, &ok), Ok(Choice::Nccl(_))));
        let one_cannot = [vote(true, "0"), vote(false, "1"), vote(false, "2")];
        assert_eq!(
            decide(Auto, &one_cannot),
            Ok(Choice::Ring(
                "rank(s) 1, 2 cannot use NCCL (each says why in its log)".into()
            ))
        );
        let e = decide(Nccl, &one_cannot).unwrap_err();
        assert!(
            e.starts_with("cluster.collective is `nccl`, but rank(s) 1, 2"),
            "{e}"
        );
    }

    #[test]
    fn two_ranks_on_one_gpu_take_the_ring_or_fail_with_nccl() {
        let shared = [vote(true, "0"), vote(true, "1"), vote(true, "0")];
        let Ok(Choice::Ring(why)) = decide(Auto, &shared) else {
            panic!("{:?}", decide(Auto, &shared));
        };
        assert!(
            why.starts_with("ranks 0 and 2 train on the same GPU"),
            "{why}"
        );
        let e = decide(Nccl, &shared).unwrap_err();
        assert!(
            e.contains("ranks 0 and 2 train on the same GPU") && e.contains("NCCL refuses"),
            "{e}"
        );
    }

    #[test]
    fn nccl_requested_on_a_worker_that_cannot_is_refused_at_start() {
        let local = LocalNccl::probe(DeviceChoice::Cpu);
        assert_eq!(local.usable, Err("cluster.device is `cpu`".into()));
        assert!(require_nccl(Auto, &local).is_ok());
        assert!(require_nccl(Ring, &local).is_ok());
        let e = require_nccl(Nccl, &local).unwrap_err();
        assert_eq!(
            e,
            "cluster.collective is `nccl`, but this worker cannot use NCCL: cluster.device is `cpu`"
        );
        // Without a GPU, with the device left to `auto`, NCCL is not usable either, and the
        // reason names what is missing.
        if tch::Cuda::is_available() {
            return;
        }
        let local = LocalNccl::probe(DeviceChoice::Auto);
        let why = local.usable.unwrap_err();
        #[cfg(not(feature = "nccl"))]
        assert!(why.contains("without the `nccl` cargo feature"), "{why}");
        #[cfg(feature = "nccl")]
        assert!(
            why.starts_with("CUDA is not available to this worker"),
            "{why}"
        );
    }

    #[test]
    fn the_ring_carries_the_votes() {
        let mut one = super::super::LocalCollective::new();
        let v = vote(true, "0");
        assert_eq!(exchange_votes(&mut one, v).unwrap(), vec![v]);
    }
}
