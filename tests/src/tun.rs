//! A tun device (IFF_TUN, no packet information) in a test namespace: the test writes IP
//! packets into the node's stack through it, as a VPN or WireGuard uplink delivers them, and
//! reads what the node sends back out of it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

pub struct Tun {
    file: File,
}

impl Tun {
    /// Creates tun device `name` in `netns`, held open by the returned value (the device goes
    /// with it).
    pub fn create(netns: &Netns, name: &str) -> Result<Tun> {
        const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
        const IFF_TUN: libc::c_short = 0x0001;
        const IFF_NO_PI: libc::c_short = 0x1000;
        let file = netns.run(|| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open("/dev/net/tun")
        })??;
        // struct ifreq: the name, then the flags in the union.
        let mut request = [0u8; 40];
        request[..name.len()].copy_from_slice(name.as_bytes());
        request[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `request` is laid out as
        // and outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, request.as_mut_ptr()) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
        }
        netns.ip(&["link", "set", name, "up"])?;
        Ok(Tun { file })
    }

    /// Hands `packet` to the node's stack as if it arrived on the device.
    pub fn inject(&mut self, packet: &[u8]) -> Result<()> {
        let written = self.file.write(packet)?;
        if written != packet.len() {
            bail!("wrote {written} of {} bytes", packet.len());
        }
        Ok(())
    }

    /// The packets the node sends out of the device within `limit` that `wanted` accepts.
    pub fn sent_within(&mut self, limit: Duration, wanted: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + limit;
        let mut found = Vec::new();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            match self.file.read(&mut buf) {
                Ok(n) if wanted(&buf[..n]) => found.push(buf[..n].to_vec()),
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => break,
            }
        }
        found
    }
}
