//! Detaching bpf_links synchronously.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};

use aya::programs::links::{FdLink, LinkError};
use tracing::warn;

/// `bpf(2)` command numbers from uapi `linux/bpf.h`.
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Takes a link off its hook before returning.
///
/// Closing the last file descriptor of a bpf_link releases it from a kernel work queue, so the
/// program can still run for a moment after the close. `BPF_LINK_DETACH` is synchronous. A
/// link that is not a bpf_link (netlink-attached XDP on old kernels) was detached synchronously
/// when the conversion dropped it.
pub(super) fn detach_now(interface: &str, link: Result<FdLink, LinkError>) {
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

    let request = GetFdById { link_id: id, next_id: 0, open_flags: 0 };
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
    let request = LinkDetach { link_fd: fd.as_raw_fd() as u32 };
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
