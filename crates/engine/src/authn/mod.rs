//! Authentication: proving who a credential belongs to. API keys are parsed in `apikey` and
//! looked up through the key store; tokens are verified in `jwt` against the signing keys
//! `jwks` fetches.

pub mod apikey;
pub mod jwks;
pub mod jwt;

pub use jwt::{JwtVerifier, Provider, TokenError, VerifiedToken};
