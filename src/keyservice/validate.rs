//! Every request checked before anything is written, and turned into the shared key-change
//! inputs (`store::admin`): a bad field is a 400 naming it (its protojson name), a scope the
//! caller does not hold is a 403. Pure functions over the request, the caller and the time.

use std::time::Duration;

use gybc_authz_engine::authn::apikey::KeyKind;
use gybc_authz_engine::ratelimit::RateLimit;
use gybc_authz_engine::store::admin::{Changes, Cursor, KeyState, ListFilter, NewKey};

use super::caller::Caller;
use super::proto::v1 as pb;

/// A name is for people: at most this many characters.
pub const MAX_NAME_CHARS: usize = 128;
/// A page of `list-keys` when `pageSize` is 0.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// The largest `pageSize`.
pub const MAX_PAGE_SIZE: usize = 100;
/// How long a rotated key's old secret keeps working when `gracePeriod` is unset.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// The longest `gracePeriod`: a leaked key being rotated away must not live on for long.
pub const MAX_GRACE: Duration = Duration::from_secs(7 * 24 * 3600);
/// The most scopes or origins on one key.
pub const MAX_LIST_ITEMS: usize = 32;
/// The longest key id, scope or origin accepted.
const MAX_ITEM_CHARS: usize = 256;

/// What the operator allows: the scope allow-list (`key_service.allowed_scopes`) and the
/// configured JWT providers.
#[derive(Debug, Clone)]
pub struct Policy {
    pub allowed_scopes: Vec<String>,
    pub jwt_providers: Vec<String>,
}

/// Why a request is refused before anything is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// 400: `field` (its protojson name) is wrong.
    Field { field: String, message: String },
    /// 403: the caller may not grant this scope.
    Escalation { scope: String },
}

fn bad(field: &str, message: impl Into<String>) -> Invalid {
    Invalid::Field {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// A key id as the path of a request: present, bounded, printable.
pub fn id(id: &str) -> Result<&str, Invalid> {
    if id.is_empty() {
        return Err(bad("id", "id is required"));
    }
    if id.chars().count() > MAX_ITEM_CHARS || id.contains(|c: char| c.is_control() || c == ' ') {
        return Err(bad("id", "id is not a key id"));
    }
    Ok(id)
}

fn name(name: &str) -> Result<Option<String>, Invalid> {
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(bad(
            "name",
            format!("name is longer than {MAX_NAME_CHARS} characters"),
        ));
    }
    if name.contains(char::is_control) {
        return Err(bad("name", "name has control characters"));
    }
    Ok((!name.is_empty()).then(|| name.to_owned()))
}

fn scopes(
    field: &str,
    list: &[String],
    caller: &Caller,
    policy: &Policy,
) -> Result<Vec<String>, Invalid> {
    if list.len() > MAX_LIST_ITEMS {
        return Err(bad(
            field,
            format!("{field}: at most {MAX_LIST_ITEMS} scopes"),
        ));
    }
    for s in list {
        if !policy.allowed_scopes.iter().any(|a| a == s) {
            return Err(bad(
                field,
                format!(
                    "{field}: scope `{}` is not one of {}",
                    s.chars().take(MAX_ITEM_CHARS).collect::<String>(),
                    policy.allowed_scopes.join(", ")
                ),
            ));
        }
    }
    if let Some(s) = list.iter().find(|s| !caller.may_grant(s)) {
        return Err(Invalid::Escalation { scope: s.clone() });
    }
    let mut out = list.to_vec();
    out.sort();
    out.dedup();
    Ok(out)
}

fn rate_limit(text: &str) -> Result<Option<RateLimit>, Invalid> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        bad(
            "rateLimit",
            "rateLimit is not `<requests>/<window>` like `100/60s` (a window of at most 30d)",
        )
    })
}

fn origins(field: &str, list: &[String]) -> Result<Vec<String>, Invalid> {
    if list.len() > MAX_LIST_ITEMS {
        return Err(bad(
            field,
            format!("{field}: at most {MAX_LIST_ITEMS} origins"),
        ));
    }
    for o in list {
        let ok = o == "*"
            || ((o.starts_with("https://") || o.starts_with("http://"))
                && o.len() <= MAX_ITEM_CHARS
                && !o.contains(|c: char| c.is_whitespace() || c.is_control())
                && !o.split_once("://").is_some_and(|(_, rest)| {
                    rest.trim_end_matches('/').contains('/') || rest.is_empty()
                }));
        if !ok {
            return Err(bad(
                field,
                format!("{field}: an origin is `*` or `https://host[:port]`, without a path"),
            ));
        }
    }
    Ok(list.to_vec())
}

