//! A gateway between a tunnel side and a company network, built from network namespaces, for
//! kernel tests, benchmarks and the demo.
//!
//! ```text
//!   clients (TUN fd)          gateway namespace              lan namespace
//!   10.77.0.2..  ──  tun 10.77.0.1/24 │ veth 198.18.0.1/24 ── veth 198.18.0.2/24
//! ```
//!
//! The test process keeps the TUN device's file descriptor and plays the clients' side of the
//! tunnel: a packet it writes arrives on the TUN interface as if from a client, and a packet
//! the gateway routes to a client is read back from it.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::{
    netns::{unique_name, veth_pair, Netns},
    tun::Tun,
    vlan::VlanTagger,
};

/// Gateway address on the tunnel.
pub const TUNNEL_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Client pool on the tunnel, as address and prefix length.
pub const TUNNEL_NETWORK: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 77, 0, 0), 24);
/// Gateway address on the company network.
pub const LAN_GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The server on the company network.
pub const LAN_SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// Returns the `n`th client address of the tunnel pool, counting from 10.77.0.2.
pub fn client_address(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 2 + n)
}

/// The namespaces, links and TUN device of one gateway. Dropping it removes all of them.
pub struct TunTopology {
    /// The TUN device; dropped before the namespaces.
    pub tun: Tun,
    pub gateway: Netns,
    pub lan: Netns,
    /// Index of the TUN interface in the gateway namespace.
    pub tun_ifindex: u32,
}

impl TunTopology {
    /// Builds the topology with names unique to this process and call.
    pub fn new() -> Result<Self> {
        let gateway = Netns::new("sgw")?;
        let lan = Netns::new("sln")?;
        let gateway_veth = unique_name("gv");
        let lan_veth = unique_name("lv");
        veth_pair((&gateway, &gateway_veth), (&lan, &lan_veth))?;
        gateway.ip(&["addr", "add", &format!("{LAN_GATEWAY}/24"), "dev", &gateway_veth])?;
        gateway.ip(&["link", "set", &gateway_veth, "up"])?;
        lan.ip(&["addr", "add", &format!("{LAN_SERVER}/24"), "dev", &lan_veth])?;
        lan.ip(&["link", "set", &lan_veth, "up"])?;
        lan.ip(&["route", "add", "default", "via", &LAN_GATEWAY.to_string()])?;

        let tun_name = unique_name("st");
        let (tun, tun_ifindex) = gateway.enter(|| -> Result<(Tun, u32)> {
            let tun = Tun::create(&tun_name)?;
            let ifindex = interface_index(&tun_name)?;
            Ok((tun, ifindex))
        })??;
        gateway.ip(&["addr", "add", &format!("{TUNNEL_GATEWAY}/24"), "dev", &tun_name])?;
        gateway.ip(&["link", "set", &tun_name, "up"])?;
        Ok(Self { tun, gateway, lan, tun_ifindex })
    }

    /// Returns the TUN interface's name.
    pub fn tun_name(&self) -> &str {
        self.tun.name()
    }

    /// Reads packets from the tunnel until `count` have arrived or `timeout` has passed.
    pub fn receive(&self, count: usize, timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut packets = Vec::with_capacity(count);
        while packets.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.tun.recv(left)? {
                Some(packet) => packets.push(packet),
                None => break,
            }
        }
        Ok(packets)
    }
}

/// Returns the index of interface `name` in the calling thread's namespace.
pub fn interface_index(name: &str) -> Result<u32> {
    let c_name = std::ffi::CString::new(name).context("interface name contains NUL")?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        anyhow::bail!("interface {name} not found: {}", std::io::Error::last_os_error());
    }
    Ok(index)
}

/// A UDP echo server: returns every datagram to its sender until it has echoed `count` of them
/// or `timeout` has passed. Joining it returns the number echoed.
pub fn udp_echo(socket: UdpSocket, count: usize, timeout: Duration) -> JoinHandle<usize> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        let mut buffer = [0u8; 2048];
        let mut echoed = 0;
        while echoed < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || socket.set_read_timeout(Some(left)).is_err() {
                break;
            }
            let Ok((len, peer)) = socket.recv_from(&mut buffer) else {
                break;
            };
            if socket.send_to(&buffer[..len], peer).is_ok() {
                echoed += 1;
            }
        }
        echoed
    })
}

