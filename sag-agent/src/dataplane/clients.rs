//! Enforcement settings: clients with their limits and flags, and the instance settings
//! copied into each client's record (blocking, client-to-client, address pools, allowed
//! destinations, tunnel).

use std::net::Ipv4Addr;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use ipnet::Ipv4Net;
use sag_common::{
    counters::ClientCounters,
    map_names,
    policy::{
        Block, Client, RateLimit, Tunnel, CLIENT_BLOCKED, CLIENT_TO_CLIENT, ENFORCE_DESTINATIONS,
        INSTANCE_BLOCKED, MAX_ALLOWED_DESTINATIONS, MAX_POOL_BLOCKS,
    },
    MAX_CLIENTS,
};
use tracing::debug;

use super::{map_error, Dataplane, DataplaneError};

/// Settings the kernel enforces for one client address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientSettings {
    /// Kernel number of the client's instance (see [`Dataplane::set_instance`]); 0 for none,
    /// in which case no destination policy applies.
    pub instance: u32,
    /// Drop all the client's packets (the account is disabled).
    pub blocked: bool,
    /// Limit on traffic from the client.
    pub rx: RateLimit,
    /// Limit on traffic to the client.
    pub tx: RateLimit,
}

/// Settings the kernel enforces for one instance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstanceSettings {
    /// Drop all packets of the instance's clients (the instance is stopped or locked).
    pub blocked: bool,
    /// Let the instance's clients reach each other.
    pub client_to_client: bool,
    /// The instance's client address blocks, at most [`MAX_POOL_BLOCKS`].
    pub pools: Vec<Ipv4Net>,
    /// Destination blocks the instance's clients may send to, at most
    /// [`MAX_ALLOWED_DESTINATIONS`].
    /// Traffic to anything else (and to the pools, unless `client_to_client`) is dropped.
    pub allowed: Vec<Ipv4Net>,
}

impl Dataplane {
    /// Makes `address` a client with `settings` and starts counting its traffic. Counters
    /// that already exist for it, such as ones kept in a pinned map across a restart, are left
    /// as they are, and so is its bucket state.
    ///
    /// # Errors
    /// Fails with [`DataplaneError::InstanceNotFound`] if the client's instance was not set
    /// since load, or [`DataplaneError::ClientsFull`] at [`MAX_CLIENTS`].
    pub fn add_client(
        &mut self,
        address: Ipv4Addr,
        settings: &ClientSettings,
    ) -> Result<(), DataplaneError> {
        self.check_instance(settings.instance)?;
        self.check_in_pools(address, settings.instance)?;
        let slot = match self.slots.get(&address) {
            Some(slot) => *slot,
            None => {
                let slot =
                    *self.free_slots.last().ok_or(DataplaneError::ClientsFull(MAX_CLIENTS))?;
                // A slot that served a removed client starts again from zero.
                self.zero_slot(slot)?;
                slot
            }
        };
        self.write_client(address, slot, settings, false)?;
        if self.slots.insert(address, slot).is_none() {
            self.free_slots.pop();
        }
        debug!(ip = %address, slot, ?settings, "client added");
        Ok(())
    }

    /// Changes the settings of an existing client. The change applies from the next packet on;
    /// counters and bucket state are kept.
    ///
    /// # Errors
    /// Fails with [`DataplaneError::ClientNotFound`] if the address is not a client.
    pub fn update_client(
        &mut self,
        address: Ipv4Addr,
        settings: &ClientSettings,
    ) -> Result<(), DataplaneError> {
        self.check_instance(settings.instance)?;
        self.check_in_pools(address, settings.instance)?;
        let slot = *self.slots.get(&address).ok_or(DataplaneError::ClientNotFound(address))?;
        self.write_client(address, slot, settings, true)?;
        debug!(ip = %address, ?settings, "client updated");
        Ok(())
    }

