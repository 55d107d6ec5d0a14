//! The kernel side of sag: loads the XDP and TC programs, attaches them to interfaces, and
//! reads and writes their maps.
//!
//! Maps can be pinned under a bpffs directory. A later [`Dataplane::load`] with the same
//! directory reuses the pinned maps, so counters and enforcement state survive an agent
//! restart.

mod clients;
mod counters;
mod links;

use std::{
    collections::HashMap,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapError},
    programs::{
        tc::SchedClassifierLinkId, xdp::XdpLinkId, ProgramError, SchedClassifier, TcAttachType,
        TestRun, TestRunOptions, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use sag_common::{
    counters::{ClientCounters, InterfaceKey, PacketCounter},
    map_names,
    packet::Framing,
    policy::{Client, Tunnel},
    program_names, MAX_CLIENTS, MAX_INTERFACE_COUNTERS, MAX_TUNNELS,
};
use tracing::{debug, info};

use self::links::detach_now;
pub use self::{
    clients::{ClientSettings, InstanceSettings},
    counters::{InterfaceCounter, PinnedCounters},
};

/// Default bpffs directory for the pinned maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sag";

/// The eBPF object built from sag-ebpf by this crate's build script.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sag"));

/// Errors of the dataplane.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "pin directory {0} is not on a bpffs mount; mount one with \
         `mount -t bpf bpf /sys/fs/bpf` or choose a directory under it"
    )]
    PinDirectoryNotBpf(PathBuf),
    #[error("failed to create the pin directory {path}")]
    PinDirectory { path: PathBuf, source: std::io::Error },
    #[error("failed to load the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("failed to {action} program {name}")]
    Program { action: &'static str, name: &'static str, source: Box<ProgramError> },
    #[error("failed to {action} program {name} on interface {interface:?}")]
    Attach {
        action: &'static str,
        name: &'static str,
        interface: String,
        source: Box<ProgramError>,
    },
    #[error("failed to access map {name}")]
    Map { name: &'static str, source: Box<MapError> },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {0} has another type than this agent expects")]
    UnexpectedMapType(&'static str),
    #[error(
        "pinned map {name} has {field} {found}, but this agent expects {expected}; \
         it was pinned by another version: remove it from the pin directory to start afresh"
    )]
    IncompatiblePin { name: &'static str, field: &'static str, found: u32, expected: u32 },
    #[error("interface {0:?} is already attached")]
    AlreadyAttached(String),
    #[error(
        "interface {0:?} already has sag's programs attached by another process; stop that \
         agent first"
    )]
    AttachedElsewhere(String),
    #[error("interface {interface:?} not found: {source}")]
    InterfaceNotFound { interface: String, source: std::io::Error },
    #[error(
        "interface {interface:?} has link type {link_type}, which sag does not support; its \
         frames must start with an Ethernet or an IP header"
    )]
    UnsupportedLink { interface: String, link_type: u16 },
    #[error(
        "interface {interface:?} carries {actual:?} frames (link type {link_type}), not \
         {requested:?}: attach it with {actual:?} framing"
    )]
    FramingMismatch { interface: String, requested: Framing, actual: Framing, link_type: u16 },
    #[error("interface {0:?} is not attached")]
    NotAttached(String),
    #[error("client {0} not found in the dataplane")]
    ClientNotFound(Ipv4Addr),
    #[error("invalid instance number 0: kernel instance numbers start at 1")]
    InvalidInstance,
    #[error("instance {0} not found in the dataplane: set it before adding its clients")]
    InstanceNotFound(u32),
    #[error("invalid {field}: {given} blocks given, at most {max} allowed")]
    TooManyBlocks { field: &'static str, given: usize, max: usize },
    #[error("invalid {field}: {message}")]
    InvalidBlocks { field: &'static str, message: String },
    #[error("invalid client {address}: not a usable host address of instance {instance}'s pools")]
    ClientOutsidePools { address: Ipv4Addr, instance: u32 },
    #[error("no free counter slot: the dataplane already has {0} clients")]
    ClientsFull(u32),
    #[error("failed to count the possible CPUs")]
    Cpus(#[source] std::io::Error),
}

/// One of the kernel programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Program {
    /// XDP, traffic from clients on a layer-3 device.
    RxL3,
    /// XDP, traffic from clients on an Ethernet device.
    RxEthernet,
    /// TC ingress, traffic from clients on a layer-3 device.
    RxL3Tc,
    /// TC ingress, traffic from clients on an Ethernet device.
    RxEthernetTc,
    /// TC egress, traffic to clients on a layer-3 device.
    TxL3,
    /// TC egress, traffic to clients on an Ethernet device.
    TxEthernet,
}

impl Program {
    /// All programs.
    pub const ALL: [Self; 6] = [
        Self::RxL3,
        Self::RxEthernet,
        Self::RxL3Tc,
        Self::RxEthernetTc,
        Self::TxL3,
        Self::TxEthernet,
    ];

    /// Returns the program's name in the eBPF object.
    pub const fn name(self) -> &'static str {
        match self {
            Self::RxL3 => program_names::RX_L3,
            Self::RxEthernet => program_names::RX_ETHERNET,
            Self::RxL3Tc => program_names::RX_L3_TC,
            Self::RxEthernetTc => program_names::RX_ETHERNET_TC,
            Self::TxL3 => program_names::TX_L3,
            Self::TxEthernet => program_names::TX_ETHERNET,
        }
    }

    /// Returns the program for traffic from clients at `hook` on devices with `framing`.
    pub const fn rx(framing: Framing, hook: RxHook) -> Self {
        match (framing, hook) {
            (Framing::L3, RxHook::Xdp) => Self::RxL3,
            (Framing::Ethernet, RxHook::Xdp) => Self::RxEthernet,
            (Framing::L3, RxHook::TcIngress) => Self::RxL3Tc,
            (Framing::Ethernet, RxHook::TcIngress) => Self::RxEthernetTc,
        }
    }

    /// Returns the program for traffic to clients on devices with `framing`.
    pub const fn tx(framing: Framing) -> Self {
        match framing {
            Framing::L3 => Self::TxL3,
            Framing::Ethernet => Self::TxEthernet,
        }
    }

    /// Returns whether this is an XDP program; the others are TC classifiers.
    pub const fn is_xdp(self) -> bool {
        matches!(self, Self::RxL3 | Self::RxEthernet)
    }
}

