//! The bound on a tenant's active keys, in Redis: a ledger per tenant, the hash
//! `<prefix>:tenant-active:<tenant>` (key id → `<expires_at>:<pending_until>`, 0 for "never" and
//! "written"), checked and written by one Lua script, so two creates on two replicas can never
//! both take the last place. One Redis key per script, so it works on a cluster too.
//!
//! The ledger may count a key that is no longer active (a revocation whose ledger write failed,
//! a create that died between its place and its record), never miss one that is: a place is
//! taken before the record is written and a change widens an entry before its compare-and-set,
//! both marked pending; only a write that succeeded narrows the entry and clears the mark. When
//! the bound refuses a create, the ledger is checked against the records once: an entry not
//! pending whose key is revoked, expired or gone leaves, and the create is asked again. A pending
//! entry stays until its mark runs out (`PENDING_SECS`, longer than any request may run): its
//! write may still be on its way. A tenant's first create fills the ledger from the tenant's
//! records (its sorted set).

use std::time::Duration;

use super::RedisAdmin;
use crate::store::KeyRecord;
use crate::store::admin::{AdminError, KeyState, state};

/// Marks a ledger as filled from the records. No key id has a space in it.
const FILLED: &str = " filled";

/// How long a place taken for a create may wait for its record before a check may free it. The
/// create gives up, and frees it, if half of this has passed before its record is written.
pub(super) const PENDING_SECS: u64 = 60;

/// Takes a place for `ARGV[3]` (or renews its entry), unless the tenant holds `ARGV[2]` active
/// keys already (`-1`: no bound). Expired entries leave on the way; `ARGV[5]` (a rotation's old
/// key) is not counted. Returns -1 (taken), -2 (the ledger is not filled yet) or the keys held.
const ADMIT: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[6]) == 0 then return -2 end
local now, max = tonumber(ARGV[1]), tonumber(ARGV[2])
local held = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local id = all[i]
  if id ~= ARGV[6] then
    local exp = tonumber(string.match(all[i + 1], '^(%d+)')) or 0
    if exp ~= 0 and exp <= now then
      redis.call('HDEL', KEYS[1], id)
    elseif id ~= ARGV[3] and id ~= ARGV[5] then
      held = held + 1
    end
  end
end
if redis.call('HEXISTS', KEYS[1], ARGV[3]) == 0 and max >= 0 and held >= max then
  return held
end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
return -1";

/// Fills the ledger with the given entries, once.
const FILL: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], '1')
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1";

/// Sets (`ARGV[2]`) or removes (empty) an entry of a filled ledger.
const SET: &str = r"
if redis.call('HEXISTS', KEYS[1], ARGV[3]) == 0 then return 0 end
if ARGV[2] == '' then return redis.call('HDEL', KEYS[1], ARGV[1]) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1";

/// Removes an entry if it still says what the check read.
const DROP_IF: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0";

/// An entry's value: when the key expires (0: never) and, for a place whose record is not written
/// yet, until when it waits (0: written).
pub(super) fn entry(expires_at: Option<u64>, pending_until: u64) -> String {
    format!("{}:{pending_until}", expires_at.unwrap_or(0))
}