fn expiry(field: &str, t: &pb::Timestamp, now: u64) -> Result<u64, Invalid> {
    if t.seconds <= now as i64 {
        return Err(bad(field, format!("{field} is not in the future")));
    }
    Ok(t.seconds as u64)
}

fn kind(field: &str, value: i32, required: bool) -> Result<Option<KeyKind>, Invalid> {
    match pb::KeyKind::try_from(value) {
        Ok(pb::KeyKind::Secret) => Ok(Some(KeyKind::Secret)),
        Ok(pb::KeyKind::Publishable) => Ok(Some(KeyKind::Publishable)),
        Ok(pb::KeyKind::Unspecified) if !required => Ok(None),
        _ => Err(bad(
            field,
            format!("{field} is KEY_KIND_SECRET or KEY_KIND_PUBLISHABLE"),
        )),
    }
}

/// A create, for the caller's tenant.
pub fn create(
    req: &pb::CreateKeyRequest,
    caller: &Caller,
    policy: &Policy,
    now: u64,
) -> Result<NewKey, Invalid> {
    let kind = kind("kind", req.kind, true)?.expect("required");
    let name = name(&req.name)?;
    let rate_limit = rate_limit(&req.rate_limit)?;
    let allowed_origins = origins("allowedOrigins", &req.allowed_origins)?;
    let jwt_provider = (!req.jwt_provider.is_empty()).then(|| req.jwt_provider.clone());
    if kind == KeyKind::Secret {
        if !allowed_origins.is_empty() {
            return Err(bad(
                "allowedOrigins",
                "allowedOrigins is for publishable keys",
            ));
        }
        if jwt_provider.is_some() {
            return Err(bad("jwtProvider", "jwtProvider is for publishable keys"));
        }
    }
    if let Some(p) = &jwt_provider
        && !policy.jwt_providers.iter().any(|x| x == p)
    {
        return Err(bad(
            "jwtProvider",
            "jwtProvider names no configured JWT provider",
        ));
    }
    let expires_at = req
        .expire_time
        .as_ref()
        .map(|t| expiry("expireTime", t, now))
        .transpose()?;
    // Last: a request with a bad field is a 400 whoever sends it.
    let scopes = scopes("scopes", &req.scopes, caller, policy)?;
    Ok(NewKey {
        tenant: caller.tenant().to_owned(),
        kind,
        scopes,
        rate_limit,
        expires_at,
        name,
        allowed_origins,
        jwt_provider,
        identity_platform_tenant: None,
    })
}

/// An update of a key of this `kind` (kinds never change, so the service reads it first).
pub fn update(
    req: &pb::UpdateKeyRequest,
    kind: KeyKind,
    caller: &Caller,
    policy: &Policy,
    now: u64,
) -> Result<Changes, Invalid> {
    id(&req.id)?;
    let mut changes = Changes {
        name: req.name.as_deref().map(name).transpose()?,
        rate_limit: req.rate_limit.as_deref().map(rate_limit).transpose()?,
        ..Changes::default()
    };
    if let Some(list) = &req.allowed_origins {
        if kind == KeyKind::Secret {
            return Err(bad(
                "allowedOrigins",
                "allowedOrigins is for publishable keys",
            ));
        }
        changes.allowed_origins = Some(origins("allowedOrigins.values", &list.values)?);
    }
    match (&req.expire_time, req.clear_expire_time) {
        (Some(_), true) => {
            return Err(bad(
                "clearExpireTime",
                "clearExpireTime and expireTime cannot both be set",
            ));
        }
        (Some(t), false) => changes.expires_at = Some(Some(expiry("expireTime", t, now)?)),
        (None, true) => changes.expires_at = Some(None),
        (None, false) => {}
    }
    if let Some(list) = &req.scopes {
        changes.scopes = Some(scopes("scopes.values", &list.values, caller, policy)?);
    }
    Ok(changes)
}

/// A list request: the filter, the page size, and where to resume.
pub fn list(req: &pb::ListKeysRequest) -> Result<(ListFilter, usize, Option<Cursor>), Invalid> {
    let size = match req.page_size {
        0 => DEFAULT_PAGE_SIZE,
        n if n < 0 || n as usize > MAX_PAGE_SIZE => {
            return Err(bad(
                "pageSize",
                format!("pageSize is between 0 and {MAX_PAGE_SIZE}"),
            ));
        }
        n => n as usize,
    };
    let cursor = match req.page_token.as_str() {
        "" => None,
        t => Some(
            Cursor::decode(t)
                .ok_or_else(|| bad("pageToken", "pageToken is not a nextPageToken of this list"))?,
        ),
    };
    let state = match pb::KeyState::try_from(req.state) {
        Ok(pb::KeyState::Unspecified) => None,
        Ok(pb::KeyState::Active) => Some(KeyState::Active),
        Ok(pb::KeyState::Expired) => Some(KeyState::Expired),
        Ok(pb::KeyState::Revoked) => Some(KeyState::Revoked),
        Err(_) => return Err(bad("state", "state is not a KeyState")),
    };
    let filter = ListFilter {
        kind: kind("kind", req.kind, false)?,
        state,
    };
    Ok((filter, size, cursor))
}

