//! Certificates made per test: a CA, a server certificate for loopback, and client
//! certificates for the agent and for the kube-apiserver frontend. Named files in a temporary
//! directory that is removed with the fixture.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

pub struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate made to fail its validity check.
#[derive(Clone, Copy, Debug)]
pub enum Validity {
    /// Valid in 2000 only.
    Expired,
    /// Valid from 2090.
    NotYetValid,
    /// Valid now, and for this long from now only.
    ExpiresIn(std::time::Duration),
}

/// A certificate and its key on disk.
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Pki {
    /// A CA plus `server` (for localhost, 127.0.0.1, ::1 and `extra_sans`), `agent` and
    /// `apiserver` client certificates, and an unrelated `stranger` CA and client.
    pub fn new(extra_sans: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tether test CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem())?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut sans = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        sans.extend(extra_sans.iter().map(|s| s.to_string()));
        leaf(
            dir.path(),
            "server",
            &issuer,
            &sans,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        leaf(
            dir.path(),
            "agent",
            &issuer,
            &["agent".to_owned()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        leaf(
            dir.path(),
            "apiserver",
            &issuer,
            &["apiserver".to_owned()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;

        let other_key = KeyPair::generate()?;
        let mut other_params = CertificateParams::new(Vec::<String>::new())?;
        other_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        other_params
            .distinguished_name
            .push(DnType::CommonName, "some other CA");
        let other = other_params.self_signed(&other_key)?;
        std::fs::write(dir.path().join("stranger-ca.pem"), other.pem())?;
        let other_issuer = Issuer::new(other_params, other_key);
        leaf(
            dir.path(),
            "stranger",
            &other_issuer,
            &["stranger".to_owned()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        Ok(Pki { dir, issuer })
    }

    /// A further client certificate, `name` (its common name) for `sans` (DNS names or IP
    /// addresses), such as a node's agent certificate.
    pub fn client(&self, name: &str, sans: &[&str]) -> Result<Pair> {
        self.further(name, sans, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn further(&self, name: &str, sans: &[&str], usage: ExtendedKeyUsagePurpose) -> Result<Pair> {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        leaf(self.dir.path(), name, &self.issuer, &sans, usage)?;
        Ok(self.pair(name))
    }

    /// A further server certificate, `name`, with the `server` certificate's names: what a
    /// renewal puts in its place.
    pub fn server(&self, name: &str) -> Result<Pair> {
        self.server_for(name, &["localhost", "127.0.0.1", "::1"])
    }

    /// A further server certificate, `name`, for `sans` (DNS names or IP addresses).
    pub fn server_for(&self, name: &str, sans: &[&str]) -> Result<Pair> {
        self.further(name, sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A certificate `name` from this CA that is valid only as `validity` says: for a server
    /// (the `server` certificate's names) or for a client (`sans`).
    pub fn outside_validity(&self, name: &str, validity: Validity, server: bool) -> Result<Pair> {
        let (sans, usage) = if server {
            (
                vec![
                    "localhost".to_owned(),
                    "127.0.0.1".to_owned(),
                    "::1".to_owned(),
                ],
                ExtendedKeyUsagePurpose::ServerAuth,
            )
        } else {
            (vec![name.to_owned()], ExtendedKeyUsagePurpose::ClientAuth)
        };
        leaf_valid(
            self.dir.path(),
            name,
            &self.issuer,
            &sans,
            usage,
            Some(validity),
        )?;
        Ok(self.pair(name))
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn pair(&self, name: &str) -> Pair {
        Pair {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}-key.pem")),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn leaf(
    dir: &Path,
    name: &str,
    issuer: &Issuer<'_, KeyPair>,
    sans: &[String],
    usage: ExtendedKeyUsagePurpose,
) -> Result<()> {
    leaf_valid(dir, name, issuer, sans, usage, None)
}

fn leaf_valid(
    dir: &Path,
    name: &str,
    issuer: &Issuer<'_, KeyPair>,
    sans: &[String],
    usage: ExtendedKeyUsagePurpose,
    validity: Option<Validity>,
) -> Result<()> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = sans
        .iter()
        .map(|san| match san.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(san.clone().try_into()?)),
        })
        .collect::<Result<_>>()?;
    params.extended_key_usages = vec![usage];
    match validity {
        Some(Validity::Expired) => {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        Some(Validity::NotYetValid) => {
            params.not_before = rcgen::date_time_ymd(2090, 1, 1);
            params.not_after = rcgen::date_time_ymd(2091, 1, 1);
        }
        Some(Validity::ExpiresIn(left)) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(1970, 1, 1) + (now + left);
        }
        None => {}
    }
    let cert = params.signed_by(&key, issuer)?;
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
    std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem())?;
    Ok(())
}
