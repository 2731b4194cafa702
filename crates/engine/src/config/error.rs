//! Why a configuration was refused: every problem, each named by its field path.

use std::fmt;

/// One problem with the configuration, named by its field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a configuration was refused: every problem found, not just the first.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(ErrorList),
}

#[derive(Debug)]
pub struct ErrorList(pub Vec<FieldError>);

impl fmt::Display for ErrorList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} error(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    pub fn errors(&self) -> &[FieldError] {
        match self {
            ConfigError::Invalid(list) => &list.0,
            ConfigError::Read { .. } => &[],
        }
    }
}

pub(super) fn invalid(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(ErrorList(vec![FieldError {
        path: path.into(),
        message: message.into(),
    }]))
}
