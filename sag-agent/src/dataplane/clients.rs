//! What the kernel enforces: clients with their limits and flags, instances, the tunnels bound
//! to them, and each instance's allowed destinations.

use std::net::Ipv4Addr;

use aya::maps::{lpm_trie::Key, HashMap, LpmTrie, MapData, MapError, PerCpuValues};
use ipnet::Ipv4Net;
use sag_common::{
    counters::ClientCounters,
    map_names,
    policy::{
        Client, DestinationKey, Instance, RateLimit, Tunnel, CLIENT_BLOCKED, INSTANCE_BLOCKED,
        INSTANCE_CLIENT_TO_CLIENT,
    },
};
use tracing::debug;

use super::{map_error, Dataplane, DataplaneError, BPF_NOEXIST};

/// What the kernel enforces for one client address.
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

/// What the kernel enforces for one instance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstanceSettings {
    /// Drop all packets of the instance's clients (the instance is stopped or locked).
    pub blocked: bool,
    /// Let the instance's clients reach each other.
    pub client_to_client: bool,
}

impl Dataplane {
    /// Makes `address` a client with `settings` and starts counting its traffic. Counters
    /// that already exist for it, such as ones kept in a pinned map across a restart, are left
    /// as they are; so is its bucket state if it was already a client.
    ///
    /// # Errors
    /// Fails if a map is full ([`sag_common::MAX_CLIENTS`]) or the kernel refuses the update.
    pub fn add_client(
        &mut self,
        address: Ipv4Addr,
        settings: &ClientSettings,
    ) -> Result<(), DataplaneError> {
        let cpus = self.cpus;
        {
            let mut map = self.client_map_mut()?;
            let failed = map_error(map_names::CLIENT_COUNTERS);
            let zeros = PerCpuValues::try_from(vec![ClientCounters::default(); cpus])
                .map_err(|error| failed(MapError::from(error)))?;
            // NOEXIST keeps counters that are already there.
            match map.insert(u32::from(address), zeros, BPF_NOEXIST) {
                Ok(()) => {}
                Err(MapError::SyscallError(error))
                    if error.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(source) => return Err(failed(source)),
            }
        }
        self.write_client(address, settings, false)?;
        debug!(ip = %address, ?settings, "client added");
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
        self.write_client(address, settings, true)?;
        debug!(ip = %address, ?settings, "client updated");
        Ok(())
    }

