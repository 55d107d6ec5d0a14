//! Per-client and per-interface counters: reading them from the live maps or from pins.

use std::{borrow::Borrow, collections::BTreeMap, net::Ipv4Addr, path::Path};

use aya::maps::{
    HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues,
};
use sag_common::{
    counters::{ClientCounters, Direction, InterfaceKey, InterfaceKind, PacketCounter},
    map_names,
    policy::Client,
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
        let slot = *self.slots.get(&address).ok_or(DataplaneError::ClientNotFound(address))?;
        let counters: PerCpuArray<&MapData, ClientCounters> =
            self.typed_map(map_names::CLIENT_COUNTERS)?;
        read_slot(&counters, slot)
    }

    /// Returns the addresses of all clients, without reading their counters.
    pub fn client_addresses(&self) -> Vec<Ipv4Addr> {
        self.slots.keys().copied().collect()
    }

    /// Returns every client's counters, summed over CPUs, sorted by address.
    pub fn clients(&self) -> Result<BTreeMap<Ipv4Addr, ClientCounters>, DataplaneError> {
        let counters: PerCpuArray<&MapData, ClientCounters> =
            self.typed_map(map_names::CLIENT_COUNTERS)?;
        self.slots
            .iter()
            .map(|(address, slot)| Ok((*address, read_slot(&counters, *slot)?)))
            .collect()
    }

    /// Returns the per-interface counters, summed over CPUs, sorted by interface, direction
    /// and kind.
    pub fn interface_counters(&self) -> Result<Vec<InterfaceCounter>, DataplaneError> {
        let map: PerCpuHashMap<&MapData, InterfaceKey, PacketCounter> =
            self.typed_map(map_names::INTERFACE_COUNTERS)?;
        read_interfaces(&map)
    }

    /// Returns the counter slot of every client in the map, as found there.
    pub(super) fn read_slots(
        &self,
    ) -> Result<std::collections::HashMap<Ipv4Addr, u32>, DataplaneError> {
        let clients: BpfHashMap<&MapData, u32, Client> = self.typed_map(map_names::CLIENTS)?;
        read_client_slots(&clients)
    }

    /// Sets every CPU's counters of `slot` to zero.
    pub(super) fn zero_slot(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let cpus = self.cpus;
        let name = map_names::CLIENT_COUNTERS;
        let mut counters: PerCpuArray<&mut MapData, ClientCounters> = self.typed_map_mut(name)?;
        let zeros = PerCpuValues::try_from(vec![ClientCounters::default(); cpus])
            .map_err(|error| map_error(name)(MapError::from(error)))?;
        counters.set(slot, zeros, 0).map_err(map_error(name))
    }
}

/// The counter maps pinned under a directory, opened without loading the programs: for reading
/// counters while another process owns the dataplane.
pub struct PinnedCounters {
    clients: BpfHashMap<MapData, u32, Client>,
    counters: PerCpuArray<MapData, ClientCounters>,
    interfaces: PerCpuHashMap<MapData, InterfaceKey, PacketCounter>,
}

impl PinnedCounters {
    /// Opens the maps pinned under `pin_dir`.
    ///
    /// # Errors
    /// Fails if a map is not pinned there or is not a map of this agent.
    pub fn open(pin_dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            clients: open_pinned(pin_dir, map_names::CLIENTS)?,
            counters: open_pinned(pin_dir, map_names::CLIENT_COUNTERS)?,
            interfaces: open_pinned(pin_dir, map_names::INTERFACE_COUNTERS)?,
        })
    }

    /// Returns every client's counters, summed over CPUs, sorted by address.
    pub fn clients(&self) -> Result<BTreeMap<Ipv4Addr, ClientCounters>, DataplaneError> {
        read_client_slots(&self.clients)?
            .into_iter()
            .map(|(address, slot)| Ok((address, read_slot(&self.counters, slot)?)))
            .collect()
    }

    /// Returns the per-interface counters, summed over CPUs.
    pub fn interface_counters(&self) -> Result<Vec<InterfaceCounter>, DataplaneError> {
        read_interfaces(&self.interfaces)
    }

    /// Returns the kernel's record of client `address`, if it is a client.
    ///
    /// # Errors
    /// Fails if the map cannot be read.
    pub fn client_record(&self, address: Ipv4Addr) -> Result<Option<Client>, DataplaneError> {
        match self.clients.get(&u32::from(address), 0) {
            Ok(client) => Ok(Some(client)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(map_error(map_names::CLIENTS)(source)),
        }
    }
}

fn open_pinned<T>(pin_dir: &Path, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let failed = map_error(name);
    let data = MapData::from_pin(pin_dir.join(name)).map_err(failed)?;
    T::try_from(Map::from_map_data(data).map_err(failed)?).map_err(failed)
}

fn read_client_slots<T: Borrow<MapData>>(
    clients: &BpfHashMap<T, u32, Client>,
) -> Result<std::collections::HashMap<Ipv4Addr, u32>, DataplaneError> {
    clients
        .iter()
        .map(|entry| {
            let (address, client) = entry.map_err(map_error(map_names::CLIENTS))?;
            Ok((Ipv4Addr::from(address), client.slot))
        })
        .collect()
}

fn read_slot<T: Borrow<MapData>>(
    counters: &PerCpuArray<T, ClientCounters>,
    slot: u32,
) -> Result<ClientCounters, DataplaneError> {
    let values = counters.get(&slot, 0).map_err(map_error(map_names::CLIENT_COUNTERS))?;
    let mut total = ClientCounters::default();
    values.iter().for_each(|value| total.merge(value));
    Ok(total)
}

fn read_interfaces<T: Borrow<MapData>>(
    map: &PerCpuHashMap<T, InterfaceKey, PacketCounter>,
) -> Result<Vec<InterfaceCounter>, DataplaneError> {
    let mut counters = Vec::new();
    for entry in map.iter() {
        let (key, values) = entry.map_err(map_error(map_names::INTERFACE_COUNTERS))?;
        let Some(kind) = InterfaceKind::from_u8(key.kind) else {
            continue;
        };
        let direction =
            if key.direction == Direction::Rx as u8 { Direction::Rx } else { Direction::Tx };
        let mut counter = PacketCounter::default();
        values.iter().for_each(|value| counter.merge(value));
        counters.push(InterfaceCounter { ifindex: key.ifindex, direction, kind, counter });
    }
    counters.sort_by_key(|c| (c.ifindex, c.direction as u8, c.kind as u8));
    Ok(counters)
}
