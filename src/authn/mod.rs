//! Authentication: proving who a credential belongs to. Tokens are verified here; API keys are
//! looked up through the cached store.

pub mod jwt;

pub use jwt::{JwtVerifier, Provider, TokenError, VerifiedToken};
