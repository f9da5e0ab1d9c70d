//! Parses arbitrary option lists: lines of `name=value`.
//!
//! Parsing must not panic, and accepted options must survive a round trip
//! through `to_pairs`.

#![no_main]

use bdr_protocol::StartupOptions;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let pairs: Vec<(&str, &str)> = text
        .lines()
        .map(|line| line.split_once('=').unwrap_or((line, "")))
        .collect();
    if let Ok(options) = StartupOptions::from_pairs(&pairs) {
        let again = options.to_pairs();
        let again: Vec<(&str, &str)> = again.iter().map(|(n, v)| (*n, v.as_str())).collect();
        assert_eq!(StartupOptions::from_pairs(&again), Ok(options.clone()));
        let _ = options.negotiate(150004);
    }
});
