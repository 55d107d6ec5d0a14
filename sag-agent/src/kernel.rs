//! Kernel maps kept in step with the store: instance settings, the tunnels of the instances,
//! and the clients: accounts with a static address, and the address of every session.

use std::{collections::HashMap, net::Ipv4Addr, path::Path, sync::Mutex};

use sag_common::{counters::ClientCounters, packet::Framing, policy::RateLimit};
use tracing::info;

use crate::{
    admin::{Account, Admin, AdminError, Instance, Network, STATE_RUNNING},
    dataplane::{ClientSettings, Dataplane, DataplaneError, InstanceSettings, InterfaceCounter},
};

/// Errors of bringing the kernel in step.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Admin(#[from] AdminError),
}

/// The daemon's dataplane, behind a lock: map updates take microseconds.
pub struct KernelSync {
    dataplane: Mutex<Dataplane>,
    /// The account of each client address, and the final counters of addresses that were
    /// removed, per account, so that an account's totals never go back within a run.
    owners: Mutex<Owners>,
}

/// An account: instance ID and username.
pub type AccountKey = (String, String);

#[derive(Default)]
struct Owners {
    by_address: HashMap<Ipv4Addr, AccountKey>,
    retired: HashMap<AccountKey, ClientCounters>,
}

/// The traffic of one account since the agent started: the counters of its current addresses,
/// plus the final counters of addresses it had before in this run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountUsage {
    pub instance_id: String,
    pub username: String,
    pub counters: ClientCounters,
}

/// Returns the kernel settings of an account of `instance`: its instance number, blocked
/// unless enabled, and its bandwidth each way with the default burst.
pub fn client_settings(instance: &Instance, account: &Account) -> ClientSettings {
    let limit = RateLimit::with_default_burst(account.bandwidth_kbps);
    ClientSettings {
        instance: instance.kernel_number,
        blocked: !account.enabled,
        rx: limit,
        tx: limit,
    }
}

/// Returns the kernel settings of an instance: blocked unless running, and its blocks.
pub fn instance_settings(instance: &Instance, network: &Network) -> InstanceSettings {
    InstanceSettings {
        blocked: instance.state != STATE_RUNNING,
        client_to_client: network.client_to_client,
        pools: network.cidr_blocks.clone(),
        allowed: network.allowed_destinations.clone(),
    }
}

