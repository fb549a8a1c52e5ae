//! The control plane's records, kept in the same metadata store as the volumes so that a
//! restart knows every intent the server had: sandboxes and their attachments. The server goes
//! through these calls and never opens a transaction of its own.

use super::meta::{AttachState, AttachmentRow, SandboxRow, TenantRow, VolId};
use super::Engine;
use crate::fs::{FsError, FsResult, Timespec};

fn no_sandbox(name: &str) -> FsError {
    FsError::new(libc::ENOENT, format!("sandbox `{name}` not found"))
}

impl Engine {
    /// Records a tenant; `EEXIST` if the name is taken.
    pub fn create_tenant(&self, name: &str, token_sha256: &str, default_cap: u64) -> FsResult<TenantRow> {
        super::check_plain_name("tenant", name)?;
        self.tx(|t| {
            if t.list_tenants()?.iter().any(|x| x.name == name) {
                return Err(FsError::new(libc::EEXIST, format!("tenant `{name}` already exists")));
            }
            let row = TenantRow { name: name.to_string(), token_sha256: token_sha256.to_string(), default_cap, created: Timespec::now() };
            t.insert_tenant(&row)?;
            Ok(row)
        })
    }

    pub fn tenant_by_token(&self, token_sha256: &str) -> FsResult<Option<TenantRow>> {
        self.tx(|t| t.tenant_by_token(token_sha256))
    }

    pub fn list_tenants(&self) -> FsResult<Vec<TenantRow>> {
        self.tx(|t| t.list_tenants())
    }

    pub fn list_sandboxes(&self) -> FsResult<Vec<SandboxRow>> {
        self.tx(|t| t.list_sandboxes())
    }

    /// Records a new sandbox; `EEXIST` if the name is taken.
    pub fn create_sandbox(&self, name: &str) -> FsResult<()> {
        self.tx(|t| {
            if t.get_sandbox(name)?.is_some() {
                return Err(FsError::new(libc::EEXIST, format!("sandbox `{name}` already exists")));
            }
            t.insert_sandbox(name, Timespec::now())
        })
    }

    pub fn delete_sandbox(&self, name: &str) -> FsResult<()> {
        self.tx(|t| {
            t.get_sandbox(name)?.ok_or_else(|| no_sandbox(name))?;
            t.delete_sandbox(name)
        })
    }

    /// Attachments, of one sandbox (which must exist) and/or of one volume.
    pub fn attachments(&self, sandbox: Option<&str>, volume: Option<VolId>) -> FsResult<Vec<AttachmentRow>> {
        self.tx(|t| {
            if let Some(sb) = sandbox {
                t.get_sandbox(sb)?.ok_or_else(|| no_sandbox(sb))?;
            }
            t.list_attachments(sandbox, volume)
        })
    }

    pub fn attachment(&self, id: u64) -> FsResult<Option<AttachmentRow>> {
        self.tx(|t| t.get_attachment(id))
    }

    /// Records an attachment (its `id` is chosen here and returned). The sandbox must exist and
    /// have nothing attached at the same path (`EBUSY`).
    pub fn add_attachment(&self, row: &AttachmentRow) -> FsResult<AttachmentRow> {
        self.tx(|t| {
            t.get_sandbox(&row.sandbox)?.ok_or_else(|| no_sandbox(&row.sandbox))?;
            if let Some(other) = t.list_attachments(Some(&row.sandbox), None)?.into_iter().find(|a| a.path == row.path) {
                return Err(FsError::new(
                    libc::EBUSY,
                    format!("sandbox `{}` already has a volume at {} (attachment {})", row.sandbox, row.path, other.id),
                ));
            }
            let mut row = row.clone();
            row.id = t.insert_attachment(&row)?;
            Ok(row)
        })
    }

    /// Sets an attachment's state; one that no longer exists is left alone.
    pub fn set_attachment_state(&self, id: u64, state: AttachState, reason: &str) -> FsResult<()> {
        self.tx(|t| match t.get_attachment(id)? {
            Some(_) => t.set_attachment_state(id, state, reason),
            None => Ok(()),
        })
    }

    pub fn delete_attachment(&self, id: u64) -> FsResult<()> {
        self.tx(|t| t.delete_attachment(id))
    }

    /// At startup: no lease outlives the server, so nothing is mounted until a guest says so.
    /// Returns the attachments that were mounted.
    pub fn release_all_mounted(&self, reason: &str) -> FsResult<Vec<u64>> {
        self.tx(|t| {
            let mounted: Vec<u64> =
                t.list_attachments(None, None)?.into_iter().filter(|a| a.state == AttachState::Mounted).map(|a| a.id).collect();
            for id in &mounted {
                t.set_attachment_state(*id, AttachState::Released, reason)?;
            }
            Ok(mounted)
        })
    }
}
