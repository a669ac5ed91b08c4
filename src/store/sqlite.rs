//! [`RecordStore`] on one SQLite file in WAL mode with `synchronous=FULL`:
//! a committed write survives a power cut, readers never block the writer.
//! One connection behind a mutex: writes are small and the server's write
//! rate is bounded by generation, far below what SQLite sustains.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use super::{AuditRecord, CompletionRecord, ExampleRecord, FeedbackQuery, FeedbackRecord, FileRecord, JobEvent, JobRecord, Purged, RecordStore, StoreError, StoredBytes};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    adapter TEXT,
    adapter_version INTEGER,
    kind TEXT NOT NULL,
    prompt TEXT NOT NULL,
    rendered_prompts TEXT NOT NULL,
    prompt_ids TEXT NOT NULL,
    n INTEGER NOT NULL,
    outputs TEXT NOT NULL,
    settings TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS completions_by_tenant ON completions (tenant, created_at);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    completion_id TEXT NOT NULL REFERENCES completions (id) ON DELETE CASCADE,
    tenant TEXT NOT NULL,
    adapter TEXT,
    adapter_version INTEGER,
    choice_index INTEGER NOT NULL,
    rating INTEGER,
    correction TEXT,
    comment TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_by_tenant ON feedback (tenant, adapter, seq);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    adapter TEXT NOT NULL,
    status TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, adapter, seq);
