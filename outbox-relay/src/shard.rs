//! Shards and their ownership.
//!
//! Every key hashes to one shard; every shard is owned by at most one relay at a time through a
//! session-level Postgres advisory lock held on the relay's lease connection. When a relay dies its
//! connection closes, Postgres releases its locks and a survivor takes the shards over. Relays
//! count each other through "member slot" locks and each owns about `shards / members`.

use std::collections::BTreeSet;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

use crate::error::Result;
use crate::schema::SchemaName;

/// The shard of a key: CRC-32 of its bytes modulo the shard count. Stable across processes,
/// versions and languages (unlike Rust's `DefaultHasher`).
pub fn shard_of(key: &str, shard_count: u32) -> u32 {
    crc32fast::hash(key.as_bytes()) % shard_count.max(1)
}

/// Upper bound of member slots; more relay instances than this per source just wait.
const MAX_MEMBERS: i32 = 1024;

/// A stable, positive 31-bit lock namespace for `(purpose, schema)`.
fn lock_namespace(purpose: &str, schema: &SchemaName) -> i32 {
    let h = crc32fast::hash(format!("trialflow:{purpose}:{schema}").as_bytes());
    (h & 0x7fff_ffff) as i32
}

/// The advisory-lock namespace (first key of `pg_advisory_lock(int, int)`) of the shards of
/// `schema`; the second key is the shard. For operators: `SELECT pid, objid AS shard FROM pg_locks
/// WHERE locktype = 'advisory' AND classid::bigint = <this>` shows who owns what.
pub fn shard_lock_namespace(schema: &SchemaName) -> i32 {
    lock_namespace("outbox-shard", schema)
}

/// The lease of one relay instance on the shards of one outbox source.
#[derive(Debug)]
pub struct ShardLease {
    conn: PgConnection,
    shard_ns: i32,
    member_ns: i32,
    member_slot: Option<i32>,
    owned: BTreeSet<i32>,
}

impl ShardLease {
    /// Connects the lease connection. Reads of the outbox also go through this connection: a read
    /// that succeeds proves the session, and so the locks, are still alive.
    pub async fn connect(options: &PgConnectOptions, schema: &SchemaName) -> Result<Self> {
        let conn = PgConnection::connect_with(options).await?;
        Ok(Self {
            conn,
            shard_ns: shard_lock_namespace(schema),
            member_ns: lock_namespace("outbox-member", schema),
            member_slot: None,
            owned: BTreeSet::new(),
        })
    }

    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.conn
    }

    pub fn owned(&self) -> Vec<i32> {
        self.owned.iter().copied().collect()
    }

    /// Registers this instance as a member (once) and moves towards a fair share of the shards:
    /// releases shards above `ceil(shards / members)`, then tries to take free ones. Call it only
    /// when nothing is in flight for the shards it may release.
    pub async fn rebalance(&mut self, shard_count: u32) -> Result<()> {
        if self.member_slot.is_none() {
            self.member_slot = self.take_member_slot().await?;
        }
        let shard_count = shard_count as i32;
        // Shards beyond a reduced shard count are released: no writer targets them any more.
        let stale: Vec<i32> = self.owned.iter().copied().filter(|s| *s >= shard_count).collect();
        for shard in stale {
            self.release(shard).await?;
        }
        let members: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid::bigint = $1",
        )
        .bind(i64::from(self.member_ns))
        .fetch_one(&mut self.conn)
        .await?;
        let members = members.max(1) as i32;
        let fair_share = (shard_count + members - 1) / members;

        while self.owned.len() as i32 > fair_share {
            let Some(&shard) = self.owned.iter().next_back() else { break };
            self.release(shard).await?;
        }
        // Start the scan at an offset derived from the member slot so that instances joining at
        // the same time contend for different shards.
        let start = self.member_slot.unwrap_or(0).wrapping_mul(fair_share.max(1));
        for i in 0..shard_count {
            if self.owned.len() as i32 >= fair_share {
                break;
            }
            let shard = (start + i).rem_euclid(shard_count);
            if !self.owned.contains(&shard) && self.try_lock(self.shard_ns, shard).await? {
                self.owned.insert(shard);
            }
        }
        Ok(())
    }

    async fn take_member_slot(&mut self) -> Result<Option<i32>> {
        for slot in 0..MAX_MEMBERS {
            if self.try_lock(self.member_ns, slot).await? {
                return Ok(Some(slot));
            }
        }
        Ok(None)
    }

    async fn try_lock(&mut self, ns: i32, id: i32) -> Result<bool> {
        Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
            .bind(ns)
            .bind(id)
            .fetch_one(&mut self.conn)
            .await?)
    }

    async fn release(&mut self, shard: i32) -> Result<()> {
        sqlx::query("SELECT pg_advisory_unlock($1, $2)")
            .bind(self.shard_ns)
            .bind(shard)
            .execute(&mut self.conn)
            .await?;
        self.owned.remove(&shard);
        Ok(())
    }

    /// Releases every lock by closing the session.
    pub async fn close(self) {
        let _ = self.conn.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_is_stable_and_in_range() {
        // CRC-32 of "subject-1" is fixed; the shard must never change between releases.
        assert_eq!(shard_of("subject-1", 16), crc32fast::hash(b"subject-1") % 16);
        for n in [1, 2, 7, 16, 1024] {
            for key in ["", "a", "subject-42", "site-7"] {
                assert!(shard_of(key, n) < n);
            }
        }
        assert_eq!(shard_of("anything", 0), 0, "a zero shard count must not divide by zero");
    }

    #[test]
    fn keys_spread_over_shards() {
        let mut seen = BTreeSet::new();
        for i in 0..1000 {
            seen.insert(shard_of(&format!("subject-{i}"), 16));
        }
        assert_eq!(seen.len(), 16);
    }
}
