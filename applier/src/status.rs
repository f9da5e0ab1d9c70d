//! `bdr-applier status`: per peer, whether this node is streaming from it,
//! what it has received and applied, and how far behind it is.
//!
//! Applied progress comes from this node's replication origin for the
//! peer; the rest from the peer itself (its `pg_stat_replication` row for
//! this node's connection, its current WAL position), so the command works
//! whether or not the daemon runs.

use std::fmt::Write;

use tokio_postgres::Client;

use crate::catalog;
use crate::config::Settings;

/// One peer's line.
#[derive(Debug, Default)]
struct PeerStatus {
    name: String,
    connected: String,
    received: String,
    applied: String,
    lag_bytes: String,
    lag_time: String,
}

async fn connect(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Prints the status table.
pub async fn run(settings: &Settings) -> anyhow::Result<String> {
    let client = connect(&settings.local).await?;
    let peers = catalog::peers(&client, &settings.node_name).await?;
    let mut lines = Vec::new();
    for peer in peers {
        let mut st = PeerStatus {
            name: peer.name.clone(),
            ..PeerStatus::default()
        };
        let applied = client
            .query_opt(
                "SELECT max(s.remote_lsn)::text FROM bdr.nodes n
                   JOIN pg_catalog.pg_replication_origin_status s
                     ON s.external_id = 'bdr_' || lpad(to_hex(n.node_id), 16, '0')
                     OR pg_catalog.starts_with(s.external_id,
                                               'bdr_' || lpad(to_hex(n.node_id), 16, '0') || '_')
                  WHERE n.node_name = $1",
                &[&peer.name],
            )
            .await?;
        st.applied = applied
            .and_then(|r| r.get::<_, Option<String>>(0))
            .unwrap_or_else(|| "-".into());
        match connect(&peer.config).await {
            Err(e) => st.connected = format!("peer unreachable: {e}"),
            Ok(remote) => fill_from_peer(&remote, &settings.node_name, &mut st).await?,
        }
        lines.push(st);
    }
    Ok(render(&lines))
}

async fn fill_from_peer(remote: &Client, local: &str, st: &mut PeerStatus) -> anyhow::Result<()> {
    let row = remote
        .query_one(
            "SELECT (SELECT sent_lsn::text FROM pg_catalog.pg_stat_replication
                      WHERE application_name = $1 LIMIT 1),
                    (SELECT coalesce(replay_lag::text, '0') FROM pg_catalog.pg_stat_replication
                      WHERE application_name = $1 LIMIT 1),
                    pg_catalog.pg_current_wal_lsn()::text",
            &[&local],
        )
        .await?;
    let sent: Option<String> = row.get(0);
    st.connected = if sent.is_some() {
        "streaming"
    } else {
        "not connected"
    }
    .into();
    st.received = sent.unwrap_or_else(|| "-".into());
    st.lag_time = row
        .get::<_, Option<String>>(1)
        .unwrap_or_else(|| "-".into());
    let current: String = row.get(2);
    if st.applied != "-" {
        let lag = remote
            .query_one(
                "SELECT pg_catalog.pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::bigint",
                &[&current, &st.applied],
            )
            .await?;
        st.lag_bytes = lag.get::<_, i64>(0).to_string();
    } else {
        st.lag_bytes = "-".into();
    }
    Ok(())
}

fn render(lines: &[PeerStatus]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<14} {:<14} {:<14} {:>12} {:>16}",
        "peer", "connected", "received", "applied", "lag bytes", "lag time"
    );
    for l in lines {
        let _ = writeln!(
            out,
            "{:<16} {:<14} {:<14} {:<14} {:>12} {:>16}",
            l.name, l.connected, l.received, l.applied, l.lag_bytes, l.lag_time
        );
    }
    if lines.is_empty() {
        out.push_str("(no peers in bdr.nodes)\n");
    }
    out
}
