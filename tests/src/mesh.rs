//! A group of nodes that all stream from each other, each with its own
//! `bdr-applier`.

use crate::applier::{ApplierProcess, applier_command};
use crate::node::Node;

/// Nodes, their appliers, and helpers to wait for replication.
///
/// Appliers are declared first so they are dropped (killed) before their
/// servers stop.
#[derive(Debug)]
pub struct Mesh {
    pub appliers: Vec<ApplierProcess>,
    pub nodes: Vec<Node>,
}

impl Mesh {
    /// Starts nodes named `names`, runs `schema` on each (tables must exist
    /// on every node before changes to them arrive), registers every node
    /// and its peers, and starts the appliers.
    pub fn new(names: &[&str], schema: &str) -> Mesh {
        let mut nodes = Vec::new();
        for name in names {
            let mut node = Node::init(name);
            node.start();
            node.safe_psql("CREATE EXTENSION bdr");
            if !schema.is_empty() {
                node.safe_psql(schema);
            }
            nodes.push(node);
        }
        for node in &nodes {
            applier_command(node, &["init"]);
            for peer in nodes.iter().filter(|p| p.name() != node.name()) {
                applier_command(node, &["add-peer", peer.name(), &peer.connstr()]);
            }
        }
        let appliers = nodes.iter().map(ApplierProcess::start).collect();
        let mesh = Mesh { appliers, nodes };
        mesh.wait_for_streaming();
        mesh
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name() == name)
            .expect("no such node")
    }

    /// The node named `name`, mutably (to stop or restart it).
    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name() == name)
            .expect("no such node")
    }

    /// The applier of node `name`.
    pub fn applier(&mut self, name: &str) -> &mut ApplierProcess {
        let i = self
            .nodes
            .iter()
            .position(|n| n.name() == name)
            .expect("no such node");
        &mut self.appliers[i]
    }

    /// Waits until every node streams from every other (each node's
    /// walsenders show the others' application names).
    pub fn wait_for_streaming(&self) {
        for from in &self.nodes {
            let expected = (self.nodes.len() - 1).to_string();
            from.poll_query_until(
                "SELECT count(DISTINCT application_name) FROM pg_stat_replication
                  WHERE state = 'streaming'",
                &expected,
            );
        }
    }

    /// Waits until every node has applied everything the node `from` has
    /// written so far.
    pub fn wait_for_catchup_from(&self, from: &str) {
        let source = self.node(from);
        for to in self.nodes.iter().filter(|n| n.name() != from) {
            source.wait_until_applied_by(to.name());
        }
    }

    /// Waits until every node has applied what every other has written.
    pub fn wait_for_catchup(&self) {
        for n in &self.nodes {
            self.wait_for_catchup_from(n.name());
        }
    }

    /// Panics unless `query` returns the same on every node; returns it.
    pub fn assert_same(&self, query: &str) -> String {
        let first = self.nodes[0].safe_psql(query);
        for n in &self.nodes[1..] {
            assert_eq!(
                n.safe_psql(query),
                first,
                "node {} differs from node {} for\n{query}",
                n.name(),
                self.nodes[0].name()
            );
        }
        first
    }
}
