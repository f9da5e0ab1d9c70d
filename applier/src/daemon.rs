//! The daemon: one task per peer, started and stopped as `bdr.nodes`
//! changes, all stopped by one shutdown signal.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::catalog::{self, LocalNode, Peer};
use crate::config::Settings;

/// How often the node table is read for membership changes.
const MEMBERSHIP_POLL: Duration = Duration::from_secs(2);

struct Running {
    peer: Peer,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Runs until `shutdown` turns true, then stops every peer task and waits
/// for them: each rolls back what it had not committed and reports its
/// final position.
pub async fn run(settings: Settings, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let (client, conn) = settings.local.connect(tokio_postgres::NoTls).await?;
    let conn_task = tokio::spawn(conn);
    let local =
        Arc::new(catalog::local_node(&client, &settings.node_name, settings.local.clone()).await?);
    info!(node = %local.name, node_id = format!("{:016x}", local.node_id), "applier started");
    let mut running: HashMap<String, Running> = HashMap::new();
    loop {
        match catalog::peers(&client, &local.name).await {
            Ok(peers) => reconcile(&local, peers, &mut running),
            Err(e) => warn!(error = %e, "reading bdr.nodes failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(MEMBERSHIP_POLL) => {}
            _ = shutdown.changed() => break,
        }
        if conn_task.is_finished() {
            anyhow::bail!("the local connection that watches bdr.nodes was lost");
        }
    }
    info!("shutting down");
    for (_, r) in running.drain() {
        let _ = r.stop.send(true);
        let _ = r.task.await;
    }
    Ok(())
}

/// Starts tasks for new peers, stops those of removed or changed ones.
fn reconcile(local: &Arc<LocalNode>, peers: Vec<Peer>, running: &mut HashMap<String, Running>) {
    running.retain(|name, r| {
        let keep = peers.iter().any(|p| p == &r.peer);
        if !keep {
            info!(peer = %name, "peer removed or changed; stopping its stream");
            let _ = r.stop.send(true);
        }
        keep
    });
    for peer in peers {
        if running.contains_key(&peer.name) {
            continue;
        }
        info!(peer = %peer.name, "starting stream from peer");
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(crate::peer::run(local.clone(), peer.clone(), rx));
        running.insert(peer.name.clone(), Running { peer, stop, task });
    }
}
