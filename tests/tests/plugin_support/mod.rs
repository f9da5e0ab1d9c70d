//! Shared helpers of the plugin tests: start a node, peek a `bdr` slot
//! with startup options, decode the frames with `bdr_protocol`.

#![allow(dead_code)]

use bdr_protocol::{Datum, Message, Messages};
use bdr_tests::Node;

/// A started node with the extension installed.
pub fn started(name: &str) -> Node {
    let mut node = Node::init(name);
    node.start();
    node.safe_psql("CREATE EXTENSION bdr");
    node
}

/// The startup options of a well-behaved client, as (name, value) pairs.
pub fn client_options(node: &Node) -> Vec<(String, String)> {
    let version = node.safe_psql("SHOW server_version_num");
    [
        ("startup_version", "1"),
        ("min_proto_version", "1"),
        ("max_proto_version", "1"),
        ("node_id", "4242"),
        ("node_name", "test-client"),
        ("pg_version_num", version.as_str()),
        ("datum_formats", "text,binary"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// Options with `name` set to `value` (added or replaced).
pub fn with_option(
    mut options: Vec<(String, String)>,
    name: &str,
    value: &str,
) -> Vec<(String, String)> {
    options.retain(|(k, _)| k != name);
    options.push((name.to_owned(), value.to_owned()));
    options
}

/// The frames `pg_logical_slot_peek_binary_changes` returns for `slot`
/// with `options`, or the error text.
pub fn try_peek(
    node: &Node,
    slot: &str,
    options: &[(String, String)],
) -> Result<Vec<Vec<u8>>, String> {
    let flat: Vec<String> = options
        .iter()
        .flat_map(|(k, v)| [k.clone(), v.clone()])
        .collect();
    let mut client = node.connect();
    client
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, VARIADIC $2::text[])",
            &[&slot, &flat],
        )
        .map(|rows| rows.iter().map(|r| r.get::<_, Vec<u8>>(0)).collect())
        .map_err(|e| match e.as_db_error() {
            Some(db) => format!("{}{}", db.message(), db.hint().map(|h| format!(" HINT: {h}")).unwrap_or_default()),
            None => e.to_string(),
        })
}

/// Like [`try_peek`], panicking on error.
pub fn peek(node: &Node, slot: &str, options: &[(String, String)]) -> Vec<Vec<u8>> {
    try_peek(node, slot, options).unwrap_or_else(|e| panic!("peeking slot {slot}: {e}"))
}

/// Decodes every frame into its messages, in order; a frame must hold
/// whole messages only.
pub fn decode(frames: &[Vec<u8>]) -> Vec<Message<'_>> {
    frames
        .iter()
        .flat_map(|frame| {
            let messages: Vec<Message<'_>> = Messages::new(frame)
                .map(|m| m.unwrap_or_else(|e| panic!("malformed frame {frame:?}: {e}")))
                .collect();
            assert!(!messages.is_empty(), "an empty frame");
            messages
        })
        .collect()
}

/// The outline of each frame, `|` between frames (`SBRIIC|BUC`): how the
/// plugin grouped messages into writes.
pub fn frame_outline(frames: &[Vec<u8>]) -> String {
    frames
        .iter()
        .map(|f| outline(&decode(std::slice::from_ref(f))))
        .collect::<Vec<_>>()
        .join("|")
}

/// A one-letter-per-message outline of a stream (`SBRIC...`), for shape
/// assertions.
pub fn outline(messages: &[Message<'_>]) -> String {
    messages.iter().map(|m| m.tag() as char).collect()
}

/// A datum rendered as text for comparisons: text as is, integers in
/// decimal, binary in hex, null as `NULL`, unchanged TOAST as `TOAST`.
pub fn show(datum: &Datum<'_>) -> String {
    match datum {
        Datum::Null => "NULL".into(),
        Datum::UnchangedToast => "TOAST".into(),
        Datum::Binary(bytes) => hex(bytes),
        Datum::Text(text) => (*text).to_owned(),
        Datum::PaddedText { text, spaces } => format!("{text}{}", " ".repeat(*spaces as usize)),
        Datum::Int(v) => v.to_string(),
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Renders a tuple with [`show`].
pub fn row(tuple: &[Datum<'_>]) -> Vec<String> {
    tuple.iter().map(show).collect()
}
