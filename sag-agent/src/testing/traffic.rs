//! Paced UDP traffic through a TUN tunnel and a receiver that timestamps what arrives, for
//! rate-limit tests and benchmarks, and TCP tests with iperf3 between namespaces. Every sender
//! stops after a fixed time.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{frames::udp, netns::Netns, tun::Tun};

/// Receive buffer of [`Receiver`] sockets, in bytes: room for a second of 100 Mbit/s, so that
/// the socket never drops what the gateway delivered.
const RECEIVE_BUFFER_BYTES: libc::c_int = 16 << 20;
/// Maximum wait for an iperf3 server to listen.
const IPERF3_START_TIMEOUT: Duration = Duration::from_secs(10);

/// A UDP sink that records when each datagram arrived and its IP size.
pub struct Receiver {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(Duration, usize)>>,
}

impl Receiver {
    /// Starts receiving on `socket`; arrival times count from `start`.
    pub fn start(socket: UdpSocket, start: Instant) -> Result<Self> {
        let size = RECEIVE_BUFFER_BYTES;
        // SAFETY: setsockopt with a valid socket and an int option. SO_RCVBUFFORCE passes
        // rmem_max, which root may do.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut arrivals = Vec::new();
            let mut buffer = [0u8; 2048];
            loop {
                match socket.recv(&mut buffer) {
                    // The IP size: 20 bytes of IPv4 header and 8 of UDP header on top.
                    Ok(len) => arrivals.push((start.elapsed(), len + 28)),
                    Err(_) if stopping.load(Ordering::Relaxed) => break,
                    Err(_) => {}
                }
            }
            arrivals
        });
        Ok(Self { stop, thread })
    }

    /// Stops once the socket has been idle for 50 ms, and returns the arrivals.
    pub fn finish(self) -> Vec<(Duration, usize)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("receiver thread")
    }
}

/// Returns the rate of the arrivals between `from` and `to`, in kbit/s.
pub fn rate_kbps(arrivals: &[(Duration, usize)], from: Duration, to: Duration) -> f64 {
    let bytes: usize =
        arrivals.iter().filter(|(at, _)| *at >= from && *at < to).map(|(_, size)| size).sum();
    bytes as f64 * 8.0 / (to - from).as_secs_f64() / 1_000.0
}

/// One client's paced flow through the tunnel.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub source: (Ipv4Addr, u16),
    pub destination: (Ipv4Addr, u16),
    /// UDP payload size; each packet is 28 bytes more.
    pub payload: usize,
    /// Offered rate, in kbit/s of IP bytes.
    pub rate_kbps: f64,
}

impl Flow {
    fn packet_interval(&self) -> Duration {
        Duration::from_secs_f64((self.payload + 28) as f64 * 8.0 / (self.rate_kbps * 1_000.0))
    }
}

/// Writes the flows into the tunnel at their rates for `duration`, from `start`, checking the
/// clock every millisecond. `on_tick` runs once per tick with the elapsed time, for changes in
/// mid-flow. Returns the number of packets each flow sent.
pub fn send_paced(
    tun: &Tun,
    flows: &[Flow],
    start: Instant,
    duration: Duration,
    mut on_tick: impl FnMut(Duration),
) -> Result<Vec<u64>> {
    let packets: Vec<Vec<u8>> = flows
        .iter()
        .map(|flow| udp(flow.source, flow.destination, &vec![0x33; flow.payload]))
        .collect();
    let intervals: Vec<f64> = flows.iter().map(|f| f.packet_interval().as_secs_f64()).collect();
    let mut sent = vec![0u64; flows.len()];
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        on_tick(elapsed);
        for (index, packet) in packets.iter().enumerate() {
            let due = (elapsed.as_secs_f64() / intervals[index]) as u64 + 1;
            while sent[index] < due {
                tun.send(packet)?;
                sent[index] += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(sent)
}

/// A one-shot iperf3 server, which exits after one test. It is killed when dropped if it still
/// runs.
pub struct Iperf3Server(Child);

impl Iperf3Server {
    /// Starts `iperf3 --server --one-off` in `netns` on `bind`:`port`, and waits until it
    /// listens there.
    ///
    /// # Errors
    /// Fails if iperf3 cannot be started, exits before it listens, or does not listen within
    /// 10 s.
    pub fn start(netns: &Netns, port: u16, bind: Ipv4Addr) -> Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", netns.name(), "iperf3", "--server", "--one-off"])
            .args(["--port", &port.to_string(), "--bind", &bind.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .context("failed to start iperf3 --server")?;
        let mut server = Self(child);
        // The server's output goes to /dev/null, so wait for its listening TCP socket, which
        // UDP tests also use for their control connection.
        let filter = format!("sport = :{port}");
        let deadline = Instant::now() + IPERF3_START_TIMEOUT;
        while netns.exec(&["ss", "-H", "-l", "-t", "-n", &filter])?.trim().is_empty() {
            if let Some(status) = server.0.try_wait()? {
                bail!("iperf3 --server on port {port} exited with {status} before it listened");
            }
            if Instant::now() >= deadline {
                bail!(
                    "iperf3 --server did not listen on port {port} within {} s",
                    IPERF3_START_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }
}

impl Drop for Iperf3Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Direction of the data in an iperf3 TCP test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpDirection {
    /// The client sends to the server.
    Upload,
    /// The server sends to the client (`iperf3 --reverse`).
    Download,
}

/// Runs an iperf3 TCP test between `client` and a one-shot server that it starts in
/// `server_netns` on `server`, and returns the goodput the receiving end got, in kbit/s. The
/// client binds to `bind` if given, the data flows for `seconds` after one omitted second in
/// `direction`, and `timeout` stops the client after `timeout_s` seconds.
///
/// # Errors
/// Fails if the server cannot be started, or the client fails or prints no received rate.
pub fn iperf3_tcp_goodput_kbps(
    server_netns: &Netns,
    server: SocketAddrV4,
    client: &Netns,
    bind: Option<Ipv4Addr>,
    direction: TcpDirection,
    seconds: u32,
    timeout_s: u32,
) -> Result<f64> {
    let iperf3_server = Iperf3Server::start(server_netns, server.port(), *server.ip())?;
    let (timeout, address, port) =
        (timeout_s.to_string(), server.ip().to_string(), server.port().to_string());
    let mut command = vec!["timeout", &timeout, "iperf3", "--client", &address, "--port", &port];
    let bind = bind.map(|address| address.to_string());
    if let Some(bind) = &bind {
        command.extend(["--bind", bind]);
    }
    let seconds = seconds.to_string();
    command.extend(["--time", &seconds, "--omit", "1", "--json"]);
    if direction == TcpDirection::Download {
        command.push("--reverse");
    }
    let output = client.exec(&command)?;
    drop(iperf3_server);
    let report: serde_json::Value = serde_json::from_str(&output)?;
    let bits_per_second = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no end.sum_received.bits_per_second in {output}"))?;
    Ok(bits_per_second / 1_000.0)
}
