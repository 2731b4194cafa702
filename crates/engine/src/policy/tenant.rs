//! Tenant rules: a JWT user needs a tenant except on the tenantless paths; a publishable key's
//! user must not belong to another tenant (by claim or by Identity Platform tenant).

use std::sync::Arc;

use crate::authn::VerifiedToken;
use crate::decision::{Denial, Reason};

/// The tenant of a plain JWT request. Paths compare exactly: the configured paths are in normal
/// form (checked at start), so an equal path is one too.
pub fn for_jwt(
    token_tenant: Option<&str>,
    path: &str,
    tenantless_paths: &[String],
) -> Result<Option<Arc<str>>, Denial> {
    match token_tenant {
        // Shared from here on (the answer and the log borrow it): one copy per decision.
        Some(t) => Ok(Some(Arc::from(t))),
        None if tenantless_paths.iter().any(|p| p == path) => Ok(None),
        None => Err(Denial::new(Reason::TenantRequired)),
    }
}

/// A publishable key's user must be of the key's tenant, and of its Identity Platform tenant when
/// the key names one (a project-level verifier accepts every Identity Platform tenant's tokens).
pub fn for_publishable(
    key_tenant: &str,
    key_ip_tenant: Option<&str>,
    token: &VerifiedToken,
) -> Result<(), Denial> {
    if let Some(want) = key_ip_tenant
        && token.firebase_tenant.as_deref() != Some(want)
    {
        return Err(Denial::because(
            Reason::TenantMismatch,
            "identity_platform_tenant",
        ));
    }
    match token.tenant.as_deref() {
        Some(t) if t != key_tenant => Err(Denial::because(Reason::TenantMismatch, "tenant_claim")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Vec<String> {
        vec!["/api/v1/orgs/create".into()]
    }

    #[test]
    fn jwt_tenant_table() {
        type Case<'a> = (Option<&'a str>, &'a str, Result<Option<&'a str>, Reason>);
        let cases: &[Case] = &[
            (
                Some("t1"),
                "/api/v1/llm/gateway/list-threads",
                Ok(Some("t1")),
            ),
            (Some("t1"), "/api/v1/orgs/create", Ok(Some("t1"))),
            (None, "/api/v1/orgs/create", Ok(None)),
            (
                None,
                "/api/v1/llm/gateway/list-threads",
                Err(Reason::TenantRequired),
            ),
            // Not the tenantless path in any other spelling.
            (None, "/api/v1/orgs/create/", Err(Reason::TenantRequired)),
            (None, "/api/v1//orgs/create", Err(Reason::TenantRequired)),
            (None, "/api/v1/orgs/./create", Err(Reason::TenantRequired)),
            (
                None,
                "/api/v1/x/../orgs/create",
                Err(Reason::TenantRequired),
            ),
            (None, "/api/v1/orgs%2Fcreate", Err(Reason::TenantRequired)),
            (None, "/API/v1/orgs/create", Err(Reason::TenantRequired)),
        ];
        for (tenant, path, want) in cases {
            let got = for_jwt(*tenant, path, &paths());
            let got = got.as_ref().map(|t| t.as_deref()).map_err(|d| d.reason);
            assert_eq!(got, *want, "{tenant:?} {path}");
        }
    }

    fn tok(tenant: Option<&str>, ip: Option<&str>) -> VerifiedToken {
        VerifiedToken {
            sub: "u".into(),
            tenant: tenant.map(Into::into),
            firebase_tenant: ip.map(Into::into),
            exp: 0,
        }
    }

    #[test]
    fn publishable_tenant_table() {
        let cases: &[(Option<&str>, VerifiedToken, bool)] = &[
            (None, tok(None, None), true),
            (None, tok(Some("t1"), None), true),
            (None, tok(Some("t2"), None), false),
            (None, tok(None, Some("ip-a")), true),
            (Some("ip-a"), tok(None, Some("ip-a")), true),
            (Some("ip-a"), tok(None, Some("ip-b")), false),
            (Some("ip-a"), tok(None, None), false),
            (Some("ip-a"), tok(Some("t2"), Some("ip-a")), false),
        ];
        for (ip, token, ok) in cases {
            let got = for_publishable("t1", *ip, token);
            assert_eq!(got.is_ok(), *ok, "{ip:?} {token:?}");
            if let Err(d) = got {
                assert_eq!(d.reason, Reason::TenantMismatch);
            }
        }
    }
}
