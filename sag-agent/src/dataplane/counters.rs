//! Per-client and per-interface counters: reading them from the live maps or from pins.

use std::{borrow::Borrow, collections::BTreeMap, net::Ipv4Addr, path::Path};

use aya::maps::{Map, MapData, MapError, PerCpuHashMap, PerCpuValues};
use sag_common::{
    counters::{ClientCounters, Direction, InterfaceKey, InterfaceKind, PacketCounter},
    map_names,
};

use super::{map_error, Dataplane, DataplaneError};

/// Per-interface counter of one direction and kind, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceCounter {
    pub ifindex: u32,
    pub direction: Direction,
    pub kind: InterfaceKind,
    pub counter: PacketCounter,
}

impl Dataplane {
    /// Returns the counters of `address`, summed over CPUs.
    ///
    /// # Errors
    /// Fails with [`DataplaneError::ClientNotFound`] if the address is not a client.
    pub fn client_counters(&self, address: Ipv4Addr) -> Result<ClientCounters, DataplaneError> {
        let map = self.client_map()?;
        match map.get(&u32::from(address), 0) {
            Ok(values) => Ok(sum_client(&values)),
            Err(MapError::KeyNotFound) => Err(DataplaneError::ClientNotFound(address)),
            Err(source) => Err(map_error(map_names::CLIENT_COUNTERS)(source)),
        }
    }

    /// Returns every client's counters, summed over CPUs, sorted by address.
    pub fn clients(&self) -> Result<BTreeMap<Ipv4Addr, ClientCounters>, DataplaneError> {
        read_clients(&self.client_map()?)
    }

    /// Returns the per-interface counters, summed over CPUs, sorted by interface, direction
    /// and kind.
    pub fn interface_counters(&self) -> Result<Vec<InterfaceCounter>, DataplaneError> {
        let name = map_names::INTERFACE_COUNTERS;
        let map: PerCpuHashMap<&MapData, InterfaceKey, PacketCounter> = self
            .ebpf
            .map(name)
            .ok_or(DataplaneError::MissingMap(name))?
            .try_into()
            .map_err(map_error(name))?;
        read_interfaces(&map)
    }

    pub(super) fn client_map(
        &self,
    ) -> Result<PerCpuHashMap<&MapData, u32, ClientCounters>, DataplaneError> {
        let name = map_names::CLIENT_COUNTERS;
        self.ebpf
            .map(name)
            .ok_or(DataplaneError::MissingMap(name))?
            .try_into()
            .map_err(map_error(name))
    }

    pub(super) fn client_map_mut(
        &mut self,
    ) -> Result<PerCpuHashMap<&mut MapData, u32, ClientCounters>, DataplaneError> {
        let name = map_names::CLIENT_COUNTERS;
        self.ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))?
            .try_into()
            .map_err(map_error(name))
    }
}

/// The counter maps pinned under a directory, opened without loading the programs: for reading
/// counters while another process owns the dataplane.
pub struct PinnedCounters {
    clients: PerCpuHashMap<MapData, u32, ClientCounters>,
    interfaces: PerCpuHashMap<MapData, InterfaceKey, PacketCounter>,
}

impl PinnedCounters {
    /// Opens the maps pinned under `pin_dir`.
    ///
    /// # Errors
    /// Fails if a map is not pinned there or is not a counter map of this agent.
    pub fn open(pin_dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            clients: open_pinned(pin_dir, map_names::CLIENT_COUNTERS)?,
            interfaces: open_pinned(pin_dir, map_names::INTERFACE_COUNTERS)?,
        })
    }

    /// Returns every client's counters, summed over CPUs, sorted by address.
    pub fn clients(&self) -> Result<BTreeMap<Ipv4Addr, ClientCounters>, DataplaneError> {
        read_clients(&self.clients)
    }

    /// Returns the per-interface counters, summed over CPUs.
    pub fn interface_counters(&self) -> Result<Vec<InterfaceCounter>, DataplaneError> {
        read_interfaces(&self.interfaces)
    }
}

fn open_pinned<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &'static str,
) -> Result<PerCpuHashMap<MapData, K, V>, DataplaneError> {
    let failed = map_error(name);
    let data = MapData::from_pin(pin_dir.join(name)).map_err(failed)?;
    Map::from_map_data(data)
        .map_err(failed)?
        .try_into()
        .map_err(failed)
}

fn read_clients<T: Borrow<MapData>>(
    map: &PerCpuHashMap<T, u32, ClientCounters>,
) -> Result<BTreeMap<Ipv4Addr, ClientCounters>, DataplaneError> {
    let mut clients = BTreeMap::new();
    for entry in map.iter() {
        let (key, values) = entry.map_err(map_error(map_names::CLIENT_COUNTERS))?;
        clients.insert(Ipv4Addr::from(key), sum_client(&values));
    }
    Ok(clients)
}

fn read_interfaces<T: Borrow<MapData>>(
    map: &PerCpuHashMap<T, InterfaceKey, PacketCounter>,
) -> Result<Vec<InterfaceCounter>, DataplaneError> {
    let name = map_names::INTERFACE_COUNTERS;
    let mut counters = Vec::new();
    for entry in map.iter() {
        let (key, values) = entry.map_err(map_error(name))?;
        let Some(kind) = InterfaceKind::from_u8(key.kind) else {
            continue;
        };
        let direction = if key.direction == Direction::Rx as u8 {
            Direction::Rx
        } else {
            Direction::Tx
        };
        let mut counter = PacketCounter::default();
        values.iter().for_each(|value| counter.merge(value));
        counters.push(InterfaceCounter {
            ifindex: key.ifindex,
            direction,
            kind,
            counter,
        });
    }
    counters.sort_by_key(|c| (c.ifindex, c.direction as u8, c.kind as u8));
    Ok(counters)
}

fn sum_client(values: &PerCpuValues<ClientCounters>) -> ClientCounters {
    let mut total = ClientCounters::default();
    values.iter().for_each(|value| total.merge(value));
    total
}
