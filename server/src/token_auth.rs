//! Token authentication of agents (upstream's `--agent-namespace` mode): the bearer token each
//! `Connect` carries goes to kube-apiserver as a TokenReview for the configured audience, and
//! only the configured service account gets in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;

use crate::config::TokenAuthSettings;
use crate::metrics::Metrics;
use crate::review_store::{self, Question, Remembered};

/// An agent whose review could not start within this is refused at once (and retries with
/// its backoff) rather than waiting past its own 30 s timeout for an answer it would ignore.
const REVIEW_DEADLINE: Duration = Duration::from_secs(10);
/// A source address none of whose reviews succeeded lately waits at most this long for a
/// turn: strangers never queue so deep that an agent that already proved itself waits
/// behind them past its deadline.
const STRANGER_DEADLINE: Duration = Duration::from_secs(2);
/// Reviews one peer address may have queued or in flight: an agent needs one at a time.
const PER_PEER: usize = 4;
/// A source whose review succeeded counts as proven this long.
const PROVEN_FOR: Duration = Duration::from_secs(3600);
/// Failed reviews a source may have in a burst; past it, one more each [`FAILURE_REFILL`].
/// An agent with a bad token retries far slower than that; a source that sends junk tokens
/// is held to it, so sixteen of them together cannot take kube-apiserver's reviews from the
/// rest.
const FAILURE_BURST: f64 = 8.0;
const FAILURE_REFILL: Duration = Duration::from_secs(5);
/// A token kube-apiserver refused is refused again without asking for this long.
const REFUSED_FOR: Duration = Duration::from_secs(10);
/// Source addresses remembered at once (their standing, not their tokens).
const SOURCES: usize = 65_536;
/// Reviews in flight toward kube-apiserver at once.
const IN_FLIGHT: usize = 32;
/// Tokens remembered at once; past it, reviews are not cached until entries expire.
const CACHE_ENTRIES: usize = 16_384;
/// How often new answers go to `--token-review-cache-file`: a server killed outright loses
/// at most this much of them, and its agents reviewed in that time are reviewed again.
const SAVE_EVERY: Duration = Duration::from_secs(2);

/// The `extra` keys kube-apiserver sets for tokens bound to a pod.
const EXTRA_NODE: &str = "authentication.kubernetes.io/node-name";
const EXTRA_POD: &str = "authentication.kubernetes.io/pod-name";

pub struct TokenAuth {
    reviews: Api<TokenReview>,
    nodes: Api<Node>,
    namespace: String,
    service_account: String,
    audience: String,
    /// A successful review is reused until the token expires, and at most this long (so a
    /// deleted service account is noticed): `--token-review-cache-ttl`.
    cache_ttl: Duration,
    limiter: Limiter,
    in_flight: Semaphore,
    peers: PeerSlots,
    cache: Mutex<Cache<Authenticated>>,
    /// `--token-review-cache-file`, where `cache` outlives the process.
    store: Option<PathBuf>,
    /// Answers added to `cache` so far: the store is written when this moves.
    answers: AtomicU64,
    /// Digests of tokens kube-apiserver just refused.
    refused: Mutex<Cache<()>>,
    sources: Mutex<Sources>,
    metrics: Arc<Metrics>,
}

/// What the server has seen of each source address's reviews lately.
#[derive(Default)]
struct Sources(HashMap<IpAddr, Standing>);

#[derive(Clone, Copy)]
struct Standing {
    /// A review from it succeeded, so it is served before strangers until then.
    proven_until: Option<Instant>,
    /// Failures it may still have (a bucket of [`FAILURE_BURST`]), as of `at`.
    failures_left: f64,
    at: Instant,
}

impl Standing {
    fn failures_left(&self, now: Instant) -> f64 {
        let refilled = now.duration_since(self.at).as_secs_f64() / FAILURE_REFILL.as_secs_f64();
        (self.failures_left + refilled).min(FAILURE_BURST)
    }
}

