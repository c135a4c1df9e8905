//! Flows through the tunnel: requests in progress, websockets and TCP connections, capped
//! for the whole edge and per client IP, so one client cannot take the tunnel from
//! everyone and a saturated tunnel sheds load with a clear answer instead of a queue.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::Limits;
use crate::config::policy::canonical;
use crate::phases::accept::give_back;

/// Why a flow was not let into the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// The edge carries `max_flows` (answer 503 with `Retry-After`).
    Edge,
    /// The client carries `max_flows_per_ip` (answer 429).
    Client,
}

/// Open flows, in all and by IP.
#[derive(Debug)]
pub struct Flows {
    max: usize,
    max_per_ip: u32,
    total: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, u32>>,
}

impl Flows {
    /// Flows under `limits`.
    pub fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(Self {
            max: limits.max_flows,
            max_per_ip: limits.max_flows_per_ip,
            total: AtomicUsize::new(0),
            by_ip: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more flow from `ip`.
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Result<FlowPermit, Full> {
        let ip = canonical(ip);
        let Ok(mut by_ip) = self.by_ip.lock() else {
            return Err(Full::Edge);
        };
        if self.total.load(Ordering::Relaxed) >= self.max {
            return Err(Full::Edge);
        }
        let n = by_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return Err(Full::Client);
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(FlowPermit {
            flows: self.clone(),
            ip,
        })
    }

    /// Flows open now.
    pub fn open_now(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

/// One flow's place; dropped when the flow ends.
#[derive(Debug)]
pub struct FlowPermit {
    flows: Arc<Flows>,
    ip: IpAddr,
}

impl Drop for FlowPermit {
    fn drop(&mut self) {
        if let Ok(mut by_ip) = self.flows.by_ip.lock() {
            give_back(&mut by_ip, &self.ip);
        }
        self.flows.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_client_and_for_the_edge() {
        let limits = Limits {
            max_flows: 3,
            max_flows_per_ip: 2,
            ..Limits::default()
        };
        let f = Flows::new(&limits);
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let c: IpAddr = "192.0.2.3".parse().expect("ip");
        let a1 = f.open(a).expect("a1");
        let _a2 = f.open(a).expect("a2");
        assert_eq!(f.open(a).err(), Some(Full::Client));
        let _b1 = f.open(b).expect("b1");
        assert_eq!(f.open(c).err(), Some(Full::Edge));
        drop(a1);
        let _c1 = f.open(c).expect("room again");
        assert_eq!(f.open_now(), 3);
    }
}
