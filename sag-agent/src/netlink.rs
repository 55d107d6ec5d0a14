//! Configuring tunnel interfaces through rtnetlink: MTU, link state, IPv4 addresses and routes,
//! and the forwarding and IPv6 sysctls, so that the agent does not run `ip` or `sysctl`.

use std::{
    fs::OpenOptions,
    io::{ErrorKind, Write as _},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::{
    packet_route::{
        address::{AddressAttribute, AddressMessage},
        link::{LinkAttribute, LinkFlags, LinkMessage},
        route::{
            RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
            RouteType,
        },
        AddressFamily,
    },
    Handle, LinkUnspec, RouteMessageBuilder,
};

/// The IPv4 forwarding sysctl of the network namespace that opens it.
const IP_FORWARD_PATH: &str = "/proc/sys/net/ipv4/ip_forward";

/// Errors of configuring interfaces through netlink and sysctl files.
///
/// The kernel's error text is part of each message, so the variants carry it as a field named
/// `error` rather than as a `source`, which a printed error chain would show twice.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("no tokio runtime is running: call Netlink::connect from inside one")]
    NoRuntime,
    #[error("failed to open a netlink route socket: {error}")]
    Connect { error: std::io::Error },
    #[error(
        "invalid interface name {interface:?}: a name is 1 to 15 bytes, is not \".\" or \"..\", \
         and contains no '/', ':', whitespace or NUL"
    )]
    InvalidName { interface: String },
    #[error("interface {interface:?} not found")]
    InterfaceNotFound { interface: String },
    #[error("failed to look up interface {interface:?}: {error}")]
    LookUp { interface: String, error: std::io::Error },
    #[error("failed to read interface index {ifindex}: {error}")]
    GetLink { ifindex: u32, error: std::io::Error },
    #[error("the kernel's reply for interface index {ifindex} has no MTU attribute")]
    MissingMtu { ifindex: u32 },
    #[error("failed to set the MTU of interface index {ifindex} to {mtu} bytes: {error}")]
    SetMtu { ifindex: u32, mtu: u32, error: std::io::Error },
    #[error("failed to bring up interface index {ifindex}: {error}")]
    SetUp { ifindex: u32, error: std::io::Error },
    #[error("failed to add address {address} to interface index {ifindex}: {error}")]
    AddAddress { ifindex: u32, address: Ipv4Net, error: std::io::Error },
    #[error("failed to list the addresses of interface index {ifindex}: {error}")]
    ListAddresses { ifindex: u32, error: std::io::Error },
    #[error("failed to route {block} through interface index {ifindex}: {error}")]
    ReplaceRoute { block: Ipv4Net, ifindex: u32, error: std::io::Error },
    #[error("failed to delete the route {block} through interface index {ifindex}: {error}")]
    DeleteRoute { block: Ipv4Net, ifindex: u32, error: std::io::Error },
    #[error("failed to list the routes through interface index {ifindex}: {error}")]
    ListRoutes { ifindex: u32, error: std::io::Error },
    #[error("failed to write 1 to {path}: {error}")]
    Sysctl { path: PathBuf, error: std::io::Error },
}

