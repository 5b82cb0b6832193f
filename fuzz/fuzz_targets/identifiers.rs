//! The agent-identifiers parser (`agentidentifiers` metadata, `--agent-identifiers`): any
//! string is parsed or refused without panicking; what the strict parse accepts, the
//! tolerant one accepts identically; and the identifiers answer for every host they name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::identifiers::{Identifiers, dial_host};

fuzz_target!(|query: &str| {
    let tolerant = Identifiers::parse(query);
    if let Ok(strict) = Identifiers::parse_strict(query) {
        assert_eq!(
            tolerant.as_ref().ok(),
            Some(&strict),
            "strict parse accepted what the tolerant one did not, or read it differently"
        );
    }
    let Ok(ids) = tolerant else {
        return;
    };
    for host in &ids.hosts {
        assert!(
            ids.serves(host),
            "identifiers do not serve their own host {host:?}"
        );
    }
    for address in &ids.addresses {
        let host = address.to_string();
        assert!(
            ids.serves(&host),
            "identifiers do not serve their own address {host}"
        );
    }
    let _ = ids.names_destinations();
    // The host part of a dial address, as the server's destHost strategy reads it.
    let host = dial_host(query);
    assert!(query.contains(host), "dial_host invented {host:?}");
});