/// Hook of the rx program on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxHook {
    /// XDP: in the driver where it supports XDP, before the kernel builds a socket buffer;
    /// otherwise in generic mode.
    Xdp,
    /// TC ingress (tcx), on the socket buffer.
    TcIngress,
}

impl RxHook {
    /// Returns the hook that suits a device: TC ingress for layer-3 (TUN) devices, XDP for
    /// Ethernet ones.
    ///
    /// TUN runs XDP only in generic mode, which works on socket buffers as TC does, but first
    /// reallocates each buffer with less than 256 bytes of headroom. On a veth test gateway,
    /// whose XDP path does the same, XDP cost 14-24% of the small-packet forwarding rate and TC
    /// ingress 7-10%.
    pub const fn default_for(framing: Framing) -> Self {
        match framing {
            Framing::L3 => Self::TcIngress,
            Framing::Ethernet => Self::Xdp,
        }
    }
}

/// The link of an attached rx program.
enum RxLink {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
}

struct Attachment {
    framing: Framing,
    hook: RxHook,
    rx: RxLink,
    tx: SchedClassifierLinkId,
}

/// The loaded programs and maps, with the agent's record of instances and counter slots.
pub struct Dataplane {
    ebpf: Ebpf,
    attachments: HashMap<String, Attachment>,
    cpus: usize,
    /// Instances set since load, with the tunnel each is bound to (0 for none).
    instances: HashMap<u32, (InstanceSettings, u32)>,
    /// Counter slots of the clients in the map, by address, including those found in pinned
    /// maps at load.
    slots: HashMap<Ipv4Addr, u32>,
    /// Counter slots not in use, lowest last so that `pop` takes it.
    free_slots: Vec<u32>,
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
                check_on_bpffs(dir)?;
                fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDirectory {
                    path: dir.to_owned(),
                    source,
                })?;
                MAP_LAYOUTS.iter().map(|layout| (layout.name, dir.join(layout.name))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }

        let mut ebpf =
            loader.load(EBPF_OBJECT).map_err(|error| DataplaneError::Load(Box::new(error)))?;
        for layout in &MAP_LAYOUTS {
            check_layout(&ebpf, layout)?;
        }

        for program in Program::ALL {
            let name = program.name();
            let failed = program_error("load", name);
            let loaded = ebpf.program_mut(name).ok_or(failed(ProgramError::NotLoaded))?;
            if program.is_xdp() {
                let xdp: &mut Xdp = loaded.try_into().map_err(failed)?;
                xdp.load().map_err(failed)?;
            } else {
                let classifier: &mut SchedClassifier = loaded.try_into().map_err(failed)?;
                classifier.load().map_err(failed)?;
            }
        }

        let cpus = aya::util::nr_cpus().map_err(|(_, error)| DataplaneError::Cpus(error))?;
        let mut dataplane = Self {
            ebpf,
            attachments: HashMap::new(),
            cpus,
            instances: HashMap::new(),
            slots: HashMap::new(),
            free_slots: Vec::new(),
        };
        // Clients kept in pinned maps keep their counter slots.
        dataplane.slots = dataplane.read_slots()?;
        let used: std::collections::HashSet<u32> = dataplane.slots.values().copied().collect();
        dataplane.free_slots = (0..MAX_CLIENTS).rev().filter(|slot| !used.contains(slot)).collect();
        info!(
            pin_dir = %pin_dir.map_or("none".into(), Path::to_string_lossy),
            cpus,
            clients = dataplane.slots.len(),
            "dataplane loaded"
        );
        Ok(dataplane)
    }

    /// Attaches the rx program and the tx program (at TC egress) to `interface`, an interface
    /// in the calling thread's network namespace, with the rx hook that suits the framing
    /// ([`RxHook::default_for`]).
    ///
    /// # Errors
    /// Fails if the interface does not exist, is already attached, or the kernel refuses.
    pub fn attach(&mut self, interface: &str, framing: Framing) -> Result<(), DataplaneError> {
        self.attach_with(interface, framing, RxHook::default_for(framing))
    }

    /// Attaches as [`Dataplane::attach`] does, with the rx program at `hook`.
    ///
    /// # Errors
    /// Fails if the interface does not exist, is already attached, or the kernel refuses.
    pub fn attach_with(
        &mut self,
        interface: &str,
        framing: Framing,
        hook: RxHook,
    ) -> Result<(), DataplaneError> {
        if self.attachments.contains_key(interface) {
            return Err(DataplaneError::AlreadyAttached(interface.to_owned()));
        }
        let actual = detect_framing(interface)?;
        if actual != framing {
            return Err(DataplaneError::FramingMismatch {
                interface: interface.to_owned(),
                requested: framing,
                actual,
                link_type: link_type(interface)?,
            });
        }
        // TC hooks take any number of programs, so a second agent would count and police
        // every packet twice. XDP takes one, and its attach fails on its own.
        let attached = SchedClassifier::query_tcx(interface, TcAttachType::Egress)
            .map(|(_, programs)| programs)
            .unwrap_or_default();
        if attached
            .iter()
            .any(|program| program.name_as_str().is_some_and(|name| name.starts_with("sag_tx")))
        {
            return Err(DataplaneError::AttachedElsewhere(interface.to_owned()));
        }
        let rx_program = Program::rx(framing, hook);
        let rx = match hook {
            RxHook::Xdp => {
                let xdp = self.xdp_mut(rx_program)?;
                // TUN has no driver-mode XDP. On Ethernet the driver mode is faster, and
                // generic mode serves drivers without XDP.
                let mode = match framing {
                    Framing::L3 => XdpMode::Skb,
                    Framing::Ethernet => XdpMode::Default,
                };
                let link = xdp
                    .attach(interface, mode)
                    .or_else(|error| match framing {
                        Framing::Ethernet => {
                            debug!(interface, %error, "driver-mode XDP failed, trying generic mode");
                            xdp.attach(interface, XdpMode::Skb)
                        }
                        Framing::L3 => Err(error),
                    })
                    .map_err(|source| attach_error("attach", rx_program, interface, source))?;
                RxLink::Xdp(link)
            }
            RxHook::TcIngress => {
                let link = self
                    .classifier_mut(rx_program)?
                    .attach(interface, TcAttachType::Ingress)
                    .map_err(|source| attach_error("attach", rx_program, interface, source))?;
                RxLink::Tc(link)
            }
        };

        let tx_program = Program::tx(framing);
        let tx = match self.classifier_mut(tx_program)?.attach(interface, TcAttachType::Egress) {
            Ok(tx) => tx,
            Err(source) => {
                // Leave nothing half-attached.
                let _ = self.detach_rx(interface, rx_program, rx);
                return Err(attach_error("attach", tx_program, interface, source));
            }
        };
        self.attachments.insert(interface.to_owned(), Attachment { framing, hook, rx, tx });
        info!(interface, ?framing, ?hook, "programs attached");
        Ok(())
    }

    /// Detaches both programs from `interface`. When this returns, neither runs any more.
    ///
    /// # Errors
    /// Fails if the interface is not attached by this dataplane.
    pub fn detach(&mut self, interface: &str) -> Result<(), DataplaneError> {
        let attachment = self
            .attachments
            .remove(interface)
            .ok_or_else(|| DataplaneError::NotAttached(interface.to_owned()))?;
        let rx_program = Program::rx(attachment.framing, attachment.hook);
        self.detach_rx(interface, rx_program, attachment.rx)?;
        let tx_program = Program::tx(attachment.framing);
        let tx_link = self
            .classifier_mut(tx_program)?
            .take_link(attachment.tx)
            .map_err(|source| attach_error("detach", tx_program, interface, source))?;
        detach_now(interface, tx_link.try_into());
        info!(interface, "programs detached");
        Ok(())
    }

    fn detach_rx(
        &mut self,
        interface: &str,
        program: Program,
        link: RxLink,
    ) -> Result<(), DataplaneError> {
        match link {
            RxLink::Xdp(id) => {
                let link = self
                    .xdp_mut(program)?
                    .take_link(id)
                    .map_err(|source| attach_error("detach", program, interface, source))?;
                detach_now(interface, link.try_into());
            }
            RxLink::Tc(id) => {
                let link = self
                    .classifier_mut(program)?
                    .take_link(id)
                    .map_err(|source| attach_error("detach", program, interface, source))?;
                detach_now(interface, link.try_into());
            }
        }
        Ok(())
    }

    /// Returns the attached interfaces and their framing, sorted by name.
    pub fn attached(&self) -> Vec<(String, Framing)> {
        let mut attached: Vec<_> =
            self.attachments.iter().map(|(name, a)| (name.clone(), a.framing)).collect();
        attached.sort_by(|a, b| a.0.cmp(&b.0));
        attached
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
        let loaded = self.ebpf.program(name).ok_or(failed(ProgramError::NotLoaded))?;
        test_run_loaded(loaded, frame, repeat).map_err(failed)
    }

    /// Returns map `name` as the typed map `T`.
    fn typed_map<'a, T>(&'a self, name: &'static str) -> Result<T, DataplaneError>
    where
        T: TryFrom<&'a Map, Error = MapError>,
    {
        let map = self.ebpf.map(name).ok_or(DataplaneError::MissingMap(name))?;
        T::try_from(map).map_err(map_error(name))
    }

    /// Returns map `name` as the typed map `T`, for writing.
    fn typed_map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, DataplaneError>
    where
        T: TryFrom<&'a mut Map, Error = MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(DataplaneError::MissingMap(name))?;
        T::try_from(map).map_err(map_error(name))
    }

    fn xdp_mut(&mut self, program: Program) -> Result<&mut Xdp, DataplaneError> {
        self.program_mut(program)
    }

    fn classifier_mut(&mut self, program: Program) -> Result<&mut SchedClassifier, DataplaneError> {
        self.program_mut(program)
    }

    /// Returns `program` as its typed program `T`.
    fn program_mut<'a, T>(&'a mut self, program: Program) -> Result<&'a mut T, DataplaneError>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
    {
        let name = program.name();
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| program_error("find", name)(ProgramError::NotLoaded))?
            .try_into()
            .map_err(program_error("find", name))
    }
}