/// Binds a UDP socket to `address` inside `netns`.
pub fn bind_udp(netns: &Netns, address: SocketAddrV4) -> Result<UdpSocket> {
    netns
        .enter(|| UdpSocket::bind(address))?
        .with_context(|| format!("failed to bind UDP {address} in {}", netns.name()))
}

/// Gateway address on the Ethernet client side.
pub const ETHERNET_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);

/// Returns the `n`th client address on the Ethernet client side, counting from 10.78.0.2.
pub fn ethernet_client_address(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 78, 0, 2 + n)
}

/// A gateway whose clients sit behind an Ethernet link, untagged or in VLAN
/// [`TEST_VLAN_ID`](super::vlan::TEST_VLAN_ID):
///
/// ```text
///   clients namespace               gateway namespace                     lan namespace
///   10.78.0.2.. on veth ── veth 10.78.0.1/24 │ veth 198.18.0.1/24 ── veth 198.18.0.2/24
/// ```
///
/// With the VLAN, [`VlanTagger`] programs tag and untag at both ends of the client link, and
/// VLAN transmit offload is off there, so each frame on the link carries the tag.
pub struct EthernetTopology {
    /// TC tagging programs of the client link, detached before the namespaces go.
    _taggers: Vec<VlanTagger>,
    pub clients: Netns,
    pub gateway: Netns,
    pub lan: Netns,
    /// The gateway's interface toward the clients, where the programs attach.
    pub gateway_link: String,
    /// The gateway's interface toward the company network.
    pub gateway_lan: String,
    /// Index of `gateway_link` in the gateway namespace.
    pub gateway_ifindex: u32,
}

impl EthernetTopology {
    /// Builds the topology with `client_count` client addresses, with a VLAN tag on the client
    /// link if `vlan` is true.
    pub fn new(vlan: bool, client_count: u8) -> Result<Self> {
        let clients = Netns::new("scl")?;
        let gateway = Netns::new("sgw")?;
        let lan = Netns::new("sln")?;

        let gateway_lan = unique_name("gv");
        let lan_veth = unique_name("lv");
        veth_pair((&gateway, &gateway_lan), (&lan, &lan_veth))?;
        gateway.ip(&["addr", "add", &format!("{LAN_GATEWAY}/24"), "dev", &gateway_lan])?;
        gateway.ip(&["link", "set", &gateway_lan, "up"])?;
        lan.ip(&["addr", "add", &format!("{LAN_SERVER}/24"), "dev", &lan_veth])?;
        lan.ip(&["link", "set", &lan_veth, "up"])?;
        lan.ip(&["route", "add", "default", "via", &LAN_GATEWAY.to_string()])?;

        let gateway_link = unique_name("ge");
        let client_link = unique_name("ce");
        veth_pair((&gateway, &gateway_link), (&clients, &client_link))?;
        let mut taggers = Vec::new();
        if vlan {
            for (netns, link) in [(&gateway, &gateway_link), (&clients, &client_link)] {
                netns.exec(&["ethtool", "-K", link, "txvlan", "off"])?;
                taggers.push(netns.enter(|| VlanTagger::attach(link))??);
            }
        }
        gateway.ip(&["addr", "add", &format!("{ETHERNET_GATEWAY}/24"), "dev", &gateway_link])?;
        gateway.ip(&["link", "set", &gateway_link, "up"])?;
        for n in 0..client_count {
            let address = format!("{}/24", ethernet_client_address(n));
            clients.ip(&["addr", "add", &address, "dev", &client_link])?;
        }
        clients.ip(&["link", "set", &client_link, "up"])?;
        clients.ip(&["route", "add", "default", "via", &ETHERNET_GATEWAY.to_string()])?;
        let gateway_ifindex = gateway.enter(|| interface_index(&gateway_link))??;
        Ok(Self {
            _taggers: taggers,
            clients,
            gateway,
            lan,
            gateway_link,
            gateway_lan,
            gateway_ifindex,
        })
    }
}
