//! Which interface holds which return-path tc program, kept equal to what
//! [`super::ifaces`] chose: at start-up, and after every change of the host's network
//! ([`crate::netwatch`]).
//!
//! An attachment is remembered with the interface index it was made on. A name is
//! not an identity: a container's veth deleted and created again under the same name
//! is a new interface, and the old link (defunct once its device is gone) must be
//! dropped and a new one made.
use std::collections::{BTreeMap, BTreeSet};

use aya::programs::tc::SchedClassifierLinkId;
use aya::programs::{SchedClassifier, TcAttachType};
use aya::Ebpf;
use mmproxy_common::program_names;

use super::{prog_err, EbpfError, ReturnInterfaces};

/// Which tc program sits on an interface, and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Direction {
    Egress,
    Ingress,
    /// The UDP relay's inbound program, on ingress.
    UdpIn,
    /// The UDP relay's outbound program for loopback services, on lo's egress.
    LoEgress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
            Direction::UdpIn => "udp-relay-ingress",
            Direction::LoEgress => "udp-relay-egress",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Direction::Egress => program_names::TC_EGRESS,
            Direction::Ingress => program_names::TC_INGRESS,
            Direction::UdpIn => program_names::TC_UDP_IN,
            Direction::LoEgress => program_names::TC_LO_EGRESS,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Direction::Egress | Direction::LoEgress => TcAttachType::Egress,
            Direction::Ingress | Direction::UdpIn => TcAttachType::Ingress,
        }
    }
}

type Key = (Direction, String);

/// What one reconciliation did, for the log and the counters.
#[derive(Debug, Default)]
pub struct TcChanges {
    pub attached: Vec<(Direction, String)>,
    pub detached: Vec<(Direction, String)>,
    /// Attachments that failed; they are tried again at the next reconciliation.
    pub failed: Vec<EbpfError>,
}

impl TcChanges {
    /// Nothing attached or detached.
    pub fn is_empty(&self) -> bool {
        self.attached.is_empty() && self.detached.is_empty()
    }
}

struct Held {
    ifindex: u32,
    id: SchedClassifierLinkId,
}

/// The tc links this process made, by direction and interface name.
#[derive(Default)]
pub(super) struct TcLinks {
    held: BTreeMap<Key, Held>,
}

impl TcLinks {
    /// Interfaces holding each program now.
    pub(super) fn current(&self) -> ReturnInterfaces {
        let mut out = ReturnInterfaces::default();
        for (dir, name) in self.held.keys() {
            match dir {
                Direction::Egress => out.egress.insert(name.clone()),
                Direction::Ingress => out.ingress.insert(name.clone()),
                Direction::UdpIn => out.udp_in.insert(name.clone()),
                Direction::LoEgress => out.lo_egress.insert(name.clone()),
            };
        }
        out
    }

    pub(super) fn holds(&self, dir: Direction) -> bool {
        self.held.keys().any(|(d, _)| *d == dir)
    }

    /// Detaches what is no longer wanted (or whose interface was replaced), then
    /// attaches what is wanted and missing. `skip_egress`: egress is wanted but must
    /// not be attached yet (its sysctl could not be set).
    pub(super) fn apply(
        &mut self,
        ebpf: &mut Ebpf,
        want: &ReturnInterfaces,
        skip_egress: bool,
    ) -> TcChanges {
        let wanted = wanted(want);
        let held: BTreeMap<Key, u32> = self
            .held
            .iter()
            .map(|(k, h)| (k.clone(), h.ifindex))
            .collect();
        let (detach, attach) = plan(&held, &wanted, super::if_index);
        let mut changes = TcChanges::default();
        for key in detach {
            let Some(held) = self.held.remove(&key) else {
                continue;
            };
            // A link whose interface is gone is defunct: the kernel already took the
            // program off, and dropping our descriptor is all that is left to do,
            // which detach does even when it reports an error.
            if let Err(e) = program(ebpf, key.0).and_then(|p| {
                p.detach(held.id)
                    .map_err(|source| prog_err(key.0.program(), source))
            }) {
                tracing::debug!(
                    error = &e as &dyn std::error::Error,
                    iface = %key.1,
                    "detaching a tc program"
                );
            }
            changes.detached.push(key);
        }
        for (dir, name) in attach {
            if dir == Direction::Egress && skip_egress {
                continue;
            }
            // Gone again since the choice was made: the event that says so follows.
            let Some(ifindex) = super::if_index(&name) else {
                continue;
            };
            match attach_one(ebpf, dir, &name) {
                Ok(id) => {
                    self.held.insert((dir, name.clone()), Held { ifindex, id });
                    changes.attached.push((dir, name));
                }
                Err(e) => changes.failed.push(e),
            }
        }
        changes
    }
}