    /// Stops enforcing and counting `address` and returns its final counters.
    ///
    /// # Errors
    /// Fails with [`DataplaneError::ClientNotFound`] if the address is not a client.
    pub fn remove_client(&mut self, address: Ipv4Addr) -> Result<ClientCounters, DataplaneError> {
        let last = self.client_counters(address)?;
        let name = map_names::CLIENTS;
        let mut clients: BpfHashMap<&mut MapData, u32, Client> = self.typed_map_mut(name)?;
        match clients.remove(&u32::from(address)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(map_error(name)(source)),
        }
        if let Some(slot) = self.slots.remove(&address) {
            self.free_slots.push(slot);
        }
        debug!(ip = %address, "client removed");
        Ok(last)
    }

    /// Returns the settings of `address`, as its record in the kernel has them.
    ///
    /// # Errors
    /// Fails with [`DataplaneError::ClientNotFound`] if the address is not a client.
    pub fn client_settings(&self, address: Ipv4Addr) -> Result<ClientSettings, DataplaneError> {
        let name = map_names::CLIENTS;
        let clients: BpfHashMap<&MapData, u32, Client> = self.typed_map(name)?;
        match clients.get(&u32::from(address), 0) {
            Ok(client) => Ok(ClientSettings {
                instance: client.instance,
                blocked: client.flags & CLIENT_BLOCKED != 0,
                rx: client.rx,
                tx: client.tx,
            }),
            Err(MapError::KeyNotFound) => Err(DataplaneError::ClientNotFound(address)),
            Err(source) => Err(map_error(name)(source)),
        }
    }

    /// Creates or changes instance number `instance` and rewrites the records of its clients,
    /// which see the change from their next packet on. From then on their destinations are
    /// checked against `settings.allowed`.
    ///
    /// # Errors
    /// Fails with [`DataplaneError::InvalidInstance`] for instance 0, or
    /// [`DataplaneError::TooManyBlocks`] if a list is too long.
    pub fn set_instance(
        &mut self,
        instance: u32,
        settings: &InstanceSettings,
    ) -> Result<(), DataplaneError> {
        if instance == 0 {
            return Err(DataplaneError::InvalidInstance);
        }
        check_blocks(settings)?;
        let tunnel = self.instances.get(&instance).map_or(0, |(_, tunnel)| *tunnel);
        self.instances.insert(instance, (settings.clone(), tunnel));
        self.rewrite_instance_clients(instance)?;
        debug!(instance, ?settings, "instance set");
        Ok(())
    }

    /// Forgets instance number `instance` and removes its clients from the kernel.
    ///
    /// # Errors
    /// Fails if the kernel refuses an update.
    pub fn remove_instance(&mut self, instance: u32) -> Result<(), DataplaneError> {
        let name = map_names::CLIENTS;
        let members: Vec<Ipv4Addr> = {
            let clients: BpfHashMap<&MapData, u32, Client> = self.typed_map(name)?;
            let mut members = Vec::new();
            for entry in clients.iter() {
                let (address, client) = entry.map_err(map_error(name))?;
                if client.instance == instance {
                    members.push(Ipv4Addr::from(address));
                }
            }
            members
        };
        for address in members {
            self.remove_client(address)?;
        }
        if let Some((_, tunnel)) = self.instances.remove(&instance) {
            if tunnel != 0 {
                self.unbind_tunnel(tunnel)?;
            }
        }
        debug!(instance, "instance removed");
        Ok(())
    }

