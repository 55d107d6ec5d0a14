//! The kernel side of sag: loads the XDP and TC programs, attaches them to interfaces, and
//! reads and writes their maps.
//!
//! Maps can be pinned under a bpffs directory. A later [`Dataplane::load`] with the same
//! directory reuses the pinned maps, so counters survive an agent restart.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, HashMap},
    fs,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData, MapError, PerCpuHashMap, PerCpuValues},
    programs::{
        links::{FdLink, LinkError},
        tc::SchedClassifierLinkId,
        xdp::XdpLinkId,
        ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use sag_common::{
    counters::{ClientCounters, Direction, InterfaceKey, InterfaceKind, PacketCounter},
    map_names,
    packet::Framing,
    program_names, MAX_CLIENTS, MAX_INTERFACE_COUNTERS,
};
use tracing::{debug, info, warn};

/// `bpf_map_update_elem` flag: create the entry only if it does not exist (uapi `linux/bpf.h`).
const BPF_NOEXIST: u64 = 1;

/// Default bpffs directory for the pinned maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sag";

/// The eBPF object built from sag-ebpf by this crate's build script.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sag"));

/// Errors of the dataplane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("failed to create the pin directory {path}")]
    PinDirectory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to load the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("failed to {action} program {name}")]
    Program {
        action: &'static str,
        name: &'static str,
        source: Box<ProgramError>,
    },
    #[error("failed to {action} program {name} on interface {interface}")]
    Attach {
        action: &'static str,
        name: &'static str,
        interface: String,
        source: Box<ProgramError>,
    },
    #[error("failed to access map {name}")]
    Map {
        name: &'static str,
        source: Box<MapError>,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error(
        "pinned map {name} has {field} {found}, but this agent expects {expected}; \
         it was pinned by another version: remove it from the pin directory to start afresh"
    )]
    IncompatiblePin {
        name: &'static str,
        field: &'static str,
        found: u32,
        expected: u32,
    },
    #[error("interface {0} is already attached")]
    AlreadyAttached(String),
    #[error("interface {0} is not attached")]
    NotAttached(String),
    #[error("client {0} not found in the dataplane")]
    ClientNotFound(Ipv4Addr),
    #[error("failed to count the possible CPUs")]
    Cpus(#[source] std::io::Error),
}

/// One of the kernel programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Program {
    RxL3,
    RxEthernet,
    TxL3,
    TxEthernet,
}

impl Program {
    /// All programs.
    pub const ALL: [Self; 4] = [Self::RxL3, Self::RxEthernet, Self::TxL3, Self::TxEthernet];

    /// Returns the program's name in the eBPF object.
    pub const fn name(self) -> &'static str {
        match self {
            Self::RxL3 => program_names::RX_L3,
            Self::RxEthernet => program_names::RX_ETHERNET,
            Self::TxL3 => program_names::TX_L3,
            Self::TxEthernet => program_names::TX_ETHERNET,
        }
    }

    /// Returns the program that counts `direction` on interfaces with `framing`.
    pub const fn for_interface(direction: Direction, framing: Framing) -> Self {
        match (direction, framing) {
            (Direction::Rx, Framing::L3) => Self::RxL3,
            (Direction::Rx, Framing::Ethernet) => Self::RxEthernet,
            (Direction::Tx, Framing::L3) => Self::TxL3,
            (Direction::Tx, Framing::Ethernet) => Self::TxEthernet,
        }
    }

    const fn is_xdp(self) -> bool {
        matches!(self, Self::RxL3 | Self::RxEthernet)
    }
}

/// Per-interface counter of one direction and kind, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceCounter {
    pub ifindex: u32,
    pub direction: Direction,
    pub kind: InterfaceKind,
    pub counter: PacketCounter,
}

struct Attachment {
    framing: Framing,
    rx: XdpLinkId,
    tx: SchedClassifierLinkId,
}

/// The loaded programs and maps.
pub struct Dataplane {
    ebpf: Ebpf,
    attachments: HashMap<String, Attachment>,
    cpus: usize,
}

