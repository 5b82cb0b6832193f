//! TLS 1.3 session tickets for the agent port, sealed with rolling keys: random ones that die
//! with the process, or ones derived from a secret file, which still open after the server
//! restarts (`--session-ticket-key-file`).
//!
//! A restarted server otherwise meets every agent with a full handshake, and in a fleet that
//! is what the reconnect storm is made of: certificate signatures and their verification on
//! both sides, for every agent at once. A ticket lets an agent resume instead.
//!
//! A resumed session skips the certificate check: its ticket carries the client certificate an
//! earlier handshake verified. Two things keep that certificate from outliving what vouched
//! for it. The ticket keys are derived from the CA file's contents too, so a server whose
//! `--cluster-ca-cert` changed cannot open tickets issued before, and those agents go through a
//! full handshake (refusing such a session only after it resumed would be too late: the
//! resumed handshake has already handed the agent a new ticket, sealed with today's keys). And
//! [`still_valid`] refuses a resumed session once a certificate in it has expired, which stays
//! true of every later ticket carrying it.
//!
//! Keys roll: the key for epoch `e` (wall-clock seconds / lifetime) is derived from the secret
//! and `e`, and a ticket opens in its own epoch and the next only. A ticket is therefore good
//! for between one and two lifetimes, on every server that holds the same secret.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, hkdf};
use rustls::pki_types::CertificateDer;
use rustls::server::ProducesTickets;

/// Fewer random bytes than this cannot be told apart from a guessable secret.
pub const MIN_SECRET_BYTES: usize = 32;

const EPOCH_LEN: usize = 8;
const NONCE_LEN: usize = aead::NONCE_LEN;

/// Why a secret file was refused; the caller names the flag and the path.
#[derive(Debug, thiserror::Error)]
pub enum TicketKeyError {
    #[error("{0}")]
    Read(std::io::Error),
    #[error(
        "{0} bytes; it needs at least {MIN_SECRET_BYTES} random bytes (e.g. `head -c 32 /dev/urandom > FILE`)"
    )]
    TooShort(usize),
    #[error(
        "group or others may read it (mode {0:o}); whoever reads it can resume as any agent, so make it 0600 or 0400"
    )]
    Exposed(u32),
}