    /// Binds the tunnel interface with index `ifindex` to `instance`: packets arriving on it
    /// from an address that is not a client of that instance are dropped as spoofed, and the
    /// instance's clients are accepted only there. An unbound tunnel passes packets from
    /// unknown sources and counts them per interface.
    ///
    /// # Errors
    /// Fails with [`DataplaneError::InstanceNotFound`] if the instance was not set.
    pub fn bind_tunnel(&mut self, ifindex: u32, instance: u32) -> Result<(), DataplaneError> {
        if instance == 0 {
            return Err(DataplaneError::InvalidInstance);
        }
        let previous =
            self.instances.get(&instance).ok_or(DataplaneError::InstanceNotFound(instance))?.1;
        // A tunnel serves one instance: take it from any other, and this instance from any
        // other tunnel.
        let displaced: Vec<u32> = self
            .instances
            .iter()
            .filter(|(other, (_, tunnel))| **other != instance && *tunnel == ifindex)
            .map(|(other, _)| *other)
            .collect();
        if previous != 0 && previous != ifindex {
            self.unbind_tunnel(previous)?;
        }
        for other in displaced {
            if let Some(entry) = self.instances.get_mut(&other) {
                entry.1 = 0;
            }
            self.rewrite_instance_clients(other)?;
        }
        if let Some(entry) = self.instances.get_mut(&instance) {
            entry.1 = ifindex;
        }
        let name = map_names::TUNNELS;
        let mut tunnels: BpfHashMap<&mut MapData, u32, Tunnel> = self.typed_map_mut(name)?;
        tunnels.insert(ifindex, Tunnel { instance }, 0).map_err(map_error(name))?;
        self.rewrite_instance_clients(instance)?;
        debug!(ifindex, instance, "tunnel bound");
        Ok(())
    }

    /// Removes the binding of tunnel `ifindex`, if any.
    ///
    /// # Errors
    /// Fails if the kernel refuses the update.
    pub fn unbind_tunnel(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        let name = map_names::TUNNELS;
        let mut tunnels: BpfHashMap<&mut MapData, u32, Tunnel> = self.typed_map_mut(name)?;
        match tunnels.remove(&ifindex) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(map_error(name)(source)),
        }
        let bound: Vec<u32> = self
            .instances
            .iter_mut()
            .filter(|(_, (_, tunnel))| *tunnel == ifindex)
            .map(|(instance, (_, tunnel))| {
                *tunnel = 0;
                *instance
            })
            .collect();
        for instance in bound {
            self.rewrite_instance_clients(instance)?;
        }
        Ok(())
    }

    /// Fails unless `address` is a usable host of one of the instance's pools (if it has any).
    fn check_in_pools(&self, address: Ipv4Addr, instance: u32) -> Result<(), DataplaneError> {
        let Some((settings, _)) = self.instances.get(&instance) else {
            return Ok(());
        };
        if settings.pools.is_empty()
            || settings.pools.iter().any(|pool| crate::pools::is_usable_host(pool, address))
        {
            return Ok(());
        }
        Err(DataplaneError::ClientOutsidePools { address, instance })
    }

    fn check_instance(&self, instance: u32) -> Result<(), DataplaneError> {
        if instance != 0 && !self.instances.contains_key(&instance) {
            return Err(DataplaneError::InstanceNotFound(instance));
        }
        Ok(())
    }

    /// Rewrites the record of every client of `instance` with the instance's current settings.
    fn rewrite_instance_clients(&mut self, instance: u32) -> Result<(), DataplaneError> {
        let name = map_names::CLIENTS;
        let members: Vec<(Ipv4Addr, u32, ClientSettings)> = {
            let clients: BpfHashMap<&MapData, u32, Client> = self.typed_map(name)?;
            let mut members = Vec::new();
            for entry in clients.iter() {
                let (address, client) = entry.map_err(map_error(name))?;
                if client.instance == instance {
                    let settings = ClientSettings {
                        instance,
                        blocked: client.flags & CLIENT_BLOCKED != 0,
                        rx: client.rx,
                        tx: client.tx,
                    };
                    members.push((Ipv4Addr::from(address), client.slot, settings));
                }
            }
            members
        };
        for (address, slot, settings) in members {
            self.write_client(address, slot, &settings, true)?;
        }
        Ok(())
    }

    /// Writes the record of `address`, keeping the bucket state of a record already there.
    fn write_client(
        &mut self,
        address: Ipv4Addr,
        slot: u32,
        settings: &ClientSettings,
        must_exist: bool,
    ) -> Result<(), DataplaneError> {
        let mut record = Client {
            slot,
            instance: settings.instance,
            flags: if settings.blocked { CLIENT_BLOCKED } else { 0 },
            rx: settings.rx,
            tx: settings.tx,
            ..Client::default()
        };
        if let Some((instance, tunnel)) = self.instances.get(&settings.instance) {
            record.tunnel_ifindex = *tunnel;
            record.flags |= ENFORCE_DESTINATIONS;
            if instance.blocked {
                record.flags |= INSTANCE_BLOCKED;
            }
            if instance.client_to_client {
                record.flags |= CLIENT_TO_CLIENT;
            }
            record.pool_count = fill_blocks(&mut record.pools, &instance.pools);
            record.allowed_count = fill_blocks(&mut record.allowed, &instance.allowed);
        }
        let name = map_names::CLIENTS;
        let key = u32::from(address);
        let mut clients: BpfHashMap<&mut MapData, u32, Client> = self.typed_map_mut(name)?;
        match clients.get(&key, 0) {
            Ok(old) => {
                record.rx_tat_ns = old.rx_tat_ns;
                record.tx_tat_ns = old.tx_tat_ns;
            }
            Err(MapError::KeyNotFound) if must_exist => {
                return Err(DataplaneError::ClientNotFound(address))
            }
            Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(map_error(name)(source)),
        }
        // The kernel swaps in a new element, so a program mid-packet reads the old record or
        // the new one, never a mix.
        clients.insert(key, record, 0).map_err(map_error(name))
    }
}

