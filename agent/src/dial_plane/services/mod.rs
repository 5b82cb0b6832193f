//! The Service map the dial hooks steer by: each Service address (ClusterIP:port/protocol) and
//! its ready backends, read from `--service-map-file` and read again whenever it changes.
//!
//! One Service per line: the Service, then its backends, separated by spaces; `#` starts a
//! comment. IPv6 in brackets. A Service with no backends is listed so that dials to it are
//! refused instead of going nowhere.
//!
//! ```text
//! 10.96.0.10:53/udp 10.244.1.5:53 10.244.2.7:53
//! 10.96.14.2:443/tcp 10.244.1.9:8443 10.244.2.4:8443 10.244.3.3:8443
//! [fd00:96::10]:80/tcp [fd00:244::5]:8080
//! ```

pub mod kubernetes;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IPPROTO_ number the kernel hooks see.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

/// A Service's address as dials name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Service {
    pub addr: SocketAddr,
    pub protocol: Protocol,
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let protocol = match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        write!(f, "{}/{protocol}", self.addr)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadServiceMap {
    #[error("line {line}: {text:?} is not IP:PORT/tcp or IP:PORT/udp")]
    Service { line: usize, text: String },
    #[error("line {line}: backend {text:?} is not IP:PORT")]
    Backend { line: usize, text: String },
    #[error("line {line}: backend {backend} is not the same address family as {service}")]
    Family {
        line: usize,
        service: String,
        backend: SocketAddr,
    },
    #[error("line {line}: {service} is listed twice")]
    Twice { line: usize, service: String },
}

/// Services and their backends.
pub type ServiceMap = BTreeMap<Service, Vec<SocketAddr>>;

impl FromStr for Service {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        let (addr, protocol) = text.rsplit_once('/').ok_or(())?;
        let protocol = match protocol {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(()),
        };
        Ok(Service {
            addr: addr.parse().map_err(|_| ())?,
            protocol,
        })
    }
}

pub fn parse(text: &str) -> Result<ServiceMap, BadServiceMap> {
    let mut map = ServiceMap::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        let service: Service = first.parse().map_err(|_| BadServiceMap::Service {
            line: line_no,
            text: first.to_owned(),
        })?;
        let mut backends = Vec::new();
        for word in words {
            let backend: SocketAddr = word.parse().map_err(|_| BadServiceMap::Backend {
                line: line_no,
                text: word.to_owned(),
            })?;
            if backend.is_ipv4() != service.addr.is_ipv4() {
                return Err(BadServiceMap::Family {
                    line: line_no,
                    service: service.to_string(),
                    backend,
                });
            }
            backends.push(backend);
        }
        if map.insert(service, backends).is_some() {
            return Err(BadServiceMap::Twice {
                line: line_no,
                service: service.to_string(),
            });
        }
    }
    Ok(map)
}

/// How often the file is looked at for a change.
pub const RELOAD_EVERY: Duration = Duration::from_millis(500);

/// Notices changes to the file (modification time, length, or appearing and vanishing).
pub struct FileWatch {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
}

impl FileWatch {
    pub fn new(path: &Path) -> Self {
        FileWatch {
            path: path.to_path_buf(),
            seen: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's text when it changed since the last call (the first call always reads it).
    pub fn changed(&mut self) -> Option<std::io::Result<String>> {
        let stamp = std::fs::metadata(&self.path)
            .and_then(|m| Ok((m.modified()?, m.len())))
            .ok();
        if stamp.is_some() && stamp == self.seen {
            return None;
        }
        self.seen = stamp;
        Some(std::fs::read_to_string(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_services_backends_and_comments() {
        let map = parse(
            "# Services\n10.96.0.10:53/udp 10.244.1.5:53 10.244.2.7:53\n\n\
             10.96.14.2:443/tcp 10.244.1.9:8443  # three backends soon\n\
             [fd00:96::10]:80/tcp [fd00:244::5]:8080\n10.96.9.9:80/tcp\n",
        )
        .unwrap();
        assert_eq!(map.len(), 4);
        let dns: Service = "10.96.0.10:53/udp".parse().unwrap();
        assert_eq!(map[&dns].len(), 2);
        assert_eq!(dns.to_string(), "10.96.0.10:53/udp");
        assert!(map[&"10.96.9.9:80/tcp".parse().unwrap()].is_empty());
        assert_eq!(map[&"[fd00:96::10]:80/tcp".parse().unwrap()].len(), 1);
    }

    #[test]
    fn bad_lines_are_named() {
        assert_eq!(
            parse("10.96.0.10:53 10.0.0.1:53"),
            Err(BadServiceMap::Service {
                line: 1,
                text: "10.96.0.10:53".into()
            })
        );
        assert!(matches!(
            parse("\n10.96.0.10:53/udp pod:53"),
            Err(BadServiceMap::Backend { line: 2, .. })
        ));
        assert!(matches!(
            parse("10.96.0.10:80/tcp [fd00::1]:80"),
            Err(BadServiceMap::Family { .. })
        ));
        assert!(matches!(
            parse("10.96.0.10:80/tcp\n10.96.0.10:80/tcp 10.0.0.1:80"),
            Err(BadServiceMap::Twice { line: 2, .. })
        ));
    }
}