fn wanted(want: &ReturnInterfaces) -> BTreeSet<Key> {
    let egress = want.egress.iter().map(|n| (Direction::Egress, n.clone()));
    let ingress = want.ingress.iter().map(|n| (Direction::Ingress, n.clone()));
    let udp_in = want.udp_in.iter().map(|n| (Direction::UdpIn, n.clone()));
    let lo = want
        .lo_egress
        .iter()
        .map(|n| (Direction::LoEgress, n.clone()));
    egress.chain(ingress).chain(udp_in).chain(lo).collect()
}

/// Which held attachments go and which wanted ones are made. An attachment whose
/// name now belongs to another interface index (or to none) goes, and is made again
/// if still wanted and the interface exists.
fn plan(
    held: &BTreeMap<Key, u32>,
    wanted: &BTreeSet<Key>,
    index_of: impl Fn(&str) -> Option<u32>,
) -> (Vec<Key>, Vec<Key>) {
    let mut detach = Vec::new();
    let mut keep = BTreeSet::new();
    for (key, ifindex) in held {
        if wanted.contains(key) && index_of(&key.1) == Some(*ifindex) {
            keep.insert(key.clone());
        } else {
            detach.push(key.clone());
        }
    }
    let attach = wanted
        .iter()
        .filter(|k| !keep.contains(*k) && index_of(&k.1).is_some())
        .cloned()
        .collect();
    (detach, attach)
}

fn program(ebpf: &mut Ebpf, dir: Direction) -> Result<&mut SchedClassifier, EbpfError> {
    let name = dir.program();
    ebpf.program_mut(name)
        .ok_or(EbpfError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| prog_err(name, source))
}

fn attach_one(
    ebpf: &mut Ebpf,
    dir: Direction,
    iface: &str,
) -> Result<SchedClassifierLinkId, EbpfError> {
    let name = dir.program();
    let program = program(ebpf, dir)?;
    // Loaded at its first attachment: a configuration that never needs it never
    // pays for the verifier.
    if program.fd().is_err() {
        program.load().map_err(|source| prog_err(name, source))?;
    }
    // TCX links (Linux >= 6.6): owned by this process, appended after any program
    // already there, never replacing one.
    program
        .attach(iface, dir.attach_type())
        .map_err(|source| EbpfError::Attach {
            program: name,
            iface: iface.to_owned(),
            direction: dir.as_str(),
            source: Box::new(source),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: Direction, name: &str) -> Key {
        (dir, name.to_owned())
    }

    #[test]
    fn plan_detaches_the_unwanted_and_the_replaced_and_attaches_the_missing() {
        use Direction::*;
        let held: BTreeMap<Key, u32> = [
            (key(Egress, "gw0"), 3),
            (key(Ingress, "app0"), 4),
            (key(Ingress, "app1"), 5),
        ]
        .into_iter()
        .collect();
        let wanted: BTreeSet<Key> = [
            key(Egress, "gw1"),
            key(Ingress, "app0"),
            key(Ingress, "app1"),
            key(Ingress, "vanished"),
        ]
        .into_iter()
        .collect();
        // app1 was deleted and created again (index 9); gw0 no longer carries the
        // default route; "vanished" is already gone again.
        let index_of = |n: &str| match n {
            "gw0" => Some(3),
            "gw1" => Some(6),
            "app0" => Some(4),
            "app1" => Some(9),
            _ => None,
        };
        let (detach, attach) = plan(&held, &wanted, index_of);
        assert_eq!(detach, vec![key(Egress, "gw0"), key(Ingress, "app1")]);
        assert_eq!(attach, vec![key(Egress, "gw1"), key(Ingress, "app1")]);
    }

    #[test]
    fn plan_is_empty_when_nothing_changed() {
        let held: BTreeMap<Key, u32> = [(key(Direction::Egress, "gw0"), 3)].into_iter().collect();
        let wanted: BTreeSet<Key> = held.keys().cloned().collect();
        let (detach, attach) = plan(&held, &wanted, |_| Some(3));
        assert!(detach.is_empty() && attach.is_empty());
    }
}