impl Dataplane {
    /// Loads and verifies the programs, and creates the maps, or reuses the maps pinned under
    /// `pin_dir`. With no `pin_dir` the maps live only as long as this value.
    ///
    /// # Errors
    /// Fails if the kernel rejects a program or map, or if a pinned map has another layout.
    pub fn load(pin_dir: Option<&Path>) -> Result<Self, DataplaneError> {
        let mut loader = EbpfLoader::new();
        let pins: Vec<(&'static str, PathBuf)> = match pin_dir {
            Some(dir) => {
                fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDirectory {
                    path: dir.to_owned(),
                    source,
                })?;
                [map_names::CLIENT_COUNTERS, map_names::INTERFACE_COUNTERS]
                    .into_iter()
                    .map(|name| (name, dir.join(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|error| DataplaneError::Load(Box::new(error)))?;
        check_layout::<u32, ClientCounters>(&ebpf, map_names::CLIENT_COUNTERS, MAX_CLIENTS)?;
        check_layout::<InterfaceKey, PacketCounter>(
            &ebpf,
            map_names::INTERFACE_COUNTERS,
            MAX_INTERFACE_COUNTERS,
        )?;
        for program in Program::ALL {
            let name = program.name();
            let failed = program_error("load", name);
            let loaded = ebpf
                .program_mut(name)
                .ok_or(failed(ProgramError::NotLoaded))?;
            if program.is_xdp() {
                let xdp: &mut Xdp = loaded.try_into().map_err(failed)?;
                xdp.load().map_err(failed)?;
            } else {
                let classifier: &mut SchedClassifier = loaded.try_into().map_err(failed)?;
                classifier.load().map_err(failed)?;
            }
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, error)| DataplaneError::Cpus(error))?;
        info!(pin_dir = ?pin_dir, cpus, "dataplane loaded");
        Ok(Self {
            ebpf,
            attachments: HashMap::new(),
            cpus,
        })
    }

    /// Attaches the rx program at XDP and the tx program at TC egress of `interface`, an
    /// interface in the calling thread's network namespace.
    ///
    /// # Errors
    /// Fails if the interface does not exist, is already attached, or the kernel refuses.
    pub fn attach(&mut self, interface: &str, framing: Framing) -> Result<(), DataplaneError> {
        if self.attachments.contains_key(interface) {
            return Err(DataplaneError::AlreadyAttached(interface.to_owned()));
        }
        let rx_program = Program::for_interface(Direction::Rx, framing);
        let xdp = self.xdp_mut(rx_program)?;
        // XDP on TUN runs only in generic (skb) mode. On Ethernet the driver mode is faster,
        // and the kernel falls back to generic mode where the driver lacks XDP.
        let mode = match framing {
            Framing::L3 => XdpMode::Skb,
            Framing::Ethernet => XdpMode::Default,
        };
        let rx = xdp
            .attach(interface, mode)
            .or_else(|error| match framing {
                Framing::Ethernet => {
                    debug!(interface, %error, "driver-mode XDP failed, trying generic mode");
                    xdp.attach(interface, XdpMode::Skb)
                }
                Framing::L3 => Err(error),
            })
            .map_err(|source| attach_error("attach", rx_program, interface, source))?;

        let tx_program = Program::for_interface(Direction::Tx, framing);
        let tx = match self
            .classifier_mut(tx_program)?
            .attach(interface, TcAttachType::Egress)
        {
            Ok(tx) => tx,
            Err(source) => {
                // Leave nothing half-attached.
                let _ = self.xdp_mut(rx_program)?.detach(rx);
                return Err(attach_error("attach", tx_program, interface, source));
            }
        };
        self.attachments
            .insert(interface.to_owned(), Attachment { framing, rx, tx });
        info!(interface, ?framing, "programs attached");
        Ok(())
    }

    /// Detaches both programs from `interface`.
    ///
    /// # Errors
    /// Fails if the interface is not attached by this dataplane.
    pub fn detach(&mut self, interface: &str) -> Result<(), DataplaneError> {
        let attachment = self
            .attachments
            .remove(interface)
            .ok_or_else(|| DataplaneError::NotAttached(interface.to_owned()))?;
        let rx_program = Program::for_interface(Direction::Rx, attachment.framing);
        let tx_program = Program::for_interface(Direction::Tx, attachment.framing);
        let rx_link = self
            .xdp_mut(rx_program)?
            .take_link(attachment.rx)
            .map_err(|source| attach_error("detach", rx_program, interface, source))?;
        detach_now(interface, rx_link.try_into());
        let tx_link = self
            .classifier_mut(tx_program)?
            .take_link(attachment.tx)
            .map_err(|source| attach_error("detach", tx_program, interface, source))?;
        detach_now(interface, tx_link.try_into());
        info!(interface, "programs detached");
        Ok(())
    }

    /// Returns the attached interfaces and their framing, sorted by name.
    pub fn attached(&self) -> Vec<(String, Framing)> {
        let mut attached: Vec<_> = self
            .attachments
            .iter()
            .map(|(name, a)| (name.clone(), a.framing))
            .collect();
        attached.sort_by(|a, b| a.0.cmp(&b.0));
        attached
    }

    /// Starts counting traffic of `address`. Counters that already exist for it, such as
    /// ones kept in a pinned map across a restart, are left as they are.
    ///
    /// # Errors
    /// Fails if the map is full ([`MAX_CLIENTS`]) or the kernel refuses the update.
    pub fn add_client(&mut self, address: Ipv4Addr) -> Result<(), DataplaneError> {
        let cpus = self.cpus;
        let mut map = self.client_map_mut()?;
        let failed = map_error(map_names::CLIENT_COUNTERS);
        match map.get(&u32::from(address), 0) {
            Ok(_) => return Ok(()),
            Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(failed(source)),
        }
        let zeros = PerCpuValues::try_from(vec![ClientCounters::default(); cpus])
            .map_err(|error| failed(MapError::from(error)))?;
        // NOEXIST: if another agent added the client meanwhile, its counters stay.
        match map.insert(u32::from(address), zeros, BPF_NOEXIST) {
            Ok(()) => {}
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(source) => return Err(failed(source)),
        }
        debug!(ip = %address, "client added");
        Ok(())
    }

    /// Stops counting `address` and returns its final counters.
    ///
    /// # Errors
    /// Fails with [`DataplaneError::ClientNotFound`] if the address is not a client.
    pub fn remove_client(&mut self, address: Ipv4Addr) -> Result<ClientCounters, DataplaneError> {
        let last = self.client_counters(address)?;
        let mut map = self.client_map_mut()?;
        match map.remove(&u32::from(address)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(map_error(map_names::CLIENT_COUNTERS)(source)),
        }
        debug!(ip = %address, "client removed");
        Ok(last)
    }

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

    /// Runs `program` once on `frame` through `BPF_PROG_TEST_RUN` and returns its verdict and
    /// run time in nanoseconds. The counters it touches are the live maps'.
    ///
    /// # Errors
    /// Fails if the kernel rejects the run.
    pub fn test_run(&self, program: Program, frame: &[u8]) -> Result<(u32, u64), DataplaneError> {
        self.test_run_repeated(program, frame, 1)
    }

    /// Runs `program` on `frame` `repeat` times and returns the last verdict and the mean run
    /// time per packet in nanoseconds, as the kernel measured it.
    ///
    /// # Errors
    /// Fails if the kernel rejects the run.
    pub fn test_run_repeated(
        &self,
        program: Program,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, u64), DataplaneError> {
        let name = program.name();
        let failed = program_error("test-run", name);
        let loaded = self
            .ebpf
            .program(name)
            .ok_or(failed(ProgramError::NotLoaded))?;
        let mut options = TestRunOptions::new();
        options.data_in = Some(frame);
        options.repeat = repeat;
        let result = if program.is_xdp() {
            let xdp: &Xdp = loaded.try_into().map_err(failed)?;
            xdp.test_run(options)
        } else {
            let classifier: &SchedClassifier = loaded.try_into().map_err(failed)?;
            classifier.test_run(options)
        }
        .map_err(failed)?;
        Ok((result.return_value, result.duration.as_nanos() as u64))
    }

    fn client_map(&self) -> Result<PerCpuHashMap<&MapData, u32, ClientCounters>, DataplaneError> {
        let name = map_names::CLIENT_COUNTERS;
        self.ebpf
            .map(name)
            .ok_or(DataplaneError::MissingMap(name))?
            .try_into()
            .map_err(map_error(name))
    }

    fn client_map_mut(
        &mut self,
    ) -> Result<PerCpuHashMap<&mut MapData, u32, ClientCounters>, DataplaneError> {
        let name = map_names::CLIENT_COUNTERS;
        self.ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))?
            .try_into()
            .map_err(map_error(name))
    }