/// A rotation's grace period.
pub fn grace(req: &pb::RotateKeyRequest) -> Result<Duration, Invalid> {
    id(&req.id)?;
    let Some(d) = &req.grace_period else {
        return Ok(DEFAULT_GRACE);
    };
    if d.seconds < 0 || d.nanos < 0 || d.seconds as u64 > MAX_GRACE.as_secs() {
        return Err(bad(
            "gracePeriod",
            format!("gracePeriod is between 0s and {}s", MAX_GRACE.as_secs()),
        ));
    }
    Ok(Duration::from_secs(d.seconds as u64))
}

/// The range `get-key-usage` reads when `startTime` is unset: the last day.
pub const DEFAULT_USAGE_RANGE_SECS: u64 = 24 * 3600;

/// A usage read's range, `[start, end)` in Unix seconds: `endTime` (default now) and
/// `startTime` (default a day before it), in order, spanning at most `max_span_secs` (the
/// retention: older hours are gone anyway) once widened to whole hours.
pub fn usage(
    req: &pb::GetKeyUsageRequest,
    now: u64,
    max_span_secs: u64,
) -> Result<(u64, u64), Invalid> {
    id(&req.id)?;
    let secs = |field: &str, t: &pb::Timestamp| {
        u64::try_from(t.seconds).map_err(|_| bad(field, format!("{field} is before 1970")))
    };
    let end = match &req.end_time {
        Some(t) => secs("endTime", t)?,
        None => now,
    };
    let start = match &req.start_time {
        Some(t) => secs("startTime", t)?,
        None => end.saturating_sub(DEFAULT_USAGE_RANGE_SECS),
    };
    if start >= end {
        return Err(bad("startTime", "startTime is not before endTime"));
    }
    let hour = 3600;
    if end.div_ceil(hour) * hour - start / hour * hour > max_span_secs {
        return Err(bad(
            "startTime",
            format!(
                "the range spans more than the {} days usage is kept",
                max_span_secs / 86_400
            ),
        ));
    }
    Ok((start, end))
}