impl Sources {
    /// Whether `source` may have a review now, and how long it may wait for a turn.
    fn admit(&self, source: IpAddr, now: Instant) -> Result<Duration, AuthError> {
        let Some(standing) = self.0.get(&source) else {
            return Ok(STRANGER_DEADLINE);
        };
        let left = standing.failures_left(now);
        if left < 1.0 {
            return Err(AuthError::Failing(FAILURE_REFILL.mul_f64(1.0 - left)));
        }
        if standing.proven_until.is_some_and(|until| until > now) {
            Ok(REVIEW_DEADLINE)
        } else {
            Ok(STRANGER_DEADLINE)
        }
    }

    fn record(&mut self, source: IpAddr, succeeded: bool, now: Instant) {
        if self.0.len() >= SOURCES && !self.0.contains_key(&source) {
            self.0.retain(|_, s| {
                s.failures_left(now) < FAILURE_BURST
                    || s.proven_until.is_some_and(|until| until > now)
            });
            if self.0.len() >= SOURCES {
                return;
            }
        }
        let standing = self.0.entry(source).or_insert(Standing {
            proven_until: None,
            failures_left: FAILURE_BURST,
            at: now,
        });
        standing.failures_left = standing.failures_left(now);
        standing.at = now;
        if succeeded {
            standing.proven_until = Some(now + PROVEN_FOR);
        } else {
            standing.failures_left -= 1.0;
        }
    }
}

/// Why an agent's token was refused; the text goes to the log and to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "no authorization metadata: token authentication is on, so the agent must send its service-account token (--service-account-token-path)"
    )]
    Missing,
    #[error("{0} authorization values; expected one")]
    Several(usize),
    #[error("authorization metadata is not \"Bearer <token>\"")]
    NotBearer,
    #[error("TokenReview against kube-apiserver failed: {0}")]
    Api(#[source] kube::Error),
    #[error("TokenReview against kube-apiserver took longer than {0:?}")]
    Timeout(Duration),
    #[error("too many TokenReviews waiting (the next free turn is {0:?} away); retry with backoff")]
    Busy(Duration),
    #[error("{0} TokenReviews from this address are already queued or in flight")]
    PeerBusy(usize),
    #[error("too many TokenReviews from this address failed lately; the next is taken in {0:?}")]
    Failing(Duration),
    #[error("kube-apiserver refused this token moments ago")]
    RecentlyRefused,
    #[error("cannot read node {node:?} to check the agent's addresses: {source}")]
    Node {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("TokenReview says: {0}")]
    Review(String),
    #[error("kube-apiserver did not authenticate the token for audience {0:?}")]
    NotAuthenticated(String),
    #[error(
        "TokenReview authenticated the token but not for audience {wanted:?} (its audiences: {got:?}); \
         the agent's token must be projected for --authentication-audience"
    )]
    WrongAudience { wanted: String, got: Vec<String> },
    #[error("token belongs to {user:?}, not system:serviceaccount:{namespace}:{service_account}")]
    WrongAccount {
        user: String,
        namespace: String,
        service_account: String,
    },
}

impl AuthError {
    /// Refusals that say nothing about the token: the agent should retry.
    pub fn is_overload(&self) -> bool {
        matches!(
            self,
            AuthError::Busy(_)
                | AuthError::PeerBusy(_)
                | AuthError::Timeout(_)
                | AuthError::Failing(_)
        )
    }

    /// A verdict on the token itself (not on the server's load or kube-apiserver's health),
    /// which counts against the address that sent it.
    fn blames_the_token(&self) -> bool {
        matches!(
            self,
            AuthError::Review(_)
                | AuthError::NotAuthenticated(_)
                | AuthError::WrongAudience { .. }
                | AuthError::WrongAccount { .. }
        )
    }
}

/// Who kube-apiserver says a token belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    pub user: String,
    /// The node of the pod the token is bound to (projected tokens, Kubernetes 1.30+).
    pub node: Option<String>,
    pub pod: Option<String>,
}

