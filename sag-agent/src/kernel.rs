//! Kernel maps kept in step with the store: instance settings, the tunnels of the instances,
//! and the clients: accounts with a static address, and the address of every session.

use std::{net::Ipv4Addr, path::Path, sync::Mutex};

use sag_common::{packet::Framing, policy::RateLimit};
use tracing::info;

use crate::{
    admin::{Account, Admin, AdminError, Instance, Network, STATE_RUNNING},
    dataplane::{ClientSettings, Dataplane, DataplaneError, InstanceSettings},
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
        Ok(Self { dataplane: Mutex::new(Dataplane::load(Some(pin_dir))?) })
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
            match dataplane.remove_client(old) {
                Ok(_) | Err(DataplaneError::ClientNotFound(_)) => {}
                Err(error) => return Err(error.into()),
            }
        }
        let settings = client_settings(instance, account);
        for address in account.static_ip.into_iter().chain(session) {
            dataplane.add_client(address, &settings)?;
        }
        Ok(())
    }

    /// Removes one client address, if it is a client.
    ///
    /// # Errors
    /// Fails if the kernel refuses the update.
    pub fn remove_client(&self, address: Ipv4Addr) -> Result<(), KernelError> {
        match self.dataplane().remove_client(address) {
            Ok(_) | Err(DataplaneError::ClientNotFound(_)) => Ok(()),
            Err(error) => Err(error.into()),
        }
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
            match self.dataplane().remove_client(address) {
                Ok(_) | Err(DataplaneError::ClientNotFound(_)) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// Makes the kernel's clients exactly the store's accounts with a static address and the
    /// addresses of the stored sessions, with their instances' settings: at start, after an earlier run may have left the maps
    /// otherwise (a crash between a commit and its kernel update). Counters of clients that
    /// stay are kept.
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