/// An `Idempotency-Key` header value: 1 to 255 visible ASCII characters.
pub fn idempotency_key(value: &[u8]) -> Result<&str, Invalid> {
    let ok = !value.is_empty() && value.len() <= 255 && value.iter().all(|b| b.is_ascii_graphic());
    match std::str::from_utf8(value) {
        Ok(s) if ok => Ok(s),
        _ => Err(bad(
            "Idempotency-Key",
            "the Idempotency-Key header is 1 to 255 visible ASCII characters",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn policy() -> Policy {
        Policy {
            allowed_scopes: vec![
                "keys:manage".into(),
                "users:impersonate".into(),
                "threads:read".into(),
            ],
            jwt_providers: vec!["endusers".into()],
        }
    }

    fn user() -> Caller {
        Caller::User {
            tenant: "acme".into(),
            user: "u1".into(),
        }
    }

    fn manager() -> Caller {
        Caller::Key {
            tenant: "acme".into(),
            key_id: "key_m".into(),
            scopes: vec!["keys:manage".into(), "threads:read".into()],
        }
    }

    fn field(r: Result<impl std::fmt::Debug, Invalid>) -> String {
        match r {
            Err(Invalid::Field { field, .. }) => field,
            other => panic!("not a field error: {other:?}"),
        }
    }

    fn create_req(json: &str) -> pb::CreateKeyRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_good_create_becomes_a_new_key_of_the_callers_tenant() {
        let req = create_req(
            r#"{"kind":"KEY_KIND_PUBLISHABLE","name":"web","scopes":["threads:read","threads:read"],
                "rateLimit":"100/60s","allowedOrigins":["https://app.acme.example"],
                "jwtProvider":"endusers","expireTime":"2030-01-01T00:00:00Z"}"#,
        );
        let new = create(&req, &manager(), &policy(), NOW).unwrap();
        assert_eq!(new.tenant, "acme");
        assert_eq!(new.kind, KeyKind::Publishable);
        assert_eq!(new.scopes, ["threads:read"]);
        assert_eq!(new.rate_limit.unwrap().requests, 100);
        assert_eq!(new.expires_at, Some(1_893_456_000));
        assert_eq!(new.jwt_provider.as_deref(), Some("endusers"));
    }

    #[test]
    fn every_bad_create_names_its_field() {
        let long = "x".repeat(129);
        let table = [
            (r#"{"name":"n"}"#.to_owned(), "kind"),
            (
                format!(r#"{{"kind":"KEY_KIND_SECRET","name":"{long}"}}"#),
                "name",
            ),
            (
                r#"{"kind":"KEY_KIND_SECRET","rateLimit":"lots"}"#.into(),
                "rateLimit",
            ),
            (
                r#"{"kind":"KEY_KIND_SECRET","rateLimit":"0/1s"}"#.into(),
                "rateLimit",
            ),
            (
                r#"{"kind":"KEY_KIND_SECRET","scopes":["admin:all"]}"#.into(),
                "scopes",
            ),
            (
                r#"{"kind":"KEY_KIND_SECRET","expireTime":"2001-01-01T00:00:00Z"}"#.into(),
                "expireTime",
            ),
            (
                r#"{"kind":"KEY_KIND_SECRET","allowedOrigins":["https://a.example"]}"#.into(),
                "allowedOrigins",
            ),
            (
                r#"{"kind":"KEY_KIND_SECRET","jwtProvider":"endusers"}"#.into(),
                "jwtProvider",
            ),
            (
                r#"{"kind":"KEY_KIND_PUBLISHABLE","jwtProvider":"nobody"}"#.into(),
                "jwtProvider",
            ),
            (
                r#"{"kind":"KEY_KIND_PUBLISHABLE","allowedOrigins":["https://a.example/path"]}"#
                    .into(),
                "allowedOrigins",
            ),
            (
                r#"{"kind":"KEY_KIND_PUBLISHABLE","allowedOrigins":["app.example"]}"#.into(),
                "allowedOrigins",
            ),
        ];
        for (json, want) in table {
            assert_eq!(
                field(create(&create_req(&json), &user(), &policy(), NOW)),
                want,
                "{json}"
            );
        }
        // Exactly 128 characters is fine.
        let ok = format!(
            r#"{{"kind":"KEY_KIND_SECRET","name":"{}"}}"#,
            "x".repeat(128)
        );
        assert!(create(&create_req(&ok), &user(), &policy(), NOW).is_ok());
    }

    #[test]
    fn a_key_cannot_grant_a_scope_it_lacks_but_a_user_can() {
        let req = create_req(r#"{"kind":"KEY_KIND_SECRET","scopes":["users:impersonate"]}"#);
        assert_eq!(
            create(&req, &manager(), &policy(), NOW).unwrap_err(),
            Invalid::Escalation {
                scope: "users:impersonate".into()
            }
        );
        assert!(create(&req, &user(), &policy(), NOW).is_ok());

        let upd: pb::UpdateKeyRequest =
            serde_json::from_str(r#"{"id":"key_1","scopes":{"values":["users:impersonate"]}}"#)
                .unwrap();
        assert!(matches!(
            update(&upd, KeyKind::Secret, &manager(), &policy(), NOW),
            Err(Invalid::Escalation { .. })
        ));
    }

    #[test]
    fn updates_change_only_what_is_set() {
        let upd: pb::UpdateKeyRequest =
            serde_json::from_str(r#"{"id":"key_1","rateLimit":"5/1s","clearExpireTime":true}"#)
                .unwrap();
        let c = update(&upd, KeyKind::Secret, &user(), &policy(), NOW).unwrap();
        assert_eq!(c.rate_limit.unwrap().unwrap().requests, 5);
        assert_eq!(c.expires_at, Some(None));
        assert!(c.name.is_none() && c.scopes.is_none() && c.allowed_origins.is_none());

        let reset: pb::UpdateKeyRequest =
            serde_json::from_str(r#"{"id":"key_1","rateLimit":"","scopes":{}}"#).unwrap();
        let c = update(&reset, KeyKind::Secret, &user(), &policy(), NOW).unwrap();
        assert_eq!(c.rate_limit, Some(None), "empty text: back to the default");
        assert_eq!(c.scopes, Some(vec![]), "an empty list clears the scopes");

        let table = [
            (r#"{"id":""}"#, "id"),
            (r#"{"id":"key_1","rateLimit":"1/99d"}"#, "rateLimit"),
            (
                r#"{"id":"key_1","expireTime":"2001-01-01T00:00:00Z"}"#,
                "expireTime",
            ),
            (
                r#"{"id":"key_1","expireTime":"2031-01-01T00:00:00Z","clearExpireTime":true}"#,
                "clearExpireTime",
            ),
            (
                r#"{"id":"key_1","allowedOrigins":{"values":["https://a.example"]}}"#,
                "allowedOrigins",
            ),
            (
                r#"{"id":"key_1","scopes":{"values":["nope"]}}"#,
                "scopes.values",
            ),
        ];
        for (json, want) in table {
            let req: pb::UpdateKeyRequest = serde_json::from_str(json).unwrap();
            assert_eq!(
                field(update(&req, KeyKind::Secret, &user(), &policy(), NOW)),
                want,
                "{json}"
            );
        }
    }

    #[test]
    fn lists_rotations_and_idempotency_keys() {
        let req = |j: &str| -> pb::ListKeysRequest { serde_json::from_str(j).unwrap() };
        let (f, size, cursor) = list(&req("{}")).unwrap();
        assert_eq!((size, cursor), (DEFAULT_PAGE_SIZE, None));
        assert!(f.kind.is_none() && f.state.is_none());
        let (f, size, _) = list(&req(
            r#"{"pageSize":100,"kind":"KEY_KIND_SECRET","state":"KEY_STATE_REVOKED"}"#,
        ))
        .unwrap();
        assert_eq!(size, 100);
        assert_eq!(f.kind, Some(KeyKind::Secret));
        assert_eq!(f.state, Some(KeyState::Revoked));
        assert_eq!(field(list(&req(r#"{"pageSize":101}"#))), "pageSize");
        assert_eq!(field(list(&req(r#"{"pageSize":-1}"#))), "pageSize");
        assert_eq!(field(list(&req(r#"{"pageToken":"garbage"}"#))), "pageToken");

        let rot = |j: &str| -> pb::RotateKeyRequest { serde_json::from_str(j).unwrap() };
        assert_eq!(grace(&rot(r#"{"id":"key_1"}"#)).unwrap(), DEFAULT_GRACE);
        assert_eq!(
            grace(&rot(r#"{"id":"key_1","gracePeriod":"0s"}"#)).unwrap(),
            Duration::ZERO
        );
        assert_eq!(
            field(grace(&rot(r#"{"id":"key_1","gracePeriod":"604801s"}"#))),
            "gracePeriod"
        );
        assert_eq!(
            field(grace(&rot(r#"{"id":"key_1","gracePeriod":"-5s"}"#))),
            "gracePeriod"
        );

        assert_eq!(idempotency_key(b"retry-1").unwrap(), "retry-1");
        for bad in [&b""[..], b"has space", &[b'a'; 256], b"\xff"] {
            assert_eq!(field(idempotency_key(bad)), "Idempotency-Key");
        }
    }

    #[test]
    fn usage_ranges_default_to_the_last_day_and_stay_within_the_retention() {
        let req = |json: &str| serde_json::from_str::<pb::GetKeyUsageRequest>(json).unwrap();
        let day = 86_400;
        assert_eq!(
            usage(&req(r#"{"id":"key_1"}"#), NOW, 35 * day),
            Ok((NOW - day, NOW))
        );
        let explicit = req(
            r#"{"id":"key_1","startTime":"2027-01-15T08:00:00Z","endTime":"2027-01-15T10:30:00Z"}"#,
        );
        assert_eq!(usage(&explicit, NOW, 35 * day), Ok((NOW, NOW + 9_000)));
        assert_eq!(field(usage(&req(r#"{}"#), NOW, 35 * day)), "id");
        let backwards = req(
            r#"{"id":"k","startTime":"2027-01-15T10:00:00Z","endTime":"2027-01-15T09:00:00Z"}"#,
        );
        assert_eq!(field(usage(&backwards, NOW, 35 * day)), "startTime");
        let too_long = req(r#"{"id":"k","startTime":"2026-01-01T00:00:00Z"}"#);
        assert_eq!(field(usage(&too_long, NOW, 35 * day)), "startTime");
        let negative = req(r#"{"id":"k","endTime":"1960-01-01T00:00:00Z"}"#);
        assert_eq!(field(usage(&negative, NOW, 35 * day)), "endTime");
        // Exactly the retention, once widened to whole hours, is accepted.
        let whole = req(
            r#"{"id":"k","startTime":"2026-12-11T08:00:00Z","endTime":"2027-01-15T08:00:00Z"}"#,
        );
        assert!(usage(&whole, NOW, 35 * day).is_ok());
    }
}