/// A netlink route socket bound to the network namespace it was opened in.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's current network namespace and spawns its
    /// connection task on the current tokio runtime.
    ///
    /// The socket stays in that namespace even when later calls run on threads of another
    /// one. The connection task ends once every clone of this value is dropped.
    ///
    /// # Errors
    /// Fails if no tokio runtime is running or the socket cannot be opened.
    pub fn connect() -> Result<Self, NetlinkError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NetlinkError::NoRuntime)?;
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|error| NetlinkError::Connect { error })?;
        runtime.spawn(connection);
        Ok(Self { handle })
    }

    /// Looks up the index of the interface `name`.
    ///
    /// # Errors
    /// Fails with [`NetlinkError::InvalidName`] if the kernel would reject the name,
    /// [`NetlinkError::InterfaceNotFound`] if no interface has it, or
    /// [`NetlinkError::LookUp`] with the kernel's error.
    pub async fn ifindex(&self, name: &str) -> Result<u32, NetlinkError> {
        validate_name(name)?;
        let reply = self.handle.link().get().match_name(name.to_owned()).execute().try_next().await;
        match reply {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(NetlinkError::InterfaceNotFound { interface: name.to_owned() }),
            Err(error) => {
                let error = kernel_error(error);
                if error.raw_os_error() == Some(libc::ENODEV) {
                    Err(NetlinkError::InterfaceNotFound { interface: name.to_owned() })
                } else {
                    Err(NetlinkError::LookUp { interface: name.to_owned(), error })
                }
            }
        }
    }

    /// Sets the MTU of the interface, in bytes, and then brings it up.
    ///
    /// # Errors
    /// Fails with the kernel's error if the interface is missing, the MTU is outside the
    /// device's range, or the caller lacks `CAP_NET_ADMIN`.
    pub async fn set_up(&self, ifindex: u32, mtu: u32) -> Result<(), NetlinkError> {
        let message = LinkUnspec::new_with_index(ifindex).mtu(mtu).build();
        self.handle.link().set(message).execute().await.map_err(|error| NetlinkError::SetMtu {
            ifindex,
            mtu,
            error: kernel_error(error),
        })?;

        let message = LinkUnspec::new_with_index(ifindex).up().build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|error| NetlinkError::SetUp { ifindex, error: kernel_error(error) })
    }

    /// Adds the IPv4 address `address/prefix_len` to the interface.
    ///
    /// An address already on the interface with the same prefix length is not an error, so
    /// a restarted agent or client can call this again.
    ///
    /// # Errors
    /// Fails if the prefix length is over 32, or with the kernel's error if the interface is
    /// missing or the caller lacks `CAP_NET_ADMIN`.
    pub async fn add_address(
        &self,
        ifindex: u32,
        address: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        let interface_address =
            Ipv4Net::new(address, prefix_len).map_err(|_| NetlinkError::AddAddress {
                ifindex,
                address: Ipv4Net::from(address),
                error: std::io::Error::new(
                    ErrorKind::InvalidInput,
                    format!("invalid prefix length {prefix_len}: must be 0 to 32"),
                ),
            })?;
        let result = self
            .handle
            .address()
            .add(ifindex, IpAddr::V4(address), prefix_len)
            .execute()
            .await
            .map_err(kernel_error);
        match result {
            Ok(()) => Ok(()),
            Err(error) if error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(error) => {
                Err(NetlinkError::AddAddress { ifindex, address: interface_address, error })
            }
        }
    }

    /// Routes `block` through the interface in the main table, with scope link and protocol
    /// static.
    ///
    /// The request carries `NLM_F_REPLACE`, so calling it again is not an error, and a
    /// main-table route for the same block with metric 0 through another interface is moved to
    /// this one.
    ///
    /// # Errors
    /// Fails with the kernel's error if the interface is missing or down (`ENETDOWN`), or the
    /// caller lacks `CAP_NET_ADMIN`.
    pub async fn replace_route(&self, block: Ipv4Net, ifindex: u32) -> Result<(), NetlinkError> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(block.network(), block.prefix_len())
            .output_interface(ifindex)
            .scope(RouteScope::Link)
            .build();
        self.handle.route().add(route).replace().execute().await.map_err(|error| {
            NetlinkError::ReplaceRoute { block, ifindex, error: kernel_error(error) }
        })
    }

    /// Deletes the main-table route for `block` through the interface.
    ///
    /// A route that is missing, or that goes through another interface, is left alone and is
    /// not an error.
    ///
    /// # Errors
    /// Fails with the kernel's error for anything but a missing route, for example when the
    /// caller lacks `CAP_NET_ADMIN`.
    pub async fn delete_route(&self, block: Ipv4Net, ifindex: u32) -> Result<(), NetlinkError> {
        // Unspecified protocol and type, and scope nowhere, match a route of any protocol,
        // type and scope, as `ip route del` does. The output interface still has to match.
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(block.network(), block.prefix_len())
            .output_interface(ifindex)
            .protocol(RouteProtocol::Unspec)
            .scope(RouteScope::NoWhere)
            .kind(RouteType::Unspec)
            .build();
        let result = self.handle.route().del(route).execute().await.map_err(kernel_error);
        match result {
            Ok(()) => Ok(()),
            // The kernel reports a route that matches nothing with ESRCH.
            Err(error) if error.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(error) => Err(NetlinkError::DeleteRoute { block, ifindex, error }),
        }
    }

    /// Lists the destinations of the IPv4 main-table routes whose output interface is
    /// `ifindex`, sorted and each listed once.
    ///
    /// Multipath routes, whose interfaces sit in nested next hops, are not listed.
    ///
    /// # Errors
    /// Fails with the kernel's error if the route dump fails.
    pub async fn routes_via(&self, ifindex: u32) -> Result<Vec<Ipv4Net>, NetlinkError> {
        let request = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let routes: Vec<RouteMessage> =
            self.handle.route().get(request).execute().try_collect().await.map_err(|error| {
                NetlinkError::ListRoutes { ifindex, error: kernel_error(error) }
            })?;
        let mut blocks: Vec<Ipv4Net> = routes
            .iter()
            .filter(|route| is_main_table_route_via(route, ifindex))
            .filter_map(route_destination)
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        Ok(blocks)
    }

    /// Lists the IPv4 addresses on the interface with their prefix lengths, sorted.
    ///
    /// # Errors
    /// Fails with the kernel's error if the address dump fails.
    pub async fn addresses(&self, ifindex: u32) -> Result<Vec<Ipv4Net>, NetlinkError> {
        let messages: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .execute()
            .try_collect()
            .await
            .map_err(|error| NetlinkError::ListAddresses { ifindex, error: kernel_error(error) })?;
        let mut addresses: Vec<Ipv4Net> = messages.iter().filter_map(ipv4_address).collect();
        addresses.sort_unstable();
        Ok(addresses)
    }

    /// Returns the MTU of the interface, in bytes.
    ///
    /// # Errors
    /// Fails with the kernel's error if the interface is missing.
    pub async fn mtu(&self, ifindex: u32) -> Result<u32, NetlinkError> {
        let link = self.link(ifindex).await?;
        link.attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            })
            .ok_or(NetlinkError::MissingMtu { ifindex })
    }

    /// Returns whether the interface is administratively up (`IFF_UP`), the flag that
    /// [`Netlink::set_up`] sets. Carrier and operational state are not checked.
    ///
    /// # Errors
    /// Fails with the kernel's error if the interface is missing.
    pub async fn is_up(&self, ifindex: u32) -> Result<bool, NetlinkError> {
        let link = self.link(ifindex).await?;
        Ok(link.header.flags.contains(LinkFlags::Up))
    }

    async fn link(&self, ifindex: u32) -> Result<LinkMessage, NetlinkError> {
        let reply = self.handle.link().get().match_index(ifindex).execute().try_next().await;
        match reply {
            Ok(Some(link)) => Ok(link),
            Ok(None) => Err(NetlinkError::GetLink {
                ifindex,
                error: std::io::Error::from_raw_os_error(libc::ENODEV),
            }),
            Err(error) => Err(NetlinkError::GetLink { ifindex, error: kernel_error(error) }),
        }
    }
}

