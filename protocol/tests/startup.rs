//! Startup options: the pairs round trip, bad options are refused by
//! name, and negotiation picks a version or explains why it cannot.

use bdr_protocol::{
    DatumFormats, Negotiated, PROTOCOL_VERSIONS, StartupError, StartupOptions, VersionRange,
    negotiate_version,
};

fn options() -> StartupOptions {
    StartupOptions::new(42, "node_b", 150004)
}

fn pairs_with(name: &str, value: Option<&str>) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = options()
        .to_pairs()
        .into_iter()
        .filter(|(n, _)| *n != name)
        .map(|(n, v)| (n.to_owned(), v))
        .collect();
    if let Some(value) = value {
        pairs.push((name.to_owned(), value.to_owned()));
    }
    pairs
}

#[test]
fn pairs_round_trip() {
    let mut custom = options();
    custom.forward_origins = true;
    custom.datum_formats = DatumFormats::TEXT;
    for options in [options(), custom] {
        let pairs = options.to_pairs();
        let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(n, v)| (*n, v.as_str())).collect();
        assert_eq!(StartupOptions::from_pairs(&borrowed), Ok(options));
    }
}

#[test]
fn pairs_look_like_plugin_options() {
    let pairs = options().to_pairs();
    let text: Vec<String> = pairs.iter().map(|(n, v)| format!("{n} '{v}'")).collect();
    assert_eq!(
        text.join(", "),
        "startup_version '1', min_proto_version '1', max_proto_version '2', node_id '42', \
         node_name 'node_b', pg_version_num '150004', datum_formats 'text,binary', \
         forward_origins 'false', streaming 'false'"
    );
}

#[test]
fn optional_options_have_defaults() {
    let pairs = [
        ("startup_version", "1"),
        ("min_proto_version", "1"),
        ("max_proto_version", "1"),
        ("node_id", "9"),
        ("node_name", "n"),
        ("pg_version_num", "150004"),
    ];
    let options = StartupOptions::from_pairs(&pairs).unwrap();
    assert_eq!(options.datum_formats, DatumFormats::TEXT);
    assert!(!options.forward_origins);
    assert!(!options.streaming);
}

#[test]
fn streaming_needs_protocol_version_2() {
    let mut streaming = options();
    streaming.streaming = true;
    assert_eq!(streaming.negotiate(150004).unwrap().proto_version, 2);
    let pairs = streaming.to_pairs();
    let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(n, v)| (*n, v.as_str())).collect();
    assert_eq!(StartupOptions::from_pairs(&borrowed), Ok(streaming.clone()));

    streaming.proto_versions = VersionRange { min: 1, max: 1 };
    let err = streaming.negotiate(150004).unwrap_err();
    assert_eq!(
        err.to_string(),
        "startup option \"streaming\" needs protocol version 2, but version 1 was chosen"
    );
    let pairs = pairs_with("streaming", Some("yes"));
    assert_eq!(
        StartupOptions::from_pairs(&pairs).unwrap_err().to_string(),
        "startup option \"streaming\" has invalid value \"yes\": expected true or false"
    );
}

#[test]
fn unknown_duplicate_and_missing_options_are_named() {
    let mut pairs = pairs_with("binary", Some("true"));
    let err = StartupOptions::from_pairs(&pairs).unwrap_err();
    assert_eq!(err.to_string(), "unknown startup option \"binary\"");

    pairs = pairs_with("node_id", Some("1"));
    pairs.push(("node_id".into(), "2".into()));
    assert_eq!(
        StartupOptions::from_pairs(&pairs),
        Err(StartupError::DuplicateOption {
            name: "node_id".into()
        })
    );

    let err = StartupOptions::from_pairs(&pairs_with("node_name", None)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "required startup option \"node_name\" is missing"
    );
}

#[test]
fn malformed_values_are_named() {
    let cases = [
        ("node_id", "-1"),
        ("node_id", "+1"),
        ("node_id", ""),
        ("node_id", "18446744073709551616"),
        ("min_proto_version", "4294967296"),
        ("max_proto_version", "one"),
        ("pg_version_num", "15.4"),
        ("node_name", ""),
        ("forward_origins", "yes"),
        ("datum_formats", "binary"),
        ("datum_formats", "text,text"),
        ("datum_formats", "text,json"),
        ("datum_formats", ""),
    ];
    for (name, value) in cases {
        match StartupOptions::from_pairs(&pairs_with(name, Some(value))) {
            Err(StartupError::MalformedOption {
                name: n, value: v, ..
            }) => {
                assert_eq!((n, v.as_str()), (name, value));
            }
            other => panic!("{name} = {value:?} gave {other:?}"),
        }
    }
    let err = StartupOptions::from_pairs(&pairs_with("forward_origins", Some("yes"))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "startup option \"forward_origins\" has invalid value \"yes\": expected true or false"
    );
}

#[test]
fn a_newer_startup_version_is_reported_first() {
    // Version 2 options might be named differently: report the version,
    // not the names this version does not know.
    let mut pairs = pairs_with("startup_version", Some("2"));
    pairs.push(("future_option".into(), "x".into()));
    let pairs: Vec<(&str, &str)> = pairs
        .iter()
        .filter(|(n, _)| n == "startup_version")
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let err = StartupOptions::from_pairs(&pairs).unwrap_err();
    assert_eq!(
        err.to_string(),
        "client uses startup version 2 but server supports 1..1"
    );
}

#[test]
fn version_negotiation_picks_the_highest_common_version() {
    let range = |min, max| VersionRange { min, max };
    assert_eq!(negotiate_version(range(1, 3), range(2, 5)), Ok(3));
    assert_eq!(negotiate_version(range(1, 1), range(1, 1)), Ok(1));
    let err = negotiate_version(range(2, 3), range(1, 1)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "client supports protocol versions 2..3 but server supports 1..1"
    );
    assert!(negotiate_version(range(3, 2), range(1, 5)).is_err());
}

#[test]
fn negotiation_chooses_version_and_formats() {
    assert_eq!(
        options().negotiate(150010),
        Ok(Negotiated {
            proto_version: 2,
            datum_formats: DatumFormats::TEXT.union(DatumFormats::BINARY)
        })
    );
    // Different major versions: send formats may differ, so text only.
    assert_eq!(
        options().negotiate(160002).unwrap().datum_formats,
        DatumFormats::TEXT
    );

    let mut future = options();
    future.proto_versions = VersionRange { min: 3, max: 4 };
    let err = future.negotiate(150004).unwrap_err();
    assert_eq!(
        err,
        StartupError::VersionMismatch {
            client: future.proto_versions,
            server: PROTOCOL_VERSIONS
        }
    );
    assert_eq!(
        err.to_string(),
        "client supports protocol versions 3..4 but server supports 1..2"
    );
}