/// Seals and opens session tickets with keys rolled from one secret and bound to one CA file.
pub struct TicketKeys {
    secret: hkdf::Prk,
    /// SHA-256 of the CA file client certificates are verified against (of nothing, when
    /// clients present none).
    anchors: digest::Digest,
    lifetime: u32,
    random: SystemRandom,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKeys")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl TicketKeys {
    /// Reads the secret from `path`; tickets live `lifetime_secs` to twice that, and open only
    /// where the CA file's contents are `anchors`.
    pub fn load(
        path: &Path,
        lifetime_secs: u32,
        anchors: &[u8],
    ) -> Result<TicketKeys, TicketKeyError> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(TicketKeyError::Read)?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(TicketKeyError::Exposed(mode & 0o7777));
        }
        let secret = std::fs::read(path).map_err(TicketKeyError::Read)?;
        if secret.len() < MIN_SECRET_BYTES {
            return Err(TicketKeyError::TooShort(secret.len()));
        }
        Ok(TicketKeys::from_secret(&secret, lifetime_secs, anchors))
    }

    /// Keys only this process holds: tickets outlive a network blip, not a restart.
    pub fn random(
        lifetime_secs: u32,
        anchors: &[u8],
    ) -> Result<TicketKeys, ring::error::Unspecified> {
        let mut secret = [0u8; MIN_SECRET_BYTES];
        SystemRandom::new().fill(&mut secret)?;
        Ok(TicketKeys::from_secret(&secret, lifetime_secs, anchors))
    }

    pub fn from_secret(secret: &[u8], lifetime_secs: u32, anchors: &[u8]) -> TicketKeys {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"tether agent-port session tickets v1");
        TicketKeys {
            secret: salt.extract(secret),
            anchors: digest::digest(&digest::SHA256, anchors),
            lifetime: lifetime_secs.max(1),
            random: SystemRandom::new(),
        }
    }

    fn epoch_now(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        now / u64::from(self.lifetime)
    }

    fn key(&self, epoch: u64) -> LessSafeKey {
        let epoch = epoch.to_be_bytes();
        let info = [epoch.as_slice(), self.anchors.as_ref()];
        let okm = self
            .secret
            .expand(&info, &aead::CHACHA20_POLY1305)
            .expect("an AEAD key is far below HKDF-SHA256's output limit");
        LessSafeKey::new(UnboundKey::from(okm))
    }

    /// `plain` sealed under `epoch`'s key: the epoch, a random nonce, then the ciphertext and
    /// its tag. The epoch is authenticated as associated data.
    fn seal(&self, epoch: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let mut ticket = Vec::with_capacity(EPOCH_LEN + NONCE_LEN + plain.len() + 16);
        ticket.extend_from_slice(&epoch.to_be_bytes());
        ticket.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.key(epoch)
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(epoch.to_be_bytes()),
                &mut body,
            )
            .ok()?;
        ticket.extend_from_slice(&body);
        Some(ticket)
    }

    /// The plaintext of a ticket sealed in epoch `now` or the one before; `None` for anything
    /// else, including every malformed or forged ticket.
    fn open(&self, now: u64, ticket: &[u8]) -> Option<Vec<u8>> {
        let (epoch, rest) = ticket.split_first_chunk::<EPOCH_LEN>()?;
        let (nonce, sealed) = rest.split_first_chunk::<NONCE_LEN>()?;
        let epoch = u64::from_be_bytes(*epoch);
        if epoch != now && epoch.checked_add(1) != Some(now) {
            return None;
        }
        let mut body = sealed.to_vec();
        let plain = self
            .key(epoch)
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(epoch.to_be_bytes()),
                &mut body,
            )
            .ok()?;
        let len = plain.len();
        body.truncate(len);
        Some(body)
    }
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(self.epoch_now(), plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(self.epoch_now(), cipher)
    }
}

/// Why a resumed session was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("it carries no client certificate")]
    NoCertificate,
    #[error("certificate {0} of its chain cannot be read")]
    Unreadable(usize),
    #[error("certificate {0} of its chain is outside its validity period")]
    OutOfValidity(usize),
}