/// Writes 1 to `/proc/sys/net/ipv4/ip_forward` of the calling thread's network namespace.
///
/// # Errors
/// Fails if the file cannot be opened or written, for example without `CAP_NET_ADMIN`.
pub fn enable_ipv4_forwarding() -> Result<(), NetlinkError> {
    write_one(Path::new(IP_FORWARD_PATH))
}

/// Writes 1 to `/proc/sys/net/ipv6/conf/NAME/disable_ipv6` if that file exists, so that the
/// tunnel interface sends no IPv6 router solicitations.
///
/// A missing file is not an error: the interface is gone, or the kernel runs without IPv6.
///
/// # Errors
/// Fails with [`NetlinkError::InvalidName`] for a name the kernel would reject, which also
/// keeps the path inside the interface's directory, or if the file cannot be written.
pub fn disable_ipv6(name: &str) -> Result<(), NetlinkError> {
    validate_name(name)?;
    let path = PathBuf::from(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"));
    match write_one(&path) {
        Err(NetlinkError::Sysctl { error, .. }) if error.kind() == ErrorKind::NotFound => Ok(()),
        result => result,
    }
}

fn write_one(path: &Path) -> Result<(), NetlinkError> {
    // Without `create`, so that a missing sysctl reports NotFound instead of a failed create.
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut file| file.write_all(b"1"))
        .map_err(|error| NetlinkError::Sysctl { path: path.to_owned(), error })
}

