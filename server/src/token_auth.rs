//! Token authentication of agents (upstream's `--agent-namespace` mode): the bearer token each
//! `Connect` carries goes to kube-apiserver as a TokenReview for the configured audience, and
//! only the configured service account gets in.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;

use crate::config::TokenAuthSettings;

pub struct TokenAuth {
    reviews: Api<TokenReview>,
    namespace: String,
    service_account: String,
    audience: String,
    limiter: Limiter,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot read --kubeconfig")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    #[error(
        "no in-cluster service account to reach kube-apiserver with; set --kubeconfig for token authentication"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot build a kube-apiserver client")]
    Client(#[source] kube::Error),
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
    #[error("TokenReview says: {0}")]
    Review(String),
    #[error("kube-apiserver did not authenticate the token for audience {0:?}")]
    NotAuthenticated(String),
    #[error("token belongs to {user:?}, not system:serviceaccount:{namespace}:{service_account}")]
    WrongAccount {
        user: String,
        namespace: String,
        service_account: String,
    },
}

impl TokenAuth {
    pub async fn new(settings: &TokenAuthSettings) -> Result<Self, SetupError> {
        let config = match &settings.kubeconfig {
            Some(path) => {
                let kubeconfig = Kubeconfig::read_from(path).map_err(SetupError::Kubeconfig)?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await
                    .map_err(SetupError::Kubeconfig)?
            }
            None => kube::Config::incluster().map_err(SetupError::InCluster)?,
        };
        let client = kube::Client::try_from(config).map_err(SetupError::Client)?;
        Ok(TokenAuth {
            reviews: Api::all(client),
            namespace: settings.namespace.clone(),
            service_account: settings.service_account.clone(),
            audience: settings.audience.clone(),
            limiter: Limiter::new(settings.qps, settings.burst),
        })
    }

    /// Checks the `authorization` metadata of a `Connect`; returns the authenticated user.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<String, AuthError> {
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
        self.limiter.wait().await;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviewed = self
            .reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(AuthError::Api)?;
        let status = reviewed.status.unwrap_or_default();
        if let Some(error) = status.error.filter(|e| !e.is_empty()) {
            return Err(AuthError::Review(error));
        }
        if status.authenticated != Some(true) {
            return Err(AuthError::NotAuthenticated(self.audience.clone()));
        }
        let user = status.user.and_then(|u| u.username).unwrap_or_default();
        let parts: Vec<&str> = user.split(':').collect();
        if parts
            != [
                "system",
                "serviceaccount",
                &self.namespace,
                &self.service_account,
            ]
        {
            return Err(AuthError::WrongAccount {
                user,
                namespace: self.namespace.clone(),
                service_account: self.service_account.clone(),
            });
        }
        Ok(user)
    }
}

/// A token bucket, as client-go rate-limits its requests: `burst` at once, then `qps` per
/// second. Callers past the bucket wait their turn instead of failing.
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

    async fn wait(&self) {
        let delay = {
            let mut state = self.state.lock().await;
            let (tokens, last) = &mut *state;
            let now = Instant::now();
            *tokens =
                (*tokens + now.duration_since(*last).as_secs_f64() * self.qps).min(self.burst);
            *last = now;
            // Reserve the token now, even if it is owed: later callers queue behind.
            *tokens -= 1.0;
            if *tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-*tokens / self.qps)
            }
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limiter_lets_a_burst_through_then_paces() {
        let limiter = Limiter::new(5.0, 2);
        let start = Instant::now();
        limiter.wait().await;
        limiter.wait().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        limiter.wait().await;
        let third = start.elapsed();
        assert!(
            third >= Duration::from_millis(199) && third <= Duration::from_millis(201),
            "{third:?}"
        );
        limiter.wait().await;
        let fourth = start.elapsed();
        assert!(
            fourth >= Duration::from_millis(399) && fourth <= Duration::from_millis(401),
            "{fourth:?}"
        );
    }
}
