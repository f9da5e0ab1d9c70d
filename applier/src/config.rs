//! Settings of the daemon and the commands: from a TOML file, overridden by
//! environment variables, overridden by command-line flags.
//!
//! ```toml
//! # bdr-applier.toml
//! node_name = "a"
//! dsn = "host=127.0.0.1 port=5501 dbname=postgres user=postgres"
//! # apply_pipeline = false   # one statement at a time (default true)
//! # parallel_apply = true    # two batched sessions per peer (default false)
//! ```

use std::path::Path;

use serde::Deserialize;
use tokio_postgres::Config;

/// What a settings file may hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    /// This node's name in `bdr.nodes`.
    pub node_name: Option<String>,
    /// How to connect to the local database.
    pub dsn: Option<String>,
    /// Whether changes are pipelined (default true).
    pub apply_pipeline: Option<bool>,
    /// Whether two batched sessions apply side by side (default false).
    pub parallel_apply: Option<bool>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_name: String,
    pub dsn: String,
    pub local: Config,
    /// Send a transaction's statements without waiting for each one (see
    /// the applier's `apply` module); off applies one statement at a time.
    pub apply_pipeline: bool,
    /// Apply a peer's transactions on two batched sessions side by side,
    /// committing in the peer's order (see the applier's `apply::batch`);
    /// off: one.
    pub parallel_apply: bool,
}

/// Errors in the settings, naming where the bad value came from.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("no node name: pass --node-name, set BDR_NODE_NAME or node_name in the settings file")]
    NoNodeName,
    #[error("no local connection string: pass --dsn, set BDR_DSN or dsn in the settings file")]
    NoDsn,
    #[error("invalid local connection string {dsn:?}: {source}")]
    BadDsn {
        dsn: String,
        source: tokio_postgres::Error,
    },
}

impl FileSettings {
    /// Reads a settings file.
    pub fn read(path: &Path) -> Result<Self, SettingsError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: shown.clone(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| SettingsError::Parse {
            path: shown,
            source: Box::new(source),
        })
    }
}

impl Settings {
    /// Flags (already merged with the environment by the CLI parser) win
    /// over the file.
    pub fn resolve(
        file: FileSettings,
        node_name: Option<String>,
        dsn: Option<String>,
        apply_pipeline: Option<bool>,
        parallel_apply: Option<bool>,
    ) -> Result<Self, SettingsError> {
        let node_name = node_name
            .or(file.node_name)
            .ok_or(SettingsError::NoNodeName)?;
        let dsn = dsn.or(file.dsn).ok_or(SettingsError::NoDsn)?;
        let local = dsn
            .parse::<Config>()
            .map_err(|source| SettingsError::BadDsn {
                dsn: dsn.clone(),
                source,
            })?;
        Ok(Settings {
            node_name,
            dsn,
            local,
            apply_pipeline: apply_pipeline.or(file.apply_pipeline).unwrap_or(true),
            parallel_apply: parallel_apply.or(file.parallel_apply).unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file() {
        let file: FileSettings =
            toml::from_str("node_name = \"a\"\ndsn = \"host=h1\"").expect("toml");
        let s = Settings::resolve(file, Some("b".into()), None, None, None).expect("settings");
        assert_eq!(s.node_name, "b");
        assert_eq!(s.dsn, "host=h1");
        assert!(s.apply_pipeline);
        assert!(!s.parallel_apply);
        let file: FileSettings = toml::from_str(
            "node_name = \"a\"\ndsn = \"host=h1\"\napply_pipeline = false\nparallel_apply = true",
        )
        .expect("toml");
        let s = Settings::resolve(file, None, None, None, None).expect("settings");
        assert!(!s.apply_pipeline);
        assert!(s.parallel_apply);
        let file: FileSettings =
            toml::from_str("node_name = \"a\"\ndsn = \"host=h1\"\nparallel_apply = true")
                .expect("toml");
        let s = Settings::resolve(file, None, None, None, Some(false)).expect("settings");
        assert!(!s.parallel_apply);
    }

    #[test]
    fn missing_and_unknown_settings_are_named() {
        let err = Settings::resolve(
            FileSettings::default(),
            None,
            Some("host=h".into()),
            None,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("--node-name"), "{err}");
        let err = toml::from_str::<FileSettings>("nodename = \"a\"").unwrap_err();
        assert!(err.to_string().contains("nodename"), "{err}");
        let err = Settings::resolve(
            FileSettings::default(),
            Some("a".into()),
            Some("port=x".into()),
            None,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("port=x"), "{err}");
    }
}