/// Rejects the names that `dev_valid_name()` in the kernel's net/core/dev.c rejects: empty,
/// 16 bytes or longer (`IFNAMSIZ` with its NUL), "." or "..", or containing '/', ':' or a
/// byte that the kernel's `isspace()` accepts. NUL is rejected too, because the kernel would
/// read the name only up to it.
fn validate_name(name: &str) -> Result<(), NetlinkError> {
    let invalid_byte = |byte: &u8| {
        // The kernel's ctype table also counts 0xA0, the Latin-1 no-break space, as a space.
        matches!(byte, b'/' | b':' | b' ' | b'\t'..=b'\r' | 0xA0 | 0)
    };
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name == "."
        || name == ".."
        || name.as_bytes().iter().any(invalid_byte)
    {
        return Err(NetlinkError::InvalidName { interface: name.to_owned() });
    }
    Ok(())
}

/// Converts rtnetlink's error into the kernel's errno where there is one, so that callers can
/// match on `raw_os_error()` and messages show the standard errno text.
fn kernel_error(error: rtnetlink::Error) -> std::io::Error {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.to_io(),
        other => std::io::Error::other(other.to_string()),
    }
}

fn is_main_table_route_via(route: &RouteMessage, ifindex: u32) -> bool {
    if route.header.address_family != AddressFamily::Inet {
        return false;
    }
    // Table IDs above 255 fit only in the RTA_TABLE attribute. The kernel sends that attribute
    // with every IPv4 route, so the header field is only a fallback.
    let table = route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table));
    let through_interface = route.attributes.contains(&RouteAttribute::Oif(ifindex));
    table == u32::from(RouteHeader::RT_TABLE_MAIN) && through_interface
}

fn route_destination(route: &RouteMessage) -> Option<Ipv4Net> {
    // A default route has no destination attribute.
    let network = route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(address)) => Some(*address),
            _ => None,
        })
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    Ipv4Net::new(network, route.header.destination_prefix_length).ok()
}