/// Runs a loaded XDP or TC program `repeat` times on `frame` through `BPF_PROG_TEST_RUN`, and
/// returns the last verdict and the mean run time per packet in nanoseconds.
///
/// # Errors
/// Fails if the program is of another type or the kernel rejects the run.
pub fn test_run_loaded(
    loaded: &aya::programs::Program,
    frame: &[u8],
    repeat: u32,
) -> Result<(u32, u64), ProgramError> {
    let mut options = TestRunOptions::new();
    options.data_in = Some(frame);
    options.repeat = repeat;
    let result = match loaded {
        aya::programs::Program::Xdp(xdp) => xdp.test_run(options)?,
        aya::programs::Program::SchedClassifier(classifier) => classifier.test_run(options)?,
        _ => return Err(ProgramError::UnexpectedProgramType),
    };
    Ok((result.return_value, result.duration.as_nanos() as u64))
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> DataplaneError + Copy {
    move |source| DataplaneError::Map { name, source: Box::new(source) }
}

fn program_error(
    action: &'static str,
    name: &'static str,
) -> impl Fn(ProgramError) -> DataplaneError + Copy {
    move |source| DataplaneError::Program { action, name, source: Box::new(source) }
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

/// `f_type` of a bpffs mount in `statfs` (uapi `linux/magic.h`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Fails unless `dir`, or the deepest of its ancestors that exists, lies on a bpffs mount:
/// maps can be pinned nowhere else.
fn check_on_bpffs(dir: &Path) -> Result<(), DataplaneError> {
    let existing = dir.ancestors().find(|path| path.exists()).unwrap_or(Path::new("/"));
    let c_path = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes())
        .map_err(|_| DataplaneError::PinDirectoryNotBpf(dir.to_owned()))?;
    // SAFETY: statfs is plain data, for which all zeroes is a valid value.
    let mut info: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid path and a statfs to fill.
    let result = unsafe { libc::statfs(c_path.as_ptr(), &mut info) };
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64 but not on every target
    if result != 0 || info.f_type as i64 != BPF_FS_MAGIC {
        return Err(DataplaneError::PinDirectoryNotBpf(dir.to_owned()));
    }
    Ok(())
}

/// `ARPHRD_*` link types (uapi `linux/if_arp.h`) and the framing their frames have.
const LINK_TYPES: [(u16, Framing); 6] = [
    (1, Framing::Ethernet),   // ARPHRD_ETHER: Ethernet, veth, bridges
    (772, Framing::Ethernet), // ARPHRD_LOOPBACK
    (0xfffe, Framing::L3),    // ARPHRD_NONE: TUN and WireGuard devices
    (512, Framing::L3),       // ARPHRD_PPP
    (768, Framing::L3),       // ARPHRD_TUNNEL: IPIP
    (778, Framing::L3),       // ARPHRD_IPGRE
];

/// Returns the `ARPHRD_*` link type of `interface` in the calling thread's network namespace.
///
/// # Errors
/// Fails with [`DataplaneError::InterfaceNotFound`] if there is no such interface.
pub fn link_type(interface: &str) -> Result<u16, DataplaneError> {
    let not_found =
        |source| DataplaneError::InterfaceNotFound { interface: interface.to_owned(), source };
    if interface.is_empty() || interface.len() >= libc::IFNAMSIZ {
        return Err(not_found(std::io::Error::from(std::io::ErrorKind::InvalidInput)));
    }
    // SAFETY: a plain socket call; the descriptor is owned below.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(not_found(std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(socket) };
    // SAFETY: ifreq is plain data, for which all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(interface.bytes()) {
        *slot = byte as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the ifreq it is given.
    let result = unsafe {
        libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&socket), libc::SIOCGIFHWADDR, &mut request)
    };
    if result < 0 {
        return Err(not_found(std::io::Error::last_os_error()));
    }
    // SAFETY: SIOCGIFHWADDR set the hardware address member of the union.
    Ok(unsafe { request.ifr_ifru.ifru_hwaddr.sa_family })
}

