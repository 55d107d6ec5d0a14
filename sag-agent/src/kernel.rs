//! Kernel maps kept in step with the store: instance settings, and the accounts whose address
//! is known. For now those are the static addresses; connected clients join with the tunnels.

use std::{net::Ipv4Addr, path::Path, sync::Mutex};

use sag_common::policy::RateLimit;
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

    /// Writes an account's settings under its static address, after removing the address it
    /// had before (`previous`) if that changed.
    ///
    /// # Errors
    /// Fails if the dataplane rejects the client.
    pub fn apply_account(
        &self,
        instance: &Instance,
        account: &Account,
        previous: Option<Ipv4Addr>,
    ) -> Result<(), KernelError> {
        let mut dataplane = self.dataplane();
        if let Some(old) = previous.filter(|old| Some(*old) != account.static_ip) {
            match dataplane.remove_client(old) {
                Ok(_) | Err(DataplaneError::ClientNotFound(_)) => {}
                Err(error) => return Err(error.into()),
            }
        }
        if let Some(address) = account.static_ip {
            dataplane.add_client(address, &client_settings(instance, account))?;
        }
        Ok(())
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

    /// Makes the kernel's clients exactly the store's accounts with a static address, with
    /// their instances' settings: at start, after an earlier run may have left the maps
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
            for account in admin.list_accounts(&instance.id).await? {
                if let Some(address) = account.static_ip {
                    self.apply_account(instance, &account, None)?;
                    expected.insert(address);
                }
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
