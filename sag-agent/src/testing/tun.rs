//! A TUN device whose file descriptor plays the role of the tunnel: packets written to it
//! arrive on the interface as if from clients, and packets routed to the interface are read
//! from it.

use std::{
    ffi::CString,
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// `TUNSETIFF` ioctl request number (`_IOW('T', 202, int)`, linux/if_tun.h).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// The device carries IP packets, with no Ethernet header.
const IFF_TUN: libc::c_short = 0x0001;
/// No 4-byte packet-information prefix: reads and writes are bare IP packets.
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct InterfaceRequest {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    padding: [u8; 22],
}

/// An open TUN device. The interface disappears when this is dropped.
pub struct Tun {
    file: File,
    name: String,
}

impl Tun {
    /// Creates the TUN interface `name` in the calling thread's network namespace.
    pub fn create(name: &str) -> Result<Self> {
        let c_name = CString::new(name).context("interface name contains NUL")?;
        if c_name.as_bytes().len() >= libc::IFNAMSIZ {
            bail!("interface name {name:?} is longer than 15 bytes");
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .context("failed to open /dev/net/tun")?;
        let mut request = InterfaceRequest {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            padding: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: the request is a properly sized ifreq and the fd is open.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) } != 0 {
            bail!("TUNSETIFF {name} failed: {}", std::io::Error::last_os_error());
        }
        // SAFETY: plain fcntl on an open fd.
        unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        Ok(Self { file, name: name.to_owned() })
    }

    /// Returns the interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Injects one IP packet, which the kernel receives on the interface.
    pub fn send(&self, packet: &[u8]) -> Result<()> {
        let written = (&self.file).write(packet).context("failed to write to the TUN device")?;
        if written != packet.len() {
            bail!("wrote {written} of {} bytes to the TUN device", packet.len());
        }
        Ok(())
    }

    /// Reads the next packet the kernel sent out of the interface, waiting at most `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut buffer = vec![0u8; 65_536];
        loop {
            match (&self.file).read(&mut buffer) {
                Ok(len) => {
                    buffer.truncate(len);
                    return Ok(Some(buffer));
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error).context("failed to read from the TUN device"),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut poll =
                libc::pollfd { fd: self.file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut poll, 1, left.as_millis().min(1_000) as libc::c_int + 1) };
        }
    }
}