CREATE TABLE IF NOT EXISTS job_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (job_id, seq);
CREATE TABLE IF NOT EXISTS examples (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    adapter TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS examples_by_adapter ON examples (tenant, adapter, seq);
CREATE TABLE IF NOT EXISTS policies (
    tenant TEXT NOT NULL,
    adapter TEXT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (tenant, adapter)
);
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    body TEXT NOT NULL,
    content BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_tenant ON files (tenant, seq);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_tenant ON audit (tenant, action, target);
CREATE TABLE IF NOT EXISTS feedback_learned (
    feedback_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    PRIMARY KEY (feedback_id, job_id)
);
";

/// The SQLite-backed store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Database(format!("{}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// An in-memory store (tests).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        // Columns added after the first release: added to older files in place.
        for (table, column, decl) in [
            ("completions", "output_ids", "TEXT NOT NULL DEFAULT '[]'"),
            ("completions", "finish_reasons", "TEXT NOT NULL DEFAULT '[]'"),
        ] {
            let present: bool = conn
                .prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?
                .exists(params![column])?;
            if !present {
                conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
            }
        }
        Ok(SqliteStore { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written
        // (transactions roll back), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn feedback_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<FeedbackRecord> {
    Ok(FeedbackRecord {
        id: row.get("id")?,
        completion_id: row.get("completion_id")?,
        tenant: row.get("tenant")?,
        adapter: row.get("adapter")?,
        adapter_version: row.get("adapter_version")?,
        choice_index: row.get("choice_index")?,
        rating: row.get("rating")?,
        correction: row.get("correction")?,
        comment: row.get("comment")?,
        created_at: row.get::<_, i64>("created_at")? as u64,
    })
}

impl SqliteStore {
    /// A tenant adapter's feedback (`""` for the base model) for which a
    /// succeeded job's learning record `EXISTS` or `NOT EXISTS`.
    fn feedback_where(&self, tenant: &str, adapter: &str, exists: &str) -> Result<Vec<FeedbackRecord>, StoreError> {
        let conn = self.conn();
        let sql = format!(
            "SELECT * FROM feedback f WHERE tenant = ?1 AND IFNULL(adapter, '') = ?2 AND {exists}
             (SELECT 1 FROM feedback_learned l WHERE l.feedback_id = f.id) ORDER BY seq"
        );
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params![tenant, adapter], feedback_from_row)?;
        rows.collect::<Result<_, _>>().map_err(StoreError::from)
    }
}

impl RecordStore for SqliteStore {
    fn log_completion(&self, r: &CompletionRecord) -> Result<(), StoreError> {
        let outputs = serde_json::to_string(&r.outputs).map_err(|e| corrupt("outputs", e))?;
        self.conn().execute(
            "INSERT INTO completions (id, tenant, adapter, adapter_version, kind, prompt, rendered_prompts, n, outputs, settings, created_at, prompt_ids, output_ids, finish_reasons)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![
                r.id,
                r.tenant,
                r.adapter,
                r.adapter_version,
                r.kind,
                r.prompt.to_string(),
                serde_json::to_string(&r.rendered_prompts).map_err(|e| corrupt("rendered_prompts", e))?,
                r.n,
                outputs,
                r.settings.to_string(),
                r.created_at as i64,
                serde_json::to_string(&r.prompt_ids).map_err(|e| corrupt("prompt_ids", e))?,
                serde_json::to_string(&r.output_ids).map_err(|e| corrupt("output_ids", e))?,
                serde_json::to_string(&r.finish_reasons).map_err(|e| corrupt("finish_reasons", e))?,
            ],
        )?;
        Ok(())
    }

    fn completion(&self, tenant: &str, id: &str) -> Result<CompletionRecord, StoreError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT id, tenant, adapter, adapter_version, kind, prompt, rendered_prompts, outputs, settings, created_at, n, prompt_ids, output_ids, finish_reasons
                 FROM completions WHERE id = ?1 AND tenant = ?2",
                params![id, tenant],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Option<String>>(2)?,
                        row.get::<_, Option<u32>>(3)?,
                        row.get::<_, String>(4)?,
                        row.get::<_, String>(5)?,
                        row.get::<_, String>(6)?,
                        row.get::<_, String>(7)?,
                        row.get::<_, String>(8)?,
                        row.get::<_, i64>(9)?,
                        row.get::<_, u32>(10)?,
                        row.get::<_, String>(11)?,
                        row.get::<_, String>(12)?,
                        row.get::<_, String>(13)?,
                    ))
                },
            )
            .optional()?;
        let Some((id, tenant, adapter, adapter_version, kind, prompt, rendered_prompts, outputs, settings, created_at, n, prompt_ids, output_ids, finish_reasons)) =
            row
        else {
            return Err(StoreError::NotFound(format!("completion {id}")));
        };
        Ok(CompletionRecord {
            id,
            tenant,
            adapter,
            adapter_version,
            kind,
            prompt: serde_json::from_str(&prompt).map_err(|e| corrupt("prompt", e))?,
            rendered_prompts: serde_json::from_str(&rendered_prompts).map_err(|e| corrupt("rendered_prompts", e))?,
            n,
            prompt_ids: serde_json::from_str(&prompt_ids).map_err(|e| corrupt("prompt_ids", e))?,
            outputs: serde_json::from_str(&outputs).map_err(|e| corrupt("outputs", e))?,
            output_ids: serde_json::from_str(&output_ids).map_err(|e| corrupt("output_ids", e))?,
            finish_reasons: serde_json::from_str(&finish_reasons).map_err(|e| corrupt("finish_reasons", e))?,
            settings: serde_json::from_str(&settings).map_err(|e| corrupt("settings", e))?,
            created_at: created_at as u64,
        })
    }

    fn add_feedback(&self, r: &FeedbackRecord, max_per_completion: usize) -> Result<(), StoreError> {
        let conn = self.conn();
        if max_per_completion > 0 {
            let n: i64 = conn.query_row("SELECT COUNT(*) FROM feedback WHERE completion_id = ?1", params![r.completion_id], |row| row.get(0))?;
            if n as usize >= max_per_completion {
                return Err(StoreError::Limit { what: format!("feedback on completion {}", r.completion_id), limit: max_per_completion });
            }
        }
        conn.execute(
            "INSERT INTO feedback (id, completion_id, tenant, adapter, adapter_version, choice_index, rating, correction, comment, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                r.id,
                r.completion_id,
                r.tenant,
                r.adapter,
                r.adapter_version,
                r.choice_index,
                r.rating,
                r.correction,
                r.comment,
                r.created_at as i64
            ],
        )?;
        Ok(())
    }

    fn feedback(&self, tenant: &str, q: &FeedbackQuery) -> Result<Vec<FeedbackRecord>, StoreError> {
        let conn = self.conn();
        let after_seq: i64 = match &q.after {
            None => 0,
            Some(id) => conn
                .query_row("SELECT seq FROM feedback WHERE id = ?1 AND tenant = ?2", params![id, tenant], |r| r.get(0))
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("feedback {id}")))?,
        };
        let limit = if q.limit == 0 { i64::MAX } else { q.limit as i64 };
        let mut out = Vec::new();
        match &q.adapter {
            None => {
                let mut stmt = conn.prepare(
                    "SELECT * FROM feedback WHERE tenant = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                )?;
                for r in stmt.query_map(params![tenant, after_seq, limit], feedback_from_row)? {
                    out.push(r?);
                }
            }
            Some(adapter) => {
                let mut stmt = conn.prepare(
                    "SELECT * FROM feedback WHERE tenant = ?1 AND IFNULL(adapter, '') = ?2 AND seq > ?3 ORDER BY seq LIMIT ?4",
                )?;
                for r in stmt.query_map(params![tenant, adapter, after_seq, limit], feedback_from_row)? {
                    out.push(r?);
                }
            }
        }
        Ok(out)
    }

    fn prune_completions(&self, tenant: &str, before: u64) -> Result<usize, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM completions WHERE tenant = ?1 AND created_at < ?2", params![tenant, before as i64])?;
        Ok(n)
    }

    fn tenants(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT DISTINCT tenant FROM completions ORDER BY tenant")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect::<Result<_, _>>().map_err(StoreError::from)
    }

    fn pending_feedback(&self, tenant: &str, adapter: &str) -> Result<Vec<FeedbackRecord>, StoreError> {
        self.feedback_where(tenant, adapter, "NOT EXISTS")
    }

    fn learned_feedback(&self, tenant: &str, adapter: &str) -> Result<Vec<FeedbackRecord>, StoreError> {
        self.feedback_where(tenant, adapter, "EXISTS")
    }

    fn add_examples(&self, examples: &[ExampleRecord]) -> Result<(), StoreError> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        for e in examples {
            let body = serde_json::to_string(e).map_err(|err| corrupt("example", err))?;
            tx.execute(
                "INSERT INTO examples (id, tenant, adapter, body) VALUES (?1, ?2, ?3, ?4)",
                params![e.id, e.tenant, e.adapter, body],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn examples(&self, tenant: &str, adapter: &str, learned: bool) -> Result<Vec<ExampleRecord>, StoreError> {
        let conn = self.conn();
        let exists = if learned { "EXISTS" } else { "NOT EXISTS" };
        let sql = format!(
            "SELECT body FROM examples e WHERE tenant = ?1 AND adapter = ?2 AND {exists}
             (SELECT 1 FROM feedback_learned l WHERE l.feedback_id = e.id) ORDER BY seq"
        );
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params![tenant, adapter], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for r in rows {
            out.push(serde_json::from_str(&r?).map_err(|e| corrupt("example", e))?);
        }
        Ok(out)
    }

    fn save_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        let body = serde_json::to_string(job).map_err(|e| corrupt("job", e))?;
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        tx.execute(
            "INSERT INTO jobs (id, tenant, adapter, status, body) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body",
            params![job.id, job.tenant, job.adapter, job.status, body],
        )?;
        if job.status == "succeeded" {
            for f in &job.feedback_ids {
                tx.execute("INSERT OR IGNORE INTO feedback_learned (feedback_id, job_id) VALUES (?1, ?2)", params![f, job.id])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn job_by_id(&self, id: &str) -> Result<JobRecord, StoreError> {
        let body: Option<String> =
            self.conn().query_row("SELECT body FROM jobs WHERE id = ?1", params![id], |r| r.get(0)).optional()?;
        let body = body.ok_or_else(|| StoreError::NotFound(format!("fine-tuning job {id}")))?;
        serde_json::from_str(&body).map_err(|e| corrupt("job", e))
    }

    fn job(&self, tenant: &str, id: &str) -> Result<JobRecord, StoreError> {
        let body: Option<String> = self
            .conn()
            .query_row("SELECT body FROM jobs WHERE id = ?1 AND tenant = ?2", params![id, tenant], |r| r.get(0))
            .optional()?;
        let body = body.ok_or_else(|| StoreError::NotFound(format!("fine-tuning job {id}")))?;
        serde_json::from_str(&body).map_err(|e| corrupt("job", e))
    }

    fn jobs(&self, tenant: &str, adapter: Option<&str>, after: Option<&str>, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        let conn = self.conn();
        let before_seq: i64 = match after {
            None => i64::MAX,
            Some(id) => conn
                .query_row("SELECT seq FROM jobs WHERE id = ?1 AND tenant = ?2", params![id, tenant], |r| r.get(0))
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("fine-tuning job {id}")))?,
        };
        let mut stmt = conn.prepare(
            "SELECT body FROM jobs WHERE tenant = ?1 AND (?2 IS NULL OR adapter = ?2) AND seq < ?3 ORDER BY seq DESC LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![tenant, adapter, before_seq, limit as i64], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for r in rows {
            out.push(serde_json::from_str(&r?).map_err(|e| corrupt("job", e))?);
        }
        Ok(out)
    }

    fn add_job_event(&self, event: &JobEvent) -> Result<(), StoreError> {
        let body = serde_json::to_string(event).map_err(|e| corrupt("event", e))?;
        self.conn().execute("INSERT INTO job_events (job_id, body) VALUES (?1, ?2)", params![event.job_id, body])?;
        Ok(())
    }

    fn job_events(&self, job_id: &str, limit: usize) -> Result<Vec<JobEvent>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT body FROM job_events WHERE job_id = ?1 ORDER BY seq DESC LIMIT ?2")?;
        let rows = stmt.query_map(params![job_id, limit as i64], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for r in rows {
            out.push(serde_json::from_str(&r?).map_err(|e| corrupt("event", e))?);
        }
        Ok(out)
    }

    fn rating_counts(&self, tenant: &str, adapter: Option<&str>, version: Option<u32>, first: usize) -> Result<(usize, usize), StoreError> {
        let conn = self.conn();
        let limit = i64::try_from(first).unwrap_or(i64::MAX);
        let (rated, down): (i64, Option<i64>) = conn.query_row(
            "SELECT COUNT(*), SUM(rating < 0) FROM (SELECT rating FROM feedback
               WHERE tenant = ?1 AND adapter IS ?2 AND adapter_version IS ?3 AND rating IS NOT NULL
               ORDER BY seq LIMIT ?4)",
            params![tenant, adapter, version, limit],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok((rated as usize, down.unwrap_or(0) as usize))
    }

    fn policy(&self, tenant: &str, adapter: &str) -> Result<Option<Value>, StoreError> {
        let body: Option<String> = self
            .conn()
            .query_row("SELECT body FROM policies WHERE tenant = ?1 AND adapter = ?2", params![tenant, adapter], |r| r.get(0))
            .optional()?;
        body.map(|b| serde_json::from_str(&b).map_err(|e| corrupt("policy", e))).transpose()
    }

    fn set_policy(&self, tenant: &str, adapter: &str, overrides: Option<&Value>) -> Result<(), StoreError> {
        let conn = self.conn();
        match overrides {
            Some(v) => conn.execute(
                "INSERT INTO policies (tenant, adapter, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT (tenant, adapter) DO UPDATE SET body = excluded.body",
                params![tenant, adapter, v.to_string()],
            )?,
            None => conn.execute("DELETE FROM policies WHERE tenant = ?1 AND adapter = ?2", params![tenant, adapter])?,
        };
        Ok(())
    }

    fn add_file(&self, record: &FileRecord, content: &[u8]) -> Result<(), StoreError> {
        let body = serde_json::to_string(record).map_err(|e| corrupt("file record", e))?;
        self.conn().execute(
            "INSERT INTO files (id, tenant, body, content) VALUES (?1, ?2, ?3, ?4)",
            params![record.id, record.tenant, body, content],
        )?;
        Ok(())
    }

    fn file(&self, tenant: &str, id: &str) -> Result<FileRecord, StoreError> {
        let body: Option<String> = self
            .conn()
            .query_row("SELECT body FROM files WHERE tenant = ?1 AND id = ?2", params![tenant, id], |r| r.get(0))
            .optional()?;
        let body = body.ok_or_else(|| StoreError::NotFound(format!("file {id}")))?;
        serde_json::from_str(&body).map_err(|e| corrupt("file record", e))
    }

    fn file_content(&self, tenant: &str, id: &str) -> Result<Vec<u8>, StoreError> {
        self.conn()
            .query_row("SELECT content FROM files WHERE tenant = ?1 AND id = ?2", params![tenant, id], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("file {id}")))
    }

    fn files(&self, tenant: &str, purpose: Option<&str>, limit: usize) -> Result<Vec<FileRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT body FROM files WHERE tenant = ?1 ORDER BY seq DESC")?;
        let rows = stmt.query_map(params![tenant], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for body in rows {
            let f: FileRecord = serde_json::from_str(&body?).map_err(|e| corrupt("file record", e))?;
            if purpose.is_none_or(|p| p == f.purpose) {
                out.push(f);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn delete_file(&self, tenant: &str, id: &str) -> Result<(), StoreError> {
        match self.conn().execute("DELETE FROM files WHERE tenant = ?1 AND id = ?2", params![tenant, id])? {
            0 => Err(StoreError::NotFound(format!("file {id}"))),
            _ => Ok(()),
        }
    }

    fn add_audit(&self, record: &AuditRecord) -> Result<(), StoreError> {
        let body = serde_json::to_string(record).map_err(|e| corrupt("audit record", e))?;
        self.conn().execute(
            "INSERT INTO audit (id, tenant, action, target, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![record.id, record.tenant, record.action, record.target, body],
        )?;
        Ok(())
    }

    fn audit(&self, tenant: Option<&str>, action: Option<&str>, after: Option<&str>, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let conn = self.conn();
        let after_seq: i64 = match after {
            None => 0,
            Some(id) => conn
                .query_row("SELECT seq FROM audit WHERE id = ?1", params![id], |r| r.get(0))
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("audit entry {id}")))?,
        };
        let mut stmt = conn.prepare(
            "SELECT body FROM audit WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR action = ?2) AND seq > ?3 ORDER BY seq LIMIT ?4",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![tenant, action, after_seq, limit], |r| r.get::<_, String>(0))?;
        rows.map(|b| serde_json::from_str(&b?).map_err(|e| corrupt("audit record", e))).collect()
    }

    fn audited(&self, tenant: &str, actions: &[&str], target: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT 1 FROM audit WHERE tenant = ?1 AND action = ?2 AND target = ?3
             AND seq > IFNULL((SELECT MAX(seq) FROM audit WHERE tenant = ?1 AND action = 'tenant.deleted'), 0) LIMIT 1",
        )?;
        for action in actions {
            if stmt.exists(params![tenant, action, target])? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn stored_bytes(&self, tenant: &str) -> Result<StoredBytes, StoreError> {
        let conn = self.conn();
        let files: i64 = conn.query_row("SELECT IFNULL(SUM(LENGTH(content)), 0) FROM files WHERE tenant = ?1", params![tenant], |r| r.get(0))?;
        let examples: i64 = conn.query_row("SELECT IFNULL(SUM(LENGTH(body)), 0) FROM examples WHERE tenant = ?1", params![tenant], |r| r.get(0))?;
        Ok(StoredBytes { files: files.max(0) as u64, examples: examples.max(0) as u64 })
    }

    fn delete_tenant(&self, tenant: &str) -> Result<Purged, StoreError> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        tx.execute(
            "DELETE FROM feedback_learned WHERE job_id IN (SELECT id FROM jobs WHERE tenant = ?1)
             OR feedback_id IN (SELECT id FROM feedback WHERE tenant = ?1)",
            params![tenant],
        )?;
        tx.execute("DELETE FROM job_events WHERE job_id IN (SELECT id FROM jobs WHERE tenant = ?1)", params![tenant])?;
        let purged = Purged {
            jobs: tx.execute("DELETE FROM jobs WHERE tenant = ?1", params![tenant])?,
            feedback: tx.execute("DELETE FROM feedback WHERE tenant = ?1", params![tenant])?,
            completions: tx.execute("DELETE FROM completions WHERE tenant = ?1", params![tenant])?,
            files: tx.execute("DELETE FROM files WHERE tenant = ?1", params![tenant])?,
            examples: tx.execute("DELETE FROM examples WHERE tenant = ?1", params![tenant])?,
            policies: tx.execute("DELETE FROM policies WHERE tenant = ?1", params![tenant])?,
        };
        tx.commit()?;
        Ok(purged)
    }

    fn fail_unfinished_jobs(&self, reason: &str) -> Result<Vec<JobRecord>, StoreError> {
        let bodies: Vec<String> = {
            let conn = self.conn();
            let mut stmt = conn.prepare("SELECT body FROM jobs WHERE status IN ('queued', 'running')")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut failed = Vec::new();
        for b in bodies {
            let mut job: JobRecord = serde_json::from_str(&b).map_err(|e| corrupt("job", e))?;
            job.status = "failed".into();
            job.error = Some(reason.to_string());
            job.finished_at = Some(super::now());
            self.save_job(&job)?;
            failed.push(job);
        }
        Ok(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn completion(id: &str, tenant: &str, adapter: Option<&str>, at: u64) -> CompletionRecord {
        CompletionRecord {
            id: id.into(),
            tenant: tenant.into(),
            adapter: adapter.map(str::to_string),
            adapter_version: adapter.map(|_| 3),
            kind: "chat".into(),
            prompt: json!([{"role": "user", "content": "hi"}]),
            rendered_prompts: vec!["<user>hi</user>".into()],
            prompt_ids: vec![vec![1, 5, 6]],
            n: 2,
            outputs: vec!["hello".into(), "hey".into()],
            output_ids: vec![vec![7, 8], vec![9]],
            finish_reasons: vec!["stop".into(), "length".into()],
            settings: json!({"temperature": 0}),
            created_at: at,
        }
    }

    fn feedback(id: &str, completion_id: &str, tenant: &str, adapter: Option<&str>) -> FeedbackRecord {
        FeedbackRecord {
            id: id.into(),
            completion_id: completion_id.into(),
            tenant: tenant.into(),
            adapter: adapter.map(str::to_string),
            adapter_version: None,
            choice_index: 0,
            rating: Some(-1),
            correction: Some("better".into()),
            comment: None,
            created_at: 5,
        }
    }

    #[test]
    fn completions_are_read_back_only_by_their_tenant() {
        let s = SqliteStore::in_memory().unwrap();
        let c = completion("chatcmpl-1", "acme", Some("bot"), 10);
        s.log_completion(&c).unwrap();
        assert_eq!(s.completion("acme", "chatcmpl-1").unwrap(), c);
        assert!(matches!(s.completion("other", "chatcmpl-1"), Err(StoreError::NotFound(_))));
        assert!(s.log_completion(&c).is_err(), "ids are unique");
    }

    #[test]
    fn feedback_lists_by_adapter_with_a_cursor_and_retention_prunes_it() {
        let s = SqliteStore::in_memory().unwrap();
        s.log_completion(&completion("c1", "acme", Some("bot"), 10)).unwrap();
        s.log_completion(&completion("c2", "acme", None, 20)).unwrap();
        s.add_feedback(&feedback("f1", "c1", "acme", Some("bot")), 0).unwrap();
        s.add_feedback(&feedback("f2", "c2", "acme", None), 0).unwrap();
        s.add_feedback(&feedback("f3", "c1", "acme", Some("bot")), 0).unwrap();
        let all = s.feedback("acme", &FeedbackQuery::default()).unwrap();
        assert_eq!(all.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), ["f1", "f2", "f3"]);
        let bot = s.feedback("acme", &FeedbackQuery { adapter: Some("bot".into()), ..Default::default() }).unwrap();
        assert_eq!(bot.len(), 2);
        let base = s.feedback("acme", &FeedbackQuery { adapter: Some(String::new()), ..Default::default() }).unwrap();
        assert_eq!(base[0].id, "f2");
        let page = s.feedback("acme", &FeedbackQuery { after: Some("f1".into()), limit: 1, ..Default::default() }).unwrap();
        assert_eq!(page[0].id, "f2");
        assert!(s.feedback("other", &FeedbackQuery::default()).unwrap().is_empty());
        assert_eq!(s.prune_completions("acme", 15).unwrap(), 1);
        let left = s.feedback("acme", &FeedbackQuery::default()).unwrap();
        assert_eq!(left.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), ["f2"], "feedback goes with its completion");
    }

    #[test]
    fn feedback_per_completion_is_capped() {
        let s = SqliteStore::in_memory().unwrap();
        s.log_completion(&completion("c1", "acme", None, 1)).unwrap();
        s.add_feedback(&feedback("f1", "c1", "acme", None), 2).unwrap();
        s.add_feedback(&feedback("f2", "c1", "acme", None), 2).unwrap();
        assert!(matches!(s.add_feedback(&feedback("f3", "c1", "acme", None), 2), Err(StoreError::Limit { limit: 2, .. })));
        s.add_feedback(&feedback("f3", "c1", "acme", None), 0).unwrap();
    }

    #[test]
    fn deleting_a_tenant_removes_its_records_and_spares_the_others() {
        let s = SqliteStore::in_memory().unwrap();
        for t in ["acme", "globex"] {
            s.log_completion(&completion(&format!("c-{t}"), t, None, 1)).unwrap();
            s.add_feedback(&feedback(&format!("f-{t}"), &format!("c-{t}"), t, None), 0).unwrap();
            s.add_file(&FileRecord { id: format!("file-{t}"), tenant: t.into(), filename: "a".into(), purpose: "fine-tune".into(), bytes: 3, created_at: 1 }, b"abc").unwrap();
            s.add_examples(&[ExampleRecord { id: format!("ex-{t}"), tenant: t.into(), adapter: "main".into(), prompt_ids: vec![1], answer_ids: vec![2], created_at: 1 }]).unwrap();
            s.set_policy(t, "main", Some(&json!({"steps": 3}))).unwrap();
        }
        assert_eq!(s.stored_bytes("acme").unwrap().files, 3);
        let purged = s.delete_tenant("acme").unwrap();
        assert_eq!((purged.completions, purged.feedback, purged.files, purged.examples, purged.policies), (1, 1, 1, 1, 1));
        assert!(s.completion("acme", "c-acme").is_err());
        assert!(s.feedback("acme", &FeedbackQuery::default()).unwrap().is_empty());
        assert!(s.files("acme", None, 10).unwrap().is_empty());
        assert!(s.examples("acme", "main", false).unwrap().is_empty());
        assert!(s.policy("acme", "main").unwrap().is_none());
        assert_eq!(s.stored_bytes("acme").unwrap(), StoredBytes::default());
        assert!(s.completion("globex", "c-globex").is_ok());
        assert_eq!(s.delete_tenant("acme").unwrap(), Purged::default(), "a second deletion finds nothing");
    }

    #[test]
    fn feedback_on_a_missing_completion_is_refused() {
        let s = SqliteStore::in_memory().unwrap();
        assert!(s.add_feedback(&feedback("f1", "nope", "acme", None), 0).is_err());
    }

    #[test]
    fn a_file_store_keeps_its_records_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/db.sqlite");
        {
            let s = SqliteStore::open(&path).unwrap();
            s.log_completion(&completion("c1", "acme", None, 1)).unwrap();
            s.add_feedback(&feedback("f1", "c1", "acme", None), 0).unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.feedback("acme", &FeedbackQuery::default()).unwrap().len(), 1);
    }

    #[test]
    fn a_database_from_before_output_ids_is_upgraded_in_place_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE completions (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, adapter TEXT, adapter_version INTEGER,
                   kind TEXT NOT NULL, prompt TEXT NOT NULL, rendered_prompts TEXT NOT NULL, prompt_ids TEXT NOT NULL,
                   n INTEGER NOT NULL, outputs TEXT NOT NULL, settings TEXT NOT NULL, created_at INTEGER NOT NULL);
                 INSERT INTO completions VALUES ('cmpl-old', 'acme', NULL, NULL, 'completion', '\"hi\"', '[\"hi\"]', '[[1]]', 1, '[\"yo\"]', '{}', 5);",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let old = store.completion("acme", "cmpl-old").unwrap();
        assert_eq!((old.outputs, old.output_ids, old.finish_reasons), (vec!["yo".to_string()], vec![], vec![]));
        let new = completion("cmpl-new", "acme", None, 6);
        store.log_completion(&new).unwrap();
        assert_eq!(store.completion("acme", "cmpl-new").unwrap(), new);
        drop(store);
        // Opening again finds the columns present.
        assert_eq!(SqliteStore::open(&path).unwrap().completion("acme", "cmpl-new").unwrap(), new);
    }
}
