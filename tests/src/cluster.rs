//! A control plane and a node on loopback: tether-server, tether-agent, a PKI, and a frontend
//! target, started together and stopped when dropped.

use std::time::Duration;

use anyhow::{Result, bail};

use crate::frontend::Target;
use crate::pki::Pki;
use crate::procs::{Agent, Server, wait_ready};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Grpc,
    HttpConnect,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Uds,
    Mtls,
}

pub struct Cluster {
    pub pki: Pki,
    pub server: Server,
    pub agent: Option<Agent>,
    pub target: Target,
}

impl Cluster {
    /// Server and agent, ready to tunnel.
    pub fn start(
        mode: Mode,
        transport: Transport,
        server_args: &[&str],
        agent_args: &[&str],
    ) -> Result<Self> {
        let mut cluster = Self::server_only(mode, transport, server_args)?;
        cluster.start_agent(agent_args)?;
        Ok(cluster)
    }

    /// Server alone (no agent connected).
    pub fn server_only(mode: Mode, transport: Transport, server_args: &[&str]) -> Result<Self> {
        let pki = Pki::new(&[])?;
        let server_pair = pki.pair("server");
        let uds = pki.dir().join("konnectivity-server.socket");
        let mut args: Vec<String> = vec![
            "--mode".into(),
            match mode {
                Mode::Grpc => "grpc".into(),
                Mode::HttpConnect => "http-connect".into(),
            },
            format!("--cluster-cert={}", server_pair.cert.display()),
            format!("--cluster-key={}", server_pair.key.display()),
        ];
        match transport {
            Transport::Uds => {
                args.push(format!("--uds-name={}", uds.display()));
                args.push("--server-port=0".into());
            }
            Transport::Mtls => {
                args.push(format!("--server-cert={}", server_pair.cert.display()));
                args.push(format!("--server-key={}", server_pair.key.display()));
                args.push(format!("--server-ca-cert={}", pki.ca().display()));
                args.push("--server-port=0".into());
            }
        }
        // Tests that are not about agent authentication run without it, as they always did.
        let authenticates = server_args
            .iter()
            .any(|a| a.starts_with("--cluster-ca-cert") || a.starts_with("--agent-namespace"));
        if !authenticates {
            args.push("--allow-unauthenticated-agents".into());
        }
        args.extend(server_args.iter().map(|s| s.to_string()));
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = Server::start(&arg_refs)?;
        let target = match transport {
            Transport::Uds => Target::Uds(uds),
            Transport::Mtls => match server.frontend_port {
                Some(port) => Target::tls(port, &pki, "apiserver"),
                None => bail!("server reported no TCP frontend port"),
            },
        };
        Ok(Cluster {
            pki,
            server,
            agent: None,
            target,
        })
    }

    /// Starts an agent against this server and waits until the server is ready.
    pub fn start_agent(&mut self, extra: &[&str]) -> Result<()> {
        let agent = Agent::start(&self.agent_args(extra))?;
        self.agent = Some(agent);
        if !wait_ready(self.server.health_port, Duration::from_secs(15)) {
            bail!("server never became ready after the agent started");
        }
        Ok(())
    }

    /// The arguments an agent needs to reach this server, plus `extra`.
    pub fn agent_args<'a>(&self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args: Vec<&'a str> = vec![
            leak(format!("--proxy-server-port={}", self.server.agent_port)),
            leak(format!("--ca-cert={}", self.pki.ca().display())),
            "--sync-interval=100ms",
            "--sync-interval-cap=1s",
        ];
        args.extend_from_slice(extra);
        args
    }
}

/// Test-only: argument strings that live as long as the test process.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}
