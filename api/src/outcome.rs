//! What the VMM answers an [`ApiRequest`](crate::routes::ApiRequest) with, before any HTTP: data
//! or an error saying why. The VMM core builds these and nothing else; [`to_response`] alone
//! turns them into status codes, JSON bodies and Firecracker's `fault_message`s.

use serde::Serialize;

use crate::http::HttpResponse;
use crate::models::{
    Balloon, BalloonStats, FirecrackerVersion, FullVmConfiguration, HintingStatus, InstanceInfo,
    MachineConfiguration,
};

/// What a request that succeeded gives back.
#[derive(Clone, Debug, PartialEq)]
pub enum VmmData {
    /// Nothing to say (HTTP 204).
    Empty,
    /// `GET /`.
    InstanceInfo(InstanceInfo),
    /// `GET /version`.
    Version(FirecrackerVersion),
    /// `GET /machine-config`.
    MachineConfig(MachineConfiguration),
    /// `GET /vm/config`.
    VmConfig(Box<FullVmConfiguration>),
    /// `GET /balloon`.
    BalloonConfig(Balloon),
    /// `GET /balloon/statistics`.
    BalloonStats(Box<BalloonStats>),
    /// `GET /balloon/hinting/status`.
    BalloonHintingStatus(HintingStatus),
    /// `GET /mmds`: the document (`{}` when empty).
    MmdsValue(serde_json::Value),
}

/// Why a request was not carried out. The message is the client's `fault_message`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VmmActionError {
    /// The request cannot be carried out as asked (a bad resource, the wrong phase, a failed
    /// start): the client can fix it (HTTP 400).
    #[error("{0}")]
    Refused(String),
    /// The VMM is ending and takes no more requests (HTTP 503).
    #[error("The microVM is shutting down.")]
    ShuttingDown,
    /// The VMM did not answer in time (HTTP 504).
    #[error("The VMM did not answer in time.")]
    TimedOut,
    /// A bug in Kiln, not in the request (HTTP 500).
    #[error("internal error: {0}")]
    Internal(String),
    /// The MMDS document would outgrow its size limit (HTTP 413, as Firecracker).
    #[error("{0}")]
    PayloadTooLarge(String),
}

impl VmmActionError {
    /// A refusal with `message` as its fault message.
    pub fn refused(message: impl std::fmt::Display) -> Self {
        VmmActionError::Refused(message.to_string())
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            VmmActionError::Refused(_) => 400,
            VmmActionError::ShuttingDown => 503,
            VmmActionError::TimedOut => 504,
            VmmActionError::Internal(_) => 500,
            VmmActionError::PayloadTooLarge(_) => 413,
        }
    }
}

/// The VMM's answer to one request.
pub type VmmOutcome = Result<VmmData, VmmActionError>;

fn json<T: Serialize>(value: &T) -> HttpResponse {
    match serde_json::to_vec(value) {
        Ok(body) => HttpResponse::json(200, body),
        Err(e) => HttpResponse::fault(500, &format!("internal error: serializing the answer: {e}")),
    }
}

/// The HTTP response for `outcome`.
pub fn to_response(outcome: &VmmOutcome) -> HttpResponse {
    match outcome {
        Ok(VmmData::Empty) => HttpResponse::no_content(),
        Ok(VmmData::InstanceInfo(info)) => json(info),
        Ok(VmmData::Version(version)) => json(version),
        Ok(VmmData::MachineConfig(config)) => json(config),
        Ok(VmmData::VmConfig(config)) => json(config),
        Ok(VmmData::BalloonConfig(config)) => json(config),
        Ok(VmmData::BalloonStats(stats)) => json(stats),
        Ok(VmmData::BalloonHintingStatus(status)) => json(status),
        Ok(VmmData::MmdsValue(value)) => json(value),
        Err(e) => HttpResponse::fault(e.status(), &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault_of(response: &HttpResponse) -> String {
        let body: serde_json::Value = serde_json::from_slice(response.body().unwrap()).unwrap();
        body["fault_message"].as_str().unwrap().to_string()
    }

    #[test]
    fn each_outcome_has_its_status_and_body() {
        assert_eq!(to_response(&Ok(VmmData::Empty)).status(), 204);
        let version = to_response(&Ok(VmmData::Version(FirecrackerVersion {
            firecracker_version: "1.17.0".into(),
        })));
        assert_eq!(version.status(), 200);
        assert_eq!(
            version.body().unwrap(),
            br#"{"firecracker_version":"1.17.0"}"#
        );
        for (error, status, message) in [
            (VmmActionError::refused("no kernel"), 400, "no kernel"),
            (
                VmmActionError::ShuttingDown,
                503,
                "The microVM is shutting down.",
            ),
            (
                VmmActionError::TimedOut,
                504,
                "The VMM did not answer in time.",
            ),
            (
                VmmActionError::Internal("wrong phase".into()),
                500,
                "internal error: wrong phase",
            ),
        ] {
            let response = to_response(&Err(error));
            assert_eq!(response.status(), status);
            assert_eq!(fault_of(&response), message);
        }
    }
}