fn parse(value: &str) -> (u64, u64) {
    let mut parts = value.split(':').map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// What `ADMIT` said.
enum Admit {
    Taken,
    NotFilled,
    /// The tenant holds the most keys it may.
    Held,
}

impl RedisAdmin {
    fn ledger_name(&self, tenant: &str) -> String {
        format!("{}:tenant-active:{tenant}", self.prefix)
    }

    async fn script<T: redis::FromRedisValue>(
        &self,
        lua: &str,
        tenant: &str,
        args: &[&str],
    ) -> Result<T, AdminError> {
        let script = redis::Script::new(lua);
        let mut call = script.key(self.ledger_name(tenant));
        for a in args {
            call.arg(*a);
        }
        let mut conn = self.redis.conn.clone();
        call.invoke_async(&mut conn)
            .await
            .map_err(|e| AdminError::Unavailable(e.to_string()))
    }

    async fn admit(
        &self,
        tenant: &str,
        id: &str,
        value: &str,
        bound: Option<u32>,
        replacing: Option<&str>,
        now: u64,
    ) -> Result<Admit, AdminError> {
        let max = bound.map_or(-1, i64::from).to_string();
        let held: i64 = self
            .script(
                ADMIT,
                tenant,
                &[
                    &now.to_string(),
                    &max,
                    id,
                    value,
                    replacing.unwrap_or(""),
                    FILLED,
                ],
            )
            .await?;
        Ok(match held {
            -1 => Admit::Taken,
            -2 => Admit::NotFilled,
            _ => Admit::Held,
        })
    }

    /// Takes a place for the new key `r` before its record is written: fills the tenant's ledger
    /// on its first create, and when the bound refuses, checks the ledger against the records
    /// once and asks again.
    pub(super) async fn reserve(
        &self,
        r: &KeyRecord,
        bound: Option<u32>,
        replacing: Option<&str>,
        now: u64,
    ) -> Result<(), AdminError> {
        let value = entry(r.expires_at, now + PENDING_SECS);
        self.take_place(&r.tenant, &r.id, &value, bound, replacing, now)
            .await
    }

    /// Admits `id`'s entry, filling the ledger first if no create has, and checking it against
    /// the records once before the bound refuses.
    async fn take_place(
        &self,
        tenant: &str,
        id: &str,
        value: &str,
        bound: Option<u32>,
        replacing: Option<&str>,
        now: u64,
    ) -> Result<(), AdminError> {
        let (mut filled, mut checked) = (false, false);
        loop {
            match self.admit(tenant, id, value, bound, replacing, now).await? {
                Admit::Taken => return Ok(()),
                Admit::NotFilled if !filled => {
                    self.fill(tenant, now).await?;
                    filled = true;
                }
                Admit::NotFilled => {
                    return Err(AdminError::Unavailable(
                        "the tenant's key ledger did not fill".into(),
                    ));
                }
                Admit::Held if !checked => {
                    self.check(tenant, now).await?;
                    checked = true;
                }
                Admit::Held => return Err(AdminError::KeyLimit(bound.unwrap_or(u32::MAX))),
            }
        }
    }

    /// Before a change of an existing key that leaves it active: its entry, pending, at least as
    /// wide as the record before and after (`expires_at`), so the ledger never misses it while the
    /// record changes. A key that was not active counts against `bound`. A ledger not filled yet
    /// is filled first: left alone, a fill running beside this change could read the record
    /// before it is written and the settle after it could find no ledger, so the key would never
    /// be counted (and a tenant at the bound could bring an expired key back).
    pub(super) async fn widen(
        &self,
        tenant: &str,
        id: &str,
        expires_at: Option<u64>,
        bound: Option<u32>,
        now: u64,
    ) -> Result<(), AdminError> {
        let value = entry(expires_at, now + PENDING_SECS);
        self.take_place(tenant, id, &value, bound, None, now).await
    }

    /// After a write succeeded: the entry as the record now is (`None`: no longer active). Best
    /// effort: a failure leaves an entry that counts too much, which a check removes.
    pub(super) async fn settle(&self, tenant: &str, id: &str, value: Option<String>) {
        let value = value.unwrap_or_default();
        if let Err(e) = self.script::<i64>(SET, tenant, &[id, &value, FILLED]).await {
            tracing::warn!(error = %e, "Cannot update the tenant's key ledger; a later check will.");
        }
    }

    /// Fills the ledger from the tenant's records (its sorted set), unless another create did.
    async fn fill(&self, tenant: &str, now: u64) -> Result<(), AdminError> {
        let ids: Vec<String> = self
            .query(
                redis::cmd("ZRANGE")
                    .arg(self.tenant_index(tenant))
                    .arg(0)
                    .arg(-1),
            )
            .await?;
        let mut args = vec![FILLED.to_owned()];
        for id in ids {
            if let Some((r, _)) = self.by_index(&id).await?
                && r.tenant == tenant
                && state(&r, now) == KeyState::Active
            {
                args.push(r.id.clone());
                args.push(entry(r.expires_at, 0));
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _: i64 = self.script(FILL, tenant, &args).await?;
        Ok(())
    }

    /// Checks each entry that is not pending against its record: one whose key is revoked,
    /// expired or without a record leaves.
    async fn check(&self, tenant: &str, now: u64) -> Result<(), AdminError> {
        let entries: Vec<(String, String)> = self
            .query(redis::cmd("HGETALL").arg(self.ledger_name(tenant)))
            .await?;
        for (id, value) in entries {
            if id == FILLED {
                continue;
            }
            let (_, pending_until) = parse(&value);
            if pending_until > now {
                continue;
            }
            let stale = match self.by_index(&id).await? {
                Some((r, _)) => state(&r, now) != KeyState::Active,
                None => true,
            };
            if stale {
                let _: i64 = self.script(DROP_IF, tenant, &[&id, &value]).await?;
            }
        }
        Ok(())
    }
}

/// How long a create may take between its place and its record before it gives up.
pub(super) fn write_within() -> Duration {
    Duration::from_secs(PENDING_SECS / 2)
}

/// The widest of two expiries (`None`: never).
pub(super) fn widest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    Some(a?.max(b?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        assert_eq!(entry(None, 0), "0:0");
        assert_eq!(parse(&entry(Some(17), 99)), (17, 99));
        assert_eq!(parse("garbage"), (0, 0));
        assert_eq!(widest(Some(3), Some(5)), Some(5));
        assert_eq!(widest(None, Some(5)), None);
        assert_eq!(widest(Some(3), None), None);
    }
}