/// Returns the framing of `interface`'s frames, from its link type.
///
/// # Errors
/// Fails if the interface does not exist or has a link type sag does not support.
pub fn detect_framing(interface: &str) -> Result<Framing, DataplaneError> {
    let link_type = link_type(interface)?;
    LINK_TYPES
        .iter()
        .find(|(known, _)| *known == link_type)
        .map(|(_, framing)| *framing)
        .ok_or_else(|| DataplaneError::UnsupportedLink {
            interface: interface.to_owned(),
            link_type,
        })
}

/// The shape of one map, as this build of the programs defines it.
struct MapLayout {
    name: &'static str,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
}

/// Every map of the object. All are pinned when the dataplane has a pin directory.
const MAP_LAYOUTS: [MapLayout; 4] = [
    MapLayout {
        name: map_names::CLIENT_COUNTERS,
        key_size: size_of::<u32>(),
        value_size: size_of::<ClientCounters>(),
        max_entries: MAX_CLIENTS,
    },
    MapLayout {
        name: map_names::INTERFACE_COUNTERS,
        key_size: size_of::<InterfaceKey>(),
        value_size: size_of::<PacketCounter>(),
        max_entries: MAX_INTERFACE_COUNTERS,
    },
    MapLayout {
        name: map_names::CLIENTS,
        key_size: size_of::<u32>(),
        value_size: size_of::<Client>(),
        max_entries: MAX_CLIENTS,
    },
    MapLayout {
        name: map_names::TUNNELS,
        key_size: size_of::<u32>(),
        value_size: size_of::<Tunnel>(),
        max_entries: MAX_TUNNELS,
    },
];

/// Checks that a map, possibly reused from a pin, has the key, value and size this agent
/// was built with. The kernel does not check this when a pinned map is reused.
fn check_layout(ebpf: &Ebpf, layout: &MapLayout) -> Result<(), DataplaneError> {
    let name = layout.name;
    let data = match ebpf.map(name).ok_or(DataplaneError::MissingMap(name))? {
        Map::PerCpuHashMap(data) | Map::HashMap(data) | Map::PerCpuArray(data) => data,
        _ => return Err(DataplaneError::UnexpectedMapType(name)),
    };
    let info = data.info().map_err(map_error(name))?;
    let checks = [
        ("key size", info.key_size(), layout.key_size as u32),
        ("value size", info.value_size(), layout.value_size as u32),
        ("max entries", info.max_entries(), layout.max_entries),
    ];
    for (field, found, expected) in checks {
        if found != expected {
            return Err(DataplaneError::IncompatiblePin { name, field, found, expected });
        }
    }
    Ok(())
}
