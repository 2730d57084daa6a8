//! `/healthz` and `/readyz` of `virtwarden operator`. Liveness is the engine's alone: an API
//! outage is no reason for the kubelet to kill a node agent that keeps enforcing the last
//! policies it saw. Readiness is honest about the API too: not ready until the first lists are
//! in, nor while the watches cannot reach the server.

use std::sync::{Arc, Mutex};

use crate::engine::EngineHandle;
use crate::http::Probes;

/// What the operator loop knows about the API: `None` when its watches are in sync.
#[derive(Debug, Clone)]
pub struct ApiHealth(Arc<Mutex<Option<String>>>);

impl Default for ApiHealth {
    fn default() -> Self {
        ApiHealth(Arc::new(Mutex::new(Some("Kubernetes API: first lists pending".into()))))
    }
}

impl ApiHealth {
    pub fn set(&self, problem: Option<String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = problem;
    }
    pub fn problem(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The engine's probes, with the API's state added to readiness only.
#[derive(Clone)]
pub struct OperatorProbes {
    pub engine: EngineHandle,
    pub api: ApiHealth,
}

impl Probes for OperatorProbes {
    async fn live(&self) -> Result<(), String> {
        self.engine.live().await
    }

    fn ready(&self) -> Result<(), String> {
        self.engine.ready()?;
        match self.api.problem() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    fn metrics(&self) -> String {
        self.engine.metrics()
    }
}