fn ipv4_address(message: &AddressMessage) -> Option<Ipv4Net> {
    if message.header.family != AddressFamily::Inet {
        return None;
    }
    // IFA_LOCAL is the interface's own address. IFA_ADDRESS is the peer's on a
    // point-to-point link configured with one, and equals IFA_LOCAL otherwise.
    let local = message.attributes.iter().find_map(|attribute| match attribute {
        AddressAttribute::Local(IpAddr::V4(address)) => Some(*address),
        _ => None,
    })?;
    Ipv4Net::new(local, message.header.prefix_len).ok()
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;
    use crate::testing::{netns::Netns, tun::Tun};

    const TUN: &str = "sagtun0";
    const OTHER_TUN: &str = "sagtun1";
    const MTU: u32 = 1420;
    /// The MTU that the kernel gives a new TUN device (drivers/net/tun.c).
    const TUN_DEFAULT_MTU: u32 = 1500;
    /// An interface index that no interface of a new namespace has.
    const MISSING_IFINDEX: u32 = 0x7fff_0000;

    fn net(text: &str) -> Ipv4Net {
        text.parse().unwrap()
    }

    /// Runs `test` inside `netns` on a current-thread runtime, with the TUN devices `TUN` and
    /// `OTHER_TUN` present until it returns.
    fn in_namespace<F, Fut>(netns: &Netns, test: F)
    where
        F: FnOnce(Netlink) -> Fut + Send,
        Fut: Future<Output = ()>,
    {
        netns
            .enter(|| {
                let _tun = Tun::create(TUN).expect("failed to create the first TUN device");
                let _other =
                    Tun::create(OTHER_TUN).expect("failed to create the second TUN device");
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("failed to build the tokio runtime");
                runtime.block_on(async {
                    let netlink = Netlink::connect().expect("failed to open the netlink socket");
                    test(netlink).await;
                });
            })
            .expect("the test thread in the namespace failed");
    }

    fn read_sysctl(path: &str) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|error| panic!("read {path}: {error}"))
    }

    fn write_sysctl(path: &str, value: &str) {
        std::fs::write(path, value).unwrap_or_else(|error| panic!("write {path}: {error}"));
    }

    #[test]
    fn set_up_sets_mtu_and_flag() {
        let netns = Netns::new("sagnl").unwrap();
        in_namespace(&netns, |netlink| async move {
            let ifindex = netlink.ifindex(TUN).await.unwrap();
            assert_eq!(netlink.mtu(ifindex).await.unwrap(), TUN_DEFAULT_MTU);
            assert!(!netlink.is_up(ifindex).await.unwrap(), "a new TUN device is down");

            netlink.set_up(ifindex, MTU).await.unwrap();
            assert_eq!(netlink.mtu(ifindex).await.unwrap(), MTU);
            assert!(netlink.is_up(ifindex).await.unwrap(), "set_up left the device down");

            netlink.set_up(ifindex, MTU).await.expect("a second set_up failed");
            assert_eq!(netlink.mtu(ifindex).await.unwrap(), MTU);
        });
    }

    #[test]
    fn set_up_rejects_mtu_below_minimum() {
        let netns = Netns::new("sagnl").unwrap();
        in_namespace(&netns, |netlink| async move {
            let ifindex = netlink.ifindex(TUN).await.unwrap();
            // 68 bytes, the IPv4 minimum, is the minimum MTU of a TUN device (drivers/net/tun.c).
            let error = netlink.set_up(ifindex, 67).await.unwrap_err();
            let message = error.to_string();
            assert!(matches!(error, NetlinkError::SetMtu { mtu: 67, .. }), "{message}");
            assert!(message.contains(&format!("interface index {ifindex}")), "{message}");
            assert!(message.contains("67 bytes"), "{message}");
            assert!(message.contains("Invalid argument"), "{message}");
            assert!(!netlink.is_up(ifindex).await.unwrap(), "a failed MTU change brought it up");
        });
    }

    #[test]
    fn ifindex_matches_kernel_index() {
        let netns = Netns::new("sagnl").unwrap();
        in_namespace(&netns, |netlink| async move {
            for name in [TUN, OTHER_TUN, "lo"] {
                let c_name = std::ffi::CString::new(name).unwrap();
                // SAFETY: the argument is a valid NUL-terminated string.
                let expected = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
                assert_ne!(expected, 0, "if_nametoindex({name}) failed");
                assert_eq!(netlink.ifindex(name).await.unwrap(), expected, "{name}");
            }
        });
    }

    #[test]
    fn ifindex_names_missing_interface() {
        let netns = Netns::new("sagnl").unwrap();
        in_namespace(&netns, |netlink| async move {
            let error = netlink.ifindex("nonexistent0").await.unwrap_err();
            let message = error.to_string();
            assert!(matches!(error, NetlinkError::InterfaceNotFound { .. }), "{message}");
            assert!(message.contains("\"nonexistent0\""), "{message}");
        });
    }

    #[test]
    fn ifindex_rejects_invalid_names() {
        let netns = Netns::new("sagnl").unwrap();
        in_namespace(&netns, |netlink| async move {
            for name in ["", "sixteen-bytes-ab", ".", "..", "a/b", "a:b", "a b", "a\tb", "a\0b"] {
                let error = netlink.ifindex(name).await.unwrap_err();
                let message = error.to_string();
                assert!(matches!(error, NetlinkError::InvalidName { .. }), "{name:?}: {message}");
                assert!(message.contains(&format!("{name:?}")), "{message}");
            }
            let longest = "fifteen-bytes-a";
            let error = netlink.ifindex(longest).await.unwrap_err();
            assert!(matches!(error, NetlinkError::InterfaceNotFound { .. }), "{error}");
        });
    }

    #[test]
    fn link_queries_fail_on_missing_index() {
        let netns = Netns::new("sagnl").unwrap();
        in_namespace(&netns, |netlink| async move {
            let error = netlink.mtu(MISSING_IFINDEX).await.unwrap_err();
            let message = error.to_string();
            assert!(message.contains(&format!("interface index {MISSING_IFINDEX}")), "{message}");
            assert!(message.contains("No such device"), "{message}");

            let error = netlink.is_up(MISSING_IFINDEX).await.unwrap_err();
            assert!(matches!(error, NetlinkError::GetLink { .. }), "{error}");
        });
    }

    #[test]
    fn add_address_is_idempotent() {
        let netns = Netns::new("sagnl").unwrap();
        in_namespace(&netns, |netlink| async move {
            let ifindex = netlink.ifindex(TUN).await.unwrap();
            let other = netlink.ifindex(OTHER_TUN).await.unwrap();
            assert_eq!(netlink.addresses(ifindex).await.unwrap(), []);

            let address = Ipv4Addr::new(10, 99, 0, 2);
            netlink.add_address(ifindex, address, 32).await.unwrap();
            assert_eq!(netlink.addresses(ifindex).await.unwrap(), [net("10.99.0.2/32")]);

            netlink.add_address(ifindex, address, 32).await.expect("adding it again failed");
            assert_eq!(netlink.addresses(ifindex).await.unwrap(), [net("10.99.0.2/32")]);

            netlink.add_address(ifindex, Ipv4Addr::new(10, 99, 1, 1), 24).await.unwrap();
            assert_eq!(
                netlink.addresses(ifindex).await.unwrap(),
                [net("10.99.0.2/32"), net("10.99.1.1/24")]
            );
            assert_eq!(netlink.addresses(other).await.unwrap(), [], "other device");
        });
    }

    #[test]
    fn add_address_names_failure() {
        let netns = Netns::new("sagnl").unwrap();
        in_namespace(&netns, |netlink| async move {
            let address = Ipv4Addr::new(10, 99, 0, 2);
            let error = netlink.add_address(MISSING_IFINDEX, address, 32).await.unwrap_err();
            let message = error.to_string();
            assert!(message.contains("10.99.0.2/32"), "{message}");
            assert!(message.contains(&format!("interface index {MISSING_IFINDEX}")), "{message}");
            assert!(message.contains("No such device"), "{message}");

            let ifindex = netlink.ifindex(TUN).await.unwrap();
            let error = netlink.add_address(ifindex, address, 33).await.unwrap_err();
            let message = error.to_string();
            assert!(message.contains("invalid prefix length 33"), "{message}");
        });
    }

    #[test]
    fn replace_route_is_idempotent() {
        let netns = Netns::new("sagnl").unwrap();
        let netns = &netns;
        in_namespace(netns, |netlink| async move {
            let ifindex = netlink.ifindex(TUN).await.unwrap();
            let other = netlink.ifindex(OTHER_TUN).await.unwrap();
            netlink.set_up(ifindex, MTU).await.unwrap();
            netlink.set_up(other, MTU).await.unwrap();
            netlink.replace_route(net("10.97.0.0/24"), other).await.unwrap();

            for _ in 0..2 {
                netlink.replace_route(net("10.98.0.0/24"), ifindex).await.unwrap();
                netlink.replace_route(net("10.98.4.0/22"), ifindex).await.unwrap();
            }
            assert_eq!(
                netlink.routes_via(ifindex).await.unwrap(),
                [net("10.98.0.0/24"), net("10.98.4.0/22")]
            );
            assert_eq!(netlink.routes_via(other).await.unwrap(), [net("10.97.0.0/24")]);

            // iproute2 reads the same table independently of this module.
            let table_text = netns.ip(&["-4", "route", "show", "table", "main"]).unwrap();
            let lines: Vec<&str> = table_text.lines().map(str::trim_end).collect();
            assert_eq!(
                lines,
                [
                    "10.97.0.0/24 dev sagtun1 proto static scope link",
                    "10.98.0.0/24 dev sagtun0 proto static scope link",
                    "10.98.4.0/22 dev sagtun0 proto static scope link",
                ]
            );
        });
    }

    #[test]
    fn replace_route_moves_block_to_interface() {
        let netns = Netns::new("sagnl").unwrap();
        in_namespace(&netns, |netlink| async move {
            let ifindex = netlink.ifindex(TUN).await.unwrap();
            let other = netlink.ifindex(OTHER_TUN).await.unwrap();
            netlink.set_up(ifindex, MTU).await.unwrap();
            netlink.set_up(other, MTU).await.unwrap();

            netlink.replace_route(net("10.98.0.0/24"), other).await.unwrap();
            netlink.replace_route(net("10.98.0.0/24"), ifindex).await.unwrap();
            assert_eq!(netlink.routes_via(ifindex).await.unwrap(), [net("10.98.0.0/24")]);
            assert_eq!(netlink.routes_via(other).await.unwrap(), []);
        });
    }

    #[test]
    fn replace_route_on_down_link_fails() {
        let netns = Netns::new("sagnl").unwrap();
        in_namespace(&netns, |netlink| async move {
            let ifindex = netlink.ifindex(TUN).await.unwrap();
            let error = netlink.replace_route(net("10.98.0.0/24"), ifindex).await.unwrap_err();
            let message = error.to_string();
            assert!(matches!(error, NetlinkError::ReplaceRoute { .. }), "{message}");
            assert!(message.contains("10.98.0.0/24"), "{message}");
            assert!(message.contains(&format!("interface index {ifindex}")), "{message}");
            assert!(message.contains("Network is down"), "{message}");
            assert_eq!(netlink.routes_via(ifindex).await.unwrap(), []);
        });
    }

    #[test]
    fn delete_route_removes_one_block() {
        let netns = Netns::new("sagnl").unwrap();
        let netns = &netns;
        in_namespace(netns, |netlink| async move {
            let ifindex = netlink.ifindex(TUN).await.unwrap();
            let other = netlink.ifindex(OTHER_TUN).await.unwrap();
            netlink.set_up(ifindex, MTU).await.unwrap();
            netlink.replace_route(net("10.98.0.0/24"), ifindex).await.unwrap();
            netlink.replace_route(net("10.98.4.0/22"), ifindex).await.unwrap();

            netlink.delete_route(net("10.98.0.0/24"), ifindex).await.unwrap();
            assert_eq!(netlink.routes_via(ifindex).await.unwrap(), [net("10.98.4.0/22")]);

            netlink.delete_route(net("10.98.0.0/24"), ifindex).await.expect("second delete");
            assert_eq!(netlink.routes_via(ifindex).await.unwrap(), [net("10.98.4.0/22")]);

            netlink.delete_route(net("10.98.4.0/22"), other).await.expect("delete via other");
            assert_eq!(
                netlink.routes_via(ifindex).await.unwrap(),
                [net("10.98.4.0/22")],
                "a delete through another interface removed the route"
            );

            // A route that `ip route add` made has protocol boot, not static.
            netns.ip(&["route", "add", "10.96.0.0/24", "dev", TUN]).unwrap();
            assert_eq!(
                netlink.routes_via(ifindex).await.unwrap(),
                [net("10.96.0.0/24"), net("10.98.4.0/22")]
            );
            netlink.delete_route(net("10.96.0.0/24"), ifindex).await.unwrap();
            assert_eq!(netlink.routes_via(ifindex).await.unwrap(), [net("10.98.4.0/22")]);
        });
    }

    #[test]
    fn enable_ipv4_forwarding_writes_sysctl() {
        let netns = Netns::new("sagnl").unwrap();
        in_namespace(&netns, |_| async move {
            // Netns::new turns forwarding on, so turn it off to see the change.
            write_sysctl(IP_FORWARD_PATH, "0");
            assert_eq!(read_sysctl(IP_FORWARD_PATH), "0\n");

            enable_ipv4_forwarding().unwrap();
            assert_eq!(read_sysctl(IP_FORWARD_PATH), "1\n");
        });
        let namespace_value = netns.exec(&["cat", IP_FORWARD_PATH]).unwrap();
        assert_eq!(namespace_value, "1\n", "the value that another process in the namespace reads");
    }

    #[test]
    fn disable_ipv6_writes_device_sysctl() {
        let netns = Netns::new("sagnl").unwrap();
        in_namespace(&netns, |_| async move {
            let path = format!("/proc/sys/net/ipv6/conf/{TUN}/disable_ipv6");
            let other_path = format!("/proc/sys/net/ipv6/conf/{OTHER_TUN}/disable_ipv6");
            // Netns::new disables IPv6 on new devices, so enable it to see the change.
            write_sysctl(&path, "0");
            write_sysctl(&other_path, "0");
            assert_eq!(read_sysctl(&path), "0\n");

            disable_ipv6(TUN).unwrap();
            assert_eq!(read_sysctl(&path), "1\n");
            assert_eq!(read_sysctl(&other_path), "0\n", "the other device changed");
        });
    }

    #[test]
    fn disable_ipv6_ignores_missing_interface() {
        let netns = Netns::new("sagnl").unwrap();
        in_namespace(&netns, |_| async move {
            disable_ipv6("nonexistent0").expect("a missing interface is not an error");
        });
    }

    #[test]
    fn disable_ipv6_rejects_path_traversal() {
        let netns = Netns::new("sagnl").unwrap();
        in_namespace(&netns, |_| async move {
            let all = "/proc/sys/net/ipv6/conf/all/disable_ipv6";
            write_sysctl(all, "0");
            let error = disable_ipv6("../all").unwrap_err();
            assert!(matches!(error, NetlinkError::InvalidName { .. }), "{error}");
            assert_eq!(read_sysctl(all), "0\n", "a name outside conf/ reached the file system");
        });
    }
}
