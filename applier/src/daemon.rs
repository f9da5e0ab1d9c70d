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
    let mut watcher = Watcher::connect(&settings).await?;
    let mut local =
        catalog::local_node(&watcher.client, &settings.node_name, settings.local.clone()).await?;
    local.apply_pipeline = settings.apply_pipeline;
    local.parallel_apply = settings.parallel_apply;
    let local = Arc::new(local);
    info!(
        node = %local.name,
        node_id = format!("{:016x}", local.node_id),
        pipeline = local.apply_pipeline,
        parallel = local.parallel_apply,
        "applier started"
    );
    let mut running: HashMap<String, Running> = HashMap::new();
    loop {
        if watcher.lost() {
            // The local server restarted: peer tasks retry on their own;
            // membership is read again once a connection is back.
            match Watcher::connect(&settings).await {
                Ok(w) => watcher = w,
                Err(e) => warn!(error = %e, "reconnecting to the local database failed"),
            }
        }
        if !watcher.lost() {
            match catalog::peers(&watcher.client, &local.name).await {
                Ok(peers) => reconcile(&local, peers, &mut running),
                Err(e) => warn!(error = %e, "reading bdr.nodes failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(MEMBERSHIP_POLL) => {}
            _ = shutdown.changed() => break,
        }
    }
    info!("shutting down");
    for (_, r) in running.drain() {
        let _ = r.stop.send(true);
        let _ = r.task.await;
    }
    Ok(())
}

/// The local connection that reads `bdr.nodes`.
struct Watcher {
    client: tokio_postgres::Client,
    conn: JoinHandle<Result<(), tokio_postgres::Error>>,
}

impl Watcher {
    async fn connect(settings: &Settings) -> Result<Watcher, tokio_postgres::Error> {
        let (client, conn) = settings.local.connect(tokio_postgres::NoTls).await?;
        Ok(Watcher {
            client,
            conn: tokio::spawn(conn),
        })
    }

    fn lost(&self) -> bool {
        self.conn.is_finished()
    }
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