/// Checks an instance's blocks: within the kernel's limits, written with their network address,
/// no pool of /0, no duplicates, no two pools overlapping, and no allowed destination that
/// overlaps a pool (whose addresses the client-to-client setting decides).
fn check_blocks(settings: &InstanceSettings) -> Result<(), DataplaneError> {
    let invalid = |field, message: String| DataplaneError::InvalidBlocks { field, message };
    for (field, blocks, max) in [
        ("pools", &settings.pools, MAX_POOL_BLOCKS),
        ("allowed destinations", &settings.allowed, MAX_ALLOWED_DESTINATIONS),
    ] {
        if blocks.len() > max {
            return Err(DataplaneError::TooManyBlocks { field, given: blocks.len(), max });
        }
        for (index, block) in blocks.iter().enumerate() {
            if block.addr() != block.network() {
                return Err(invalid(
                    field,
                    format!("{block} has host bits set; write {}", block.trunc()),
                ));
            }
            if blocks[..index].contains(block) {
                return Err(invalid(field, format!("{block} is listed twice")));
            }
        }
    }
    for (index, pool) in settings.pools.iter().enumerate() {
        if pool.prefix_len() == 0 {
            return Err(invalid("pools", format!("{pool} would make every address a client")));
        }
        if let Some(other) =
            settings.pools[..index].iter().find(|other| crate::validation::overlaps(pool, other))
        {
            return Err(invalid("pools", format!("{pool} overlaps {other}")));
        }
        if let Some(allowed) =
            settings.allowed.iter().find(|allowed| crate::validation::overlaps(pool, allowed))
        {
            return Err(invalid(
                "allowed destinations",
                format!("{allowed} overlaps pool {pool}; the client-to-client setting decides traffic inside pools"),
            ));
        }
    }
    Ok(())
}

/// Copies `blocks` into the front of `slots` and returns how many were copied. The callers
/// have checked the length.
fn fill_blocks<const N: usize>(slots: &mut [Block; N], blocks: &[Ipv4Net]) -> u32 {
    for (slot, block) in slots.iter_mut().zip(blocks) {
        *slot = Block::new(u32::from(block.network()), block.prefix_len());
    }
    blocks.len().min(N) as u32
}