impl KernelSync {
    /// Loads the programs with the maps pinned under `pin_dir`.
    ///
    /// # Errors
    /// Fails if the programs cannot be loaded.
    pub fn load(pin_dir: &Path) -> Result<Self, KernelError> {
        Ok(Self {
            dataplane: Mutex::new(Dataplane::load(Some(pin_dir))?),
            owners: Mutex::new(Owners::default()),
        })
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, Owners> {
        self.owners.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Removes `address` from the dataplane and keeps its final counters with its account.
    fn remove_and_retire(
        &self,
        dataplane: &mut Dataplane,
        address: Ipv4Addr,
    ) -> Result<(), DataplaneError> {
        let last = match dataplane.remove_client(address) {
            Ok(last) => last,
            Err(DataplaneError::ClientNotFound(_)) => return Ok(()),
            Err(error) => return Err(error),
        };
        let mut owners = self.owners();
        if let Some(owner) = owners.by_address.remove(&address) {
            owners.retired.entry(owner).or_default().merge(&last);
        }
        Ok(())
    }

    /// Returns the traffic of every account that had an address in this run, sorted by
    /// instance and username.
    ///
    /// # Errors
    /// Fails if the counters cannot be read.
    pub fn account_usage(&self) -> Result<Vec<AccountUsage>, KernelError> {
        let live = self.dataplane().clients()?;
        let owners = self.owners();
        let mut usage: std::collections::BTreeMap<AccountKey, ClientCounters> =
            owners.retired.iter().map(|(key, counters)| (key.clone(), *counters)).collect();
        for (address, counters) in &live {
            if let Some(owner) = owners.by_address.get(address) {
                usage.entry(owner.clone()).or_default().merge(counters);
            }
        }
        Ok(usage
            .into_iter()
            .map(|((instance_id, username), counters)| AccountUsage {
                instance_id,
                username,
                counters,
            })
            .collect())
    }

    /// Returns the per-interface counters (traffic of no client, and spoofed packets).
    ///
    /// # Errors
    /// Fails if the map cannot be read.
    pub fn interface_counters(&self) -> Result<Vec<InterfaceCounter>, KernelError> {
        Ok(self.dataplane().interface_counters()?)
    }

    /// Returns the number of client records and the capacity of the clients map.
    pub fn client_fill(&self) -> (usize, usize) {
        (self.dataplane().client_addresses().len(), sag_common::MAX_CLIENTS as usize)
    }

    /// Returns the number of interfaces the programs are attached to.
    pub fn attached_interfaces(&self) -> usize {
        self.dataplane().attached().len()
    }

    fn dataplane(&self) -> std::sync::MutexGuard<'_, Dataplane> {
        self.dataplane.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes an instance's settings; its clients follow from their next packet.
    ///
    /// # Errors
    /// Fails if the dataplane rejects the settings.
    pub fn apply_instance(
        &self,
        instance: &Instance,
        network: &Network,
    ) -> Result<(), KernelError> {
        let settings = instance_settings(instance, network);
        self.dataplane().set_instance(instance.kernel_number, &settings)?;
        Ok(())
    }

    /// Removes an instance and its clients.
    ///
    /// # Errors
    /// Fails if the kernel refuses an update.
    pub fn remove_instance(&self, instance: &Instance) -> Result<(), KernelError> {
        self.dataplane().remove_instance(instance.kernel_number)?;
        let mut owners = self.owners();
        owners.by_address.retain(|_, (instance_id, _)| *instance_id != instance.id);
        owners.retired.retain(|(instance_id, _), _| *instance_id != instance.id);
        Ok(())
    }

    /// Writes an account's settings under its static address and under the address of its
    /// session (`session`), after removing the static address it had before (`previous`) if
    /// that is neither any more.
    ///
    /// # Errors
    /// Fails if the dataplane rejects the client.
    pub fn apply_account(
        &self,
        instance: &Instance,
        account: &Account,
        previous: Option<Ipv4Addr>,
        session: Option<Ipv4Addr>,
    ) -> Result<(), KernelError> {
        let mut dataplane = self.dataplane();
        if let Some(old) =
            previous.filter(|old| Some(*old) != account.static_ip && Some(*old) != session)
        {
            self.remove_and_retire(&mut dataplane, old)?;
        }
        let settings = client_settings(instance, account);
        let owner = (instance.id.clone(), account.username.clone());
        for address in account.static_ip.into_iter().chain(session) {
            dataplane.add_client(address, &settings)?;
            self.owners().by_address.insert(address, owner.clone());
        }
        Ok(())
    }

    /// Removes one client address, if it is a client.
    ///
    /// # Errors
    /// Fails if the kernel refuses the update.
    pub fn remove_client(&self, address: Ipv4Addr) -> Result<(), KernelError> {
        Ok(self.remove_and_retire(&mut self.dataplane(), address)?)
    }

    /// Attaches the programs to an instance's tunnel device `name` (a TUN: packets start at
    /// the IP header) and binds it to the instance, so that packets from it are checked
    /// against the instance's client addresses.
    ///
    /// # Errors
    /// Fails if the programs cannot be attached or the instance was not applied first.
    pub fn attach_tunnel(
        &self,
        name: &str,
        ifindex: u32,
        instance: &Instance,
    ) -> Result<(), KernelError> {
        let mut dataplane = self.dataplane();
        dataplane.attach(name, Framing::L3)?;
        if let Err(error) = dataplane.bind_tunnel(ifindex, instance.kernel_number) {
            let _ = dataplane.detach(name);
            return Err(error.into());
        }
        Ok(())
    }

    /// Unbinds and detaches an instance's tunnel device.
    ///
    /// # Errors
    /// Fails if the kernel refuses the update.
    pub fn detach_tunnel(&self, name: &str, ifindex: u32) -> Result<(), KernelError> {
        let mut dataplane = self.dataplane();
        dataplane.unbind_tunnel(ifindex)?;
        match dataplane.detach(name) {
            Ok(()) | Err(DataplaneError::NotAttached(_)) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Returns the counters of one client address.
    ///
    /// # Errors
    /// Fails if the address is not a client.
    pub fn client_counters(
        &self,
        address: Ipv4Addr,
    ) -> Result<sag_common::counters::ClientCounters, KernelError> {
        Ok(self.dataplane().client_counters(address)?)
    }

    /// Removes an account's static address from the kernel, if it has one.
    ///
    /// # Errors
    /// Fails if the kernel refuses the update.
    pub fn remove_account(&self, account: &Account) -> Result<(), KernelError> {
        if let Some(address) = account.static_ip {
            self.remove_and_retire(&mut self.dataplane(), address)?;
        }
        let key = (account.instance_id.clone(), account.username.clone());
        self.owners().retired.remove(&key);
        Ok(())
    }

    /// Makes the kernel's clients exactly the store's static addresses and the addresses of the
    /// stored sessions, with their instances' settings. Run at start: an earlier run may have
    /// left the maps otherwise (a crash between a commit and its kernel update). Counters of
    /// clients that stay are kept.
    ///
    /// # Errors
    /// Fails on the first instance or account the dataplane rejects.
    pub async fn apply_all(&self, admin: &Admin) -> Result<(), KernelError> {
        let instances = admin.list_instances().await?;
        let mut expected = std::collections::HashSet::new();
        for instance in &instances {
            let network = admin.network(&instance.id).await?;
            self.apply_instance(instance, &network)?;
            let sessions = admin.session_addresses(&instance.id).await?;
            for account in admin.list_accounts(&instance.id).await? {
                let session = sessions.get(&account.username).copied();
                self.apply_account(instance, &account, None, session)?;
                expected.extend(account.static_ip.into_iter().chain(session));
            }
        }
        let mut dataplane = self.dataplane();
        let stale: Vec<Ipv4Addr> = dataplane
            .client_addresses()
            .into_iter()
            .filter(|address| !expected.contains(address))
            .collect();
        for address in &stale {
            dataplane.remove_client(*address)?;
        }
        info!(
            instances = instances.len(),
            clients = expected.len(),
            removed = stale.len(),
            "kernel maps in step with the store"
        );
        Ok(())
    }
}