    /// Stops enforcing and counting `address` and returns its final counters.
    ///
    /// # Errors
    /// Fails with [`DataplaneError::ClientNotFound`] if the address is not a client.
    pub fn remove_client(&mut self, address: Ipv4Addr) -> Result<ClientCounters, DataplaneError> {
        let last = self.client_counters(address)?;
        let key = u32::from(address);
        let mut clients = self.clients_map_mut()?;
        match clients.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(map_error(map_names::CLIENTS)(source)),
        }
        let mut counters = self.client_map_mut()?;
        match counters.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(map_error(map_names::CLIENT_COUNTERS)(source)),
        }
        debug!(ip = %address, "client removed");
        Ok(last)
    }

    /// Returns the settings of `address`.
    ///
    /// # Errors
    /// Fails with [`DataplaneError::ClientNotFound`] if the address is not a client.
    pub fn client_settings(&self, address: Ipv4Addr) -> Result<ClientSettings, DataplaneError> {
        let name = map_names::CLIENTS;
        let map: HashMap<&MapData, u32, Client> = self.typed_map(name)?;
        match map.get(&u32::from(address), 0) {
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

    /// Creates or changes instance number `instance`. From then on its clients' destinations
    /// are checked against its allowed destinations.
    ///
    /// # Errors
    /// Fails with [`DataplaneError::InvalidInstance`] for instance 0, or if the map is full
    /// ([`sag_common::MAX_INSTANCES`]).
    pub fn set_instance(
        &mut self,
        instance: u32,
        settings: &InstanceSettings,
    ) -> Result<(), DataplaneError> {
        if instance == 0 {
            return Err(DataplaneError::InvalidInstance);
        }
        let mut flags = 0;
        if settings.blocked {
            flags |= INSTANCE_BLOCKED;
        }
        if settings.client_to_client {
            flags |= INSTANCE_CLIENT_TO_CLIENT;
        }
        let name = map_names::INSTANCES;
        let mut map: HashMap<&mut MapData, u32, Instance> = self.typed_map_mut(name)?;
        map.insert(instance, Instance { flags, padding: 0 }, 0)
            .map_err(map_error(name))?;
        debug!(instance, ?settings, "instance set");
        Ok(())
    }

    /// Removes instance number `instance`. Its clients are then under no destination policy
    /// and no instance-wide block.
    ///
    /// # Errors
    /// Fails if the kernel refuses the update.
    pub fn remove_instance(&mut self, instance: u32) -> Result<(), DataplaneError> {
        let name = map_names::INSTANCES;
        let mut map: HashMap<&mut MapData, u32, Instance> = self.typed_map_mut(name)?;
        match map.remove(&instance) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(map_error(name)(source)),
        }
    }

    /// Binds the tunnel interface with index `ifindex` to `instance`: a packet arriving on it
    /// from an address that is not a client of that instance is dropped as spoofed. An
    /// unbound tunnel passes such packets and counts them as unknown.
    ///
    /// # Errors
    /// Fails with [`DataplaneError::InvalidInstance`] for instance 0.
    pub fn bind_tunnel(&mut self, ifindex: u32, instance: u32) -> Result<(), DataplaneError> {
        if instance == 0 {
            return Err(DataplaneError::InvalidInstance);
        }
        let name = map_names::TUNNELS;
        let mut map: HashMap<&mut MapData, u32, Tunnel> = self.typed_map_mut(name)?;
        map.insert(ifindex, Tunnel { instance }, 0)
            .map_err(map_error(name))?;
        debug!(ifindex, instance, "tunnel bound");
        Ok(())
    }

    /// Removes the binding of tunnel `ifindex`, if any.
    ///
    /// # Errors
    /// Fails if the kernel refuses the update.
    pub fn unbind_tunnel(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        let name = map_names::TUNNELS;
        let mut map: HashMap<&mut MapData, u32, Tunnel> = self.typed_map_mut(name)?;
        match map.remove(&ifindex) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(map_error(name)(source)),
        }
    }

    /// Lets clients of `instance` send to `block`.
    ///
    /// # Errors
    /// Fails if the trie is full ([`sag_common::MAX_DESTINATIONS`]).
    pub fn allow_destination(
        &mut self,
        instance: u32,
        block: Ipv4Net,
    ) -> Result<(), DataplaneError> {
        let name = map_names::DESTINATIONS;
        let mut trie: LpmTrie<&mut MapData, DestinationKey, u8> = self.typed_map_mut(name)?;
        trie.insert(&destination_key(instance, block), 1, 0)
            .map_err(map_error(name))?;
        debug!(instance, %block, "destination allowed");
        Ok(())
    }

    /// Withdraws `block` from the allowed destinations of `instance`, if it is there.
    ///
    /// # Errors
    /// Fails if the kernel refuses the update.
    pub fn remove_destination(
        &mut self,
        instance: u32,
        block: Ipv4Net,
    ) -> Result<(), DataplaneError> {
        let name = map_names::DESTINATIONS;
        let mut trie: LpmTrie<&mut MapData, DestinationKey, u8> = self.typed_map_mut(name)?;
        match trie.remove(&destination_key(instance, block)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(map_error(name)(source)),
        }
    }

    /// Writes the record of `address`, keeping the bucket state of a record already there.
    fn write_client(
        &mut self,
        address: Ipv4Addr,
        settings: &ClientSettings,
        must_exist: bool,
    ) -> Result<(), DataplaneError> {
        let name = map_names::CLIENTS;
        let key = u32::from(address);
        let mut map: HashMap<&mut MapData, u32, Client> = self.typed_map_mut(name)?;
        let (rx_tat_ns, tx_tat_ns) = match map.get(&key, 0) {
            Ok(old) => (old.rx_tat_ns, old.tx_tat_ns),
            Err(MapError::KeyNotFound) if must_exist => {
                return Err(DataplaneError::ClientNotFound(address))
            }
            Err(MapError::KeyNotFound) => (0, 0),
            Err(source) => return Err(map_error(name)(source)),
        };
        let record = Client {
            instance: settings.instance,
            flags: if settings.blocked { CLIENT_BLOCKED } else { 0 },
            rx: settings.rx,
            tx: settings.tx,
            rx_tat_ns,
            tx_tat_ns,
        };
        // The kernel swaps in a new element, so a program mid-packet sees the old record or
        // the new one, never a mix.
        map.insert(key, record, 0).map_err(map_error(name))
    }

    fn clients_map_mut(&mut self) -> Result<HashMap<&mut MapData, u32, Client>, DataplaneError> {
        self.typed_map_mut(map_names::CLIENTS)
    }
}

fn destination_key(instance: u32, block: Ipv4Net) -> Key<DestinationKey> {
    let block = block.trunc();
    Key::new(
        DestinationKey::INSTANCE_BITS + u32::from(block.prefix_len()),
        DestinationKey::new(instance, u32::from(block.network())),
    )
}