impl TokenAuth {
    pub fn new(settings: &TokenAuthSettings, client: kube::Client, metrics: Arc<Metrics>) -> Self {
        let auth = TokenAuth {
            reviews: Api::all(client.clone()),
            nodes: Api::all(client),
            namespace: settings.namespace.clone(),
            service_account: settings.service_account.clone(),
            audience: settings.audience.clone(),
            cache_ttl: settings.cache_ttl,
            limiter: Limiter::new(settings.qps, settings.burst),
            in_flight: Semaphore::new(IN_FLIGHT),
            peers: PeerSlots::default(),
            cache: Mutex::new(Cache::default()),
            store: settings.cache_file.clone(),
            answers: AtomicU64::new(0),
            refused: Mutex::new(Cache::default()),
            sources: Mutex::new(Sources::default()),
            metrics,
        };
        auth.restore();
        auth
    }

    fn question(&self) -> Question {
        Question {
            account: format!(
                "system:serviceaccount:{}:{}",
                self.namespace, self.service_account
            ),
            audience: self.audience.clone(),
        }
    }

    /// Takes back what the store remembers. A store that cannot be read costs reviews, not
    /// the start: the server then reviews every agent again and writes the file anew.
    fn restore(&self) {
        let Some(path) = &self.store else { return };
        let (now, wall) = (Instant::now(), SystemTime::now());
        let loaded = review_store::load(path, &self.question(), wall, self.cache_ttl);
        let (remembered, dropped) = match loaded {
            Ok(loaded) => loaded,
            Err(err) => {
                tracing::warn!(error = %err, "not reusing earlier TokenReview answers; every agent is reviewed again");
                return;
            }
        };
        let mut cache = lock(&self.cache);
        for entry in &remembered {
            let left = entry.until.duration_since(wall).unwrap_or_default();
            let who = Authenticated {
                user: entry.user.clone(),
                node: entry.node.clone(),
                pod: entry.pod.clone(),
            };
            cache.insert(&entry.digest, who, now + left, now);
        }
        tracing::info!(
            file = %path.display(),
            restored = remembered.len(),
            dropped,
            "reusing TokenReview answers from before the restart"
        );
    }