    fn xdp_mut(&mut self, program: Program) -> Result<&mut Xdp, DataplaneError> {
        let name = program.name();
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| program_error("find", name)(ProgramError::NotLoaded))?
            .try_into()
            .map_err(program_error("find", name))
    }

    fn classifier_mut(&mut self, program: Program) -> Result<&mut SchedClassifier, DataplaneError> {
        let name = program.name();
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| program_error("find", name)(ProgramError::NotLoaded))?
            .try_into()
            .map_err(program_error("find", name))
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

/// `bpf(2)` command numbers from uapi `linux/bpf.h`.
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Takes a link off its hook before returning.
///
/// Closing the last file descriptor of a bpf_link releases it from a kernel work queue, so the
/// program can still run for a moment after the close. `BPF_LINK_DETACH` is synchronous. A
/// link that is not a bpf_link (netlink-attached XDP on old kernels) was detached synchronously
/// when the conversion dropped it.
fn detach_now(interface: &str, link: Result<FdLink, LinkError>) {
    let Ok(link) = link else {
        return;
    };
    let result = link
        .info()
        .map_err(|error| std::io::Error::other(error.to_string()))
        .and_then(|info| detach_link_by_id(info.id()));
    if let Err(error) = result {
        // Dropping the link below still detaches it, only not at once.
        warn!(interface, %error, "BPF_LINK_DETACH failed, closing the link instead");
    }
}

