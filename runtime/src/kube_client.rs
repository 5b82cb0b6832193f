//! A kube-apiserver client from a kubeconfig file, or from the pod's service account when
//! none is named: how both binaries reach the Kubernetes API.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Debug, thiserror::Error)]
pub enum KubeClientError {
    #[error("cannot read the kubeconfig")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    #[error(
        "no in-cluster service account to reach kube-apiserver with (outside a pod, name a kubeconfig)"
    )]
    InCluster(#[source] kube::config::InClusterError),
    #[error("cannot build a kube-apiserver client")]
    Client(#[source] kube::Error),
}

/// A client for the cluster `kubeconfig` names (its current context), or the in-cluster one.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, KubeClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(KubeClientError::Kubeconfig)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(KubeClientError::Kubeconfig)?
        }
        None => kube::Config::incluster().map_err(KubeClientError::InCluster)?,
    };
    kube::Client::try_from(config).map_err(KubeClientError::Client)
}

/// An API call's HTTP status and the API's reason, as the metrics label them; 0 and no
/// reason when no answer came back.
pub fn outcome<T>(result: &Result<T, kube::Error>) -> (u16, String) {
    match result {
        Ok(_) => (200, String::new()),
        Err(kube::Error::Api(status)) => (status.code, status.reason.clone()),
        Err(_) => (0, String::new()),
    }
}