/// Whether a resumed session whose client certificates are `chain` may go on as of `now`:
/// each of them still within its validity. The rest of the check a full handshake makes (the
/// chain up to today's CA, its signatures) is settled by the ticket keys; see the module.
pub fn still_valid(
    chain: Option<&[CertificateDer<'_>]>,
    now: x509_parser::time::ASN1Time,
) -> Result<(), Refusal> {
    let chain = chain
        .filter(|chain| !chain.is_empty())
        .ok_or(Refusal::NoCertificate)?;
    for (index, der) in chain.iter().enumerate() {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|_| Refusal::Unreadable(index))?;
        if !cert.validity().is_valid_at(now) {
            return Err(Refusal::OutOfValidity(index));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const CA: &[u8] = b"the CA file";

    #[test]
    fn a_ticket_opens_in_its_epoch_and_the_next_only() {
        let keys = TicketKeys::from_secret(SECRET, 3600, CA);
        let ticket = keys.seal(100, b"session").unwrap();
        assert_eq!(keys.open(100, &ticket).as_deref(), Some(&b"session"[..]));
        assert_eq!(keys.open(101, &ticket).as_deref(), Some(&b"session"[..]));
        assert_eq!(
            keys.open(102, &ticket),
            None,
            "two lifetimes on, it is dead"
        );
        assert_eq!(keys.open(99, &ticket), None, "a ticket from the future");
    }

    #[test]
    fn only_the_same_secret_opens_a_ticket_after_a_restart() {
        let ticket = TicketKeys::from_secret(SECRET, 3600, CA)
            .seal(7, b"session")
            .unwrap();
        let restarted = TicketKeys::from_secret(SECRET, 3600, CA);
        assert_eq!(restarted.open(7, &ticket).as_deref(), Some(&b"session"[..]));
        let other = TicketKeys::from_secret(b"another secret of thirty-two byt", 3600, CA);
        assert_eq!(other.open(7, &ticket), None);
        let rotated_ca = TicketKeys::from_secret(SECRET, 3600, b"another CA file");
        assert_eq!(
            rotated_ca.open(7, &ticket),
            None,
            "a server trusting another CA file cannot open it"
        );
    }

    #[test]
    fn forged_and_altered_tickets_do_not_open() {
        let keys = TicketKeys::from_secret(SECRET, 3600, CA);
        let ticket = keys.seal(7, b"session").unwrap();
        // Every single-bit change anywhere: the epoch, the nonce, the body, the tag.
        for i in 0..ticket.len() {
            let mut altered = ticket.clone();
            altered[i] ^= 1;
            assert_eq!(keys.open(7, &altered), None, "bit flipped in byte {i}");
            assert_eq!(keys.open(8, &altered), None, "bit flipped in byte {i}");
        }
        // Moving a ticket to another epoch changes its key and its associated data.
        let mut moved = ticket.clone();
        moved[..EPOCH_LEN].copy_from_slice(&8u64.to_be_bytes());
        assert_eq!(keys.open(8, &moved), None);
        for len in 0..ticket.len() {
            assert_eq!(keys.open(7, &ticket[..len]), None, "cut to {len} bytes");
        }
        assert_eq!(keys.open(u64::MAX, &[0xff; 64]), None);
    }

    #[test]
    fn a_secret_file_others_can_read_or_too_short_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ticket.key");
        std::fs::write(&path, SECRET).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            TicketKeys::load(&path, 3600, CA),
            Err(TicketKeyError::Exposed(0o644))
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(TicketKeys::load(&path, 3600, CA).is_ok());
        std::fs::write(&path, &SECRET[..31]).unwrap();
        assert!(matches!(
            TicketKeys::load(&path, 3600, CA),
            Err(TicketKeyError::TooShort(31))
        ));
    }

    fn certificate(not_before: i64, not_after: i64) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["agent".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(1970, 1, 1) + time_secs(not_before);
        params.not_after = rcgen::date_time_ymd(1970, 1, 1) + time_secs(not_after);
        params.self_signed(&key).unwrap().der().clone()
    }

    fn time_secs(secs: i64) -> std::time::Duration {
        std::time::Duration::from_secs(secs.unsigned_abs())
    }

    fn at(secs: i64) -> x509_parser::time::ASN1Time {
        x509_parser::time::ASN1Time::from_timestamp(secs).unwrap()
    }

    #[test]
    fn a_resumed_session_needs_every_certificate_still_valid() {
        let valid = certificate(1_000_000, 2_000_000);
        let chain = [valid.clone()];
        assert_eq!(still_valid(Some(&chain), at(1_500_000)), Ok(()));
        assert_eq!(
            still_valid(Some(&chain), at(2_000_001)),
            Err(Refusal::OutOfValidity(0)),
            "expired since the ticket was issued"
        );
        assert_eq!(
            still_valid(Some(&chain), at(999_999)),
            Err(Refusal::OutOfValidity(0))
        );
        assert_eq!(
            still_valid(None, at(1_500_000)),
            Err(Refusal::NoCertificate)
        );
        assert_eq!(
            still_valid(Some(&[]), at(1_500_000)),
            Err(Refusal::NoCertificate)
        );
        let expired_intermediate = [valid, certificate(0, 1_000)];
        assert_eq!(
            still_valid(Some(&expired_intermediate), at(1_500_000)),
            Err(Refusal::OutOfValidity(1))
        );
        let garbage = [CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])];
        assert_eq!(
            still_valid(Some(&garbage), at(1_500_000)),
            Err(Refusal::Unreadable(0))
        );
    }
}
