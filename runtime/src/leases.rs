//! Server Leases (coordination.k8s.io/v1), judged the same way by the server that culls them
//! and the agent that counts them, and the same way upstream judges them: valid while the last
//! renewal (or, never renewed, the acquisition) plus the duration lies in the future.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// Whether `lease` is valid at `now`. A Lease without either time, or without a duration,
/// is not.
pub fn valid(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else {
        return false;
    };
    let Some(last) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return false;
    };
    let Some(seconds) = spec.lease_duration_seconds else {
        return false;
    };
    last.0
        .checked_add(SignedDuration::from_secs(i64::from(seconds)))
        .is_ok_and(|until| until > now)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    use super::*;

    fn lease(renewed: Option<i64>, acquired: Option<i64>, duration: Option<i32>) -> Lease {
        let at = |s: i64| MicroTime(Timestamp::from_second(s).unwrap());
        Lease {
            spec: Some(LeaseSpec {
                renew_time: renewed.map(at),
                acquire_time: acquired.map(at),
                lease_duration_seconds: duration,
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn a_lease_is_valid_until_its_last_renewal_plus_its_duration() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert!(valid(&lease(Some(971), None, Some(30)), now));
        assert!(
            !valid(&lease(Some(970), None, Some(30)), now),
            "ends at 1000"
        );
        // The renewal, not the acquisition, counts when both are there.
        assert!(!valid(&lease(Some(900), Some(990), Some(30)), now));
        assert!(valid(&lease(None, Some(990), Some(30)), now));
        assert!(!valid(&lease(None, None, Some(30)), now));
        assert!(!valid(&lease(Some(990), None, None), now));
        assert!(!valid(&Lease::default(), now));
    }
}