    /// Writes the cache to `--token-review-cache-file` whenever it gained answers, and once
    /// more when `stop` fires. Returns at once without a file.
    pub async fn keep_answers(self: Arc<Self>, stop: CancellationToken) {
        if self.store.is_none() {
            return;
        }
        let mut saved = 0;
        loop {
            let stopping = tokio::select! {
                () = tokio::time::sleep(SAVE_EVERY) => false,
                () = stop.cancelled() => true,
            };
            let answers = self.answers.load(Ordering::Relaxed);
            if answers != saved {
                let auth = self.clone();
                if let Ok(true) = tokio::task::spawn_blocking(move || auth.save()).await {
                    saved = answers;
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Whether the store now holds every answer the cache has.
    fn save(&self) -> bool {
        let Some(path) = &self.store else {
            return true;
        };
        let (now, wall) = (Instant::now(), SystemTime::now());
        let entries: Vec<Remembered> = lock(&self.cache)
            .0
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(digest, (who, until))| Remembered {
                digest: digest.clone(),
                user: who.user.clone(),
                node: who.node.clone(),
                pod: who.pod.clone(),
                until: wall + until.duration_since(now),
            })
            .collect();
        match review_store::save(path, &self.question(), &entries) {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(error = %err, "TokenReview answers not kept for the next start; retrying");
                false
            }
        }
    }

    /// Checks the `authorization` metadata of a `Connect` from `peer`.
    pub async fn authenticate(
        &self,
        metadata: &MetadataMap,
        peer: Option<IpAddr>,
    ) -> Result<Authenticated, AuthError> {
        let values: Vec<_> = metadata.get_all("authorization").iter().collect();
        let value = match values.as_slice() {
            [] => return Err(AuthError::Missing),
            [value] => value,
            several => return Err(AuthError::Several(several.len())),
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(AuthError::NotBearer)?;
        let key = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let cached = lock(&self.cache).get(key.as_ref(), Instant::now());
        let who = match cached {
            Some(who) => {
                self.metrics.token_review("cached");
                who
            }
            None => {
                if lock(&self.refused)
                    .get(key.as_ref(), Instant::now())
                    .is_some()
                {
                    self.metrics.token_review("refused_again");
                    return Err(AuthError::RecentlyRefused);
                }
                let reviewed = self
                    .review(token, peer)
                    .await
                    .and_then(|who| self.check_account(who));
                let now = Instant::now();
                if let Some(peer) = peer {
                    match &reviewed {
                        Ok(_) => lock(&self.sources).record(peer, true, now),
                        Err(err) if err.blames_the_token() => {
                            lock(&self.sources).record(peer, false, now);
                        }
                        Err(_) => {}
                    }
                }
                let who = reviewed.inspect_err(|err| {
                    if err.blames_the_token() {
                        lock(&self.refused).insert(key.as_ref(), (), now + REFUSED_FOR, now);
                    }
                    self.metrics.token_review(if err.is_overload() {
                        "refused_busy"
                    } else {
                        "failed"
                    });
                })?;
                self.metrics.token_review("reviewed");
                let ttl = token_lifetime(token)
                    .unwrap_or(self.cache_ttl)
                    .min(self.cache_ttl);
                if !ttl.is_zero() {
                    lock(&self.cache).insert(key.as_ref(), who.clone(), now + ttl, now);
                    self.answers.fetch_add(1, Ordering::Relaxed);
                }
                who
            }
        };
        // Only reviews of the configured account are cached, so a cached answer is one too.
        Ok(who)
    }

    /// Only the configured service account gets in.
    fn check_account(&self, who: Authenticated) -> Result<Authenticated, AuthError> {
        let parts: Vec<&str> = who.user.split(':').collect();
        if parts
            != [
                "system",
                "serviceaccount",
                &self.namespace,
                &self.service_account,
            ]
        {
            return Err(AuthError::WrongAccount {
                user: who.user,
                namespace: self.namespace.clone(),
                service_account: self.service_account.clone(),
            });
        }
        Ok(who)
    }

    /// The Nodes, through the same client (for `nodes`, which lists and watches them).
    pub fn node_api(&self) -> Api<Node> {
        self.nodes.clone()
    }

    /// The addresses kube-apiserver lists for `node` (needs `get` on nodes).
    pub async fn node_addresses(&self, node: &str) -> Result<Vec<IpAddr>, AuthError> {
        let read = tokio::time::timeout(REVIEW_DEADLINE, self.nodes.get(node))
            .await
            .map_err(|_| AuthError::Timeout(REVIEW_DEADLINE))?
            .map_err(|source| AuthError::Node {
                node: node.to_owned(),
                source,
            })?;
        Ok(crate::nodes::addresses_of(&read))
    }

    /// One TokenReview, within this peer's share and standing and the deadline.
    async fn review(&self, token: &str, peer: Option<IpAddr>) -> Result<Authenticated, AuthError> {
        let (_slot, patience) = match peer {
            Some(peer) => {
                let slot = self.peers.take(peer).ok_or(AuthError::PeerBusy(PER_PEER))?;
                let patience = lock(&self.sources).admit(peer, Instant::now())?;
                (Some(slot), patience)
            }
            None => (None, REVIEW_DEADLINE),
        };
        let started = Instant::now();
        let turn = async {
            self.limiter.wait(patience).await?;
            self.in_flight
                .acquire()
                .await
                .map_err(|_| AuthError::Timeout(REVIEW_DEADLINE))
        };
        let _in_flight = tokio::time::timeout(REVIEW_DEADLINE, turn)
            .await
            .map_err(|_| AuthError::Timeout(REVIEW_DEADLINE))??;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let left = REVIEW_DEADLINE.saturating_sub(started.elapsed());
        let reviewed =
            tokio::time::timeout(left, self.reviews.create(&PostParams::default(), &review))
                .await
                .map_err(|_| AuthError::Timeout(REVIEW_DEADLINE))?
                .map_err(AuthError::Api)?;
        let status = reviewed.status.unwrap_or_default();
        if let Some(error) = status.error.filter(|e| !e.is_empty()) {
            return Err(AuthError::Review(error));
        }
        if status.authenticated != Some(true) {
            return Err(AuthError::NotAuthenticated(self.audience.clone()));
        }
        // An authenticator that ignores the requested audience answers with none (or with its
        // own): the token was then checked against kube-apiserver's audience, and any of the
        // service account's tokens, one meant for the API itself included, would pass.
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return Err(AuthError::WrongAudience {
                wanted: self.audience.clone(),
                got: audiences,
            });
        }
        let user = status.user.unwrap_or_default();
        let extra = |key: &str| {
            user.extra
                .as_ref()
                .and_then(|extra| extra.get(key))
                .and_then(|values| values.first())
                .cloned()
        };
        Ok(Authenticated {
            node: extra(EXTRA_NODE),
            pod: extra(EXTRA_POD),
            user: user.username.unwrap_or_default(),
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How long until a JWT's `exp`, read without checking the signature: kube-apiserver has just
/// vouched for the token, this only bounds how long that answer is reused.
fn token_lifetime(token: &str) -> Option<Duration> {
    let payload = token.split('.').nth(1)?;
    let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&claims).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some(Duration::from_secs(exp.checked_sub(now)?))
}

/// Review outcomes by token digest, each until its own expiry: who succeeded, and (`()`)
/// which tokens were just refused.
struct Cache<T>(HashMap<Vec<u8>, (T, Instant)>);

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Cache(HashMap::new())
    }
}

impl<T: Clone> Cache<T> {
    fn get(&mut self, key: &[u8], now: Instant) -> Option<T> {
        match self.0.get(key) {
            Some((who, until)) if *until > now => Some(who.clone()),
            Some(_) => {
                self.0.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: &[u8], who: T, until: Instant, now: Instant) {
        if until <= now {
            return;
        }
        if self.0.len() >= CACHE_ENTRIES {
            self.0.retain(|_, (_, until)| *until > now);
            if self.0.len() >= CACHE_ENTRIES {
                return;
            }
        }
        self.0.insert(key.to_vec(), (who, until));
    }
}

/// Reviews queued or in flight per peer address.
#[derive(Default)]
struct PeerSlots(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl PeerSlots {
    fn take(&self, peer: IpAddr) -> Option<PeerSlot> {
        let mut peers = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let taken = peers.entry(peer).or_default();
        if *taken >= PER_PEER {
            return None;
        }
        *taken += 1;
        Some(PeerSlot {
            peers: self.0.clone(),
            peer,
        })
    }
}

struct PeerSlot {
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    peer: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(taken) = peers.get_mut(&self.peer) {
            *taken -= 1;
            if *taken == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

/// A token bucket, as client-go rate-limits its requests: `burst` at once, then `qps` per
/// second. A caller whose turn is further away than its deadline is refused without taking a
/// turn, and one that gives up while waiting hands its turn back.
struct Limiter {
    qps: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    fn new(qps: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Limiter {
            qps,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (f64, Instant)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn wait(&self, deadline: Duration) -> Result<(), AuthError> {
        let delay = {
            let mut state = self.lock();
            let (tokens, last) = &mut *state;
            let now = Instant::now();
            *tokens =
                (*tokens + now.duration_since(*last).as_secs_f64() * self.qps).min(self.burst);
            *last = now;
            let owed = 1.0 - *tokens;
            let delay = if owed <= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(owed / self.qps)
            };
            if delay > deadline {
                return Err(AuthError::Busy(delay));
            }
            // Reserve the turn now, even if it is owed: later callers queue behind.
            *tokens -= 1.0;
            delay
        };
        if !delay.is_zero() {
            let mut reservation = Reservation {
                limiter: self,
                reached: false,
            };
            tokio::time::sleep(delay).await;
            reservation.reached = true;
        }
        Ok(())
    }
}

/// A turn taken but not yet reached; dropped (the caller gave up), it is handed back.
struct Reservation<'a> {
    limiter: &'a Limiter,
    reached: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.reached {
            let mut state = self.limiter.lock();
            state.0 = (state.0 + 1.0).min(self.limiter.burst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn limiter_lets_a_burst_through_then_paces() {
        let limiter = Limiter::new(5.0, 2);
        let start = Instant::now();
        limiter.wait(LONG).await.unwrap();
        limiter.wait(LONG).await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO);
        limiter.wait(LONG).await.unwrap();
        let third = start.elapsed();
        assert!(
            third >= Duration::from_millis(199) && third <= Duration::from_millis(201),
            "{third:?}"
        );
        limiter.wait(LONG).await.unwrap();
        let fourth = start.elapsed();
        assert!(
            fourth >= Duration::from_millis(399) && fourth <= Duration::from_millis(401),
            "{fourth:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn limiter_refuses_past_the_deadline_without_taking_a_turn() {
        let limiter = Limiter::new(1.0, 1);
        limiter.wait(LONG).await.unwrap();
        // The next turn is 1 s away: past a 500 ms deadline.
        assert!(matches!(
            limiter.wait(Duration::from_millis(500)).await,
            Err(AuthError::Busy(_))
        ));
        let start = Instant::now();
        limiter.wait(LONG).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_gives_up_hands_its_turn_back() {
        let limiter = Limiter::new(1.0, 1);
        limiter.wait(LONG).await.unwrap();
        for _ in 0..10 {
            let gave_up = tokio::time::timeout(Duration::from_millis(10), limiter.wait(LONG)).await;
            assert!(gave_up.is_err());
        }
        // Ten abandoned turns do not push the next caller ten seconds back.
        let start = Instant::now();
        limiter.wait(LONG).await.unwrap();
        assert!(
            start.elapsed() <= Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_peer_holds_at_most_its_share_until_it_lets_go() {
        let slots = PeerSlots::default();
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let held: Vec<_> = (0..PER_PEER).map(|_| slots.take(peer).unwrap()).collect();
        assert!(slots.take(peer).is_none());
        assert!(slots.take(other).is_some());
        drop(held);
        assert!(slots.take(peer).is_some());
    }

    #[test]
    fn cached_reviews_expire() {
        let mut cache = Cache::default();
        let now = Instant::now();
        let who = Authenticated {
            user: "u".into(),
            node: None,
            pod: None,
        };
        cache.insert(b"k", who.clone(), now + Duration::from_secs(5), now);
        assert_eq!(cache.get(b"k", now + Duration::from_secs(4)), Some(who));
        assert_eq!(cache.get(b"k", now + Duration::from_secs(5)), None);
        cache.insert(
            b"gone",
            Authenticated {
                user: "v".into(),
                node: None,
                pod: None,
            },
            now,
            now,
        );
        assert_eq!(cache.get(b"gone", now), None);
    }

    #[test]
    fn a_source_that_keeps_failing_is_held_back_and_a_proven_one_waits_longer() {
        let mut sources = Sources::default();
        let (junk, honest): (IpAddr, IpAddr) =
            ("10.0.0.66".parse().unwrap(), "10.0.0.5".parse().unwrap());
        let now = Instant::now();
        assert_eq!(sources.admit(junk, now).unwrap(), STRANGER_DEADLINE);
        for _ in 0..8 {
            assert!(sources.admit(junk, now).is_ok());
            sources.record(junk, false, now);
        }
        let Err(AuthError::Failing(wait)) = sources.admit(junk, now) else {
            panic!("a ninth failure in a row was let through");
        };
        assert_eq!(wait, FAILURE_REFILL);
        assert!(
            sources.admit(junk, now + FAILURE_REFILL).is_ok(),
            "it refills"
        );

        sources.record(honest, true, now);
        assert_eq!(sources.admit(honest, now).unwrap(), REVIEW_DEADLINE);
        assert_eq!(
            sources.admit(honest, now + PROVEN_FOR).unwrap(),
            STRANGER_DEADLINE,
            "proof lapses"
        );
    }

    #[test]
    fn token_lifetime_reads_exp() {
        let in_an_hour = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("{{\"exp\":{in_an_hour}}}"));
        let lifetime = token_lifetime(&format!("e30.{claims}.sig")).unwrap();
        assert!(lifetime > Duration::from_secs(3590) && lifetime <= Duration::from_secs(3600));
        let expired = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("{\"exp\":1}");
        assert_eq!(token_lifetime(&format!("e30.{expired}.sig")), None);
        assert_eq!(token_lifetime("not-a-jwt"), None);
    }
}