fn detach_link_by_id(id: u32) -> std::io::Result<()> {
    // The leading fields of `union bpf_attr` for these two commands.
    #[repr(C)]
    struct GetFdById {
        link_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }

    let request = GetFdById {
        link_id: id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: the attribute struct is valid for the size passed, and the kernel accepts a
    // shorter bpf_attr as long as the fields it reads are present.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_GET_FD_BY_ID,
            &request as *const GetFdById,
            size_of::<GetFdById>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let request = LinkDetach {
        link_fd: fd.as_raw_fd() as u32,
    };
    // SAFETY: as above.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            &request as *const LinkDetach,
            size_of::<LinkDetach>(),
        )
    };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> DataplaneError + Copy {
    move |source| DataplaneError::Map {
        name,
        source: Box::new(source),
    }
}

fn program_error(
    action: &'static str,
    name: &'static str,
) -> impl Fn(ProgramError) -> DataplaneError + Copy {
    move |source| DataplaneError::Program {
        action,
        name,
        source: Box::new(source),
    }
}

fn attach_error(
    action: &'static str,
    program: Program,
    interface: &str,
    source: ProgramError,
) -> DataplaneError {
    DataplaneError::Attach {
        action,
        name: program.name(),
        interface: interface.to_owned(),
        source: Box::new(source),
    }
}

fn sum_client(values: &PerCpuValues<ClientCounters>) -> ClientCounters {
    let mut total = ClientCounters::default();
    values.iter().for_each(|value| total.merge(value));
    total
}

/// Checks that a map, possibly reused from a pin, has the key, value and size this agent
/// was built with. The kernel does not check this when a pinned map is reused.
fn check_layout<K, V>(
    ebpf: &Ebpf,
    name: &'static str,
    max_entries: u32,
) -> Result<(), DataplaneError> {
    let map = ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
    let Map::PerCpuHashMap(data) = map else {
        return Err(map_error(name)(MapError::InvalidMapType { map_type: 0 }));
    };
    let info = data.info().map_err(map_error(name))?;
    let expected = [
        ("key size", info.key_size(), size_of::<K>() as u32),
        ("value size", info.value_size(), size_of::<V>() as u32),
        ("max entries", info.max_entries(), max_entries),
    ];
    for (field, found, expected) in expected {
        if found != expected {
            return Err(DataplaneError::IncompatiblePin {
                name,
                field,
                found,
                expected,
            });
        }
    }
    Ok(())
}
