//! POSIX.1e access control lists, as Linux keeps them: the `system.posix_acl_access` and
//! `system.posix_acl_default` xattrs in Linux's xattr format (a little-endian `u32` version, 2,
//! then 8-byte entries: `u16` tag, `u16` permissions, `u32` id).
//!
//! The engine stores an ACL as that xattr (so it is listed, read back and charged to the cap like
//! any other) and marks the inode ([`crate::fs::ACL_ACCESS`], [`crate::fs::ACL_DEFAULT`] in
//! [`crate::fs::Attr::acl`]), so that the permission check of an inode without an ACL, the
//! common case, costs no query. The functions here are pure: they parse, validate and apply the
//! same rules as Linux's `fs/posix_acl.c`.

use crate::fs::{Attr, Caller, FsError, FsResult};

/// The xattr holding an inode's access ACL.
pub const ACCESS: &[u8] = b"system.posix_acl_access";
/// The xattr holding a directory's default ACL (what new inodes in it inherit).
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
pub const USER_OBJ: u16 = 0x01;
pub const USER: u16 = 0x02;
pub const GROUP_OBJ: u16 = 0x04;
pub const GROUP: u16 = 0x08;
pub const MASK: u16 = 0x10;
pub const OTHER: u16 = 0x20;
/// The id of entries that name no one (owner, owning group, mask, other).
pub const UNDEFINED_ID: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub tag: u16,
    pub perm: u16,
    pub id: u32,
}

/// A valid ACL: entries in Linux's order (owner, named users by id, owning group, named groups
/// by id, mask, other), each required entry once, a mask whenever a named entry exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acl {
    entries: Vec<Entry>,
}

fn einval(msg: impl Into<String>) -> FsError {
    FsError::new(libc::EINVAL, msg)
}

impl Acl {
    /// Parses and validates an xattr value. `None` is an ACL with no entries (just a header):
    /// setting it removes the ACL, as on Linux.
    pub fn parse(value: &[u8]) -> FsResult<Option<Acl>> {
        if value.len() < 4 {
            return Err(einval("a POSIX ACL starts with a 4-byte version header"));
        }
        let version = u32::from_le_bytes(value[..4].try_into().unwrap());
        if version != VERSION {
            return Err(FsError::new(libc::EOPNOTSUPP, format!("POSIX ACL version {version} is not supported (2 is)")));
        }
        let body = &value[4..];
        if !body.len().is_multiple_of(8) {
            return Err(einval("a POSIX ACL's entries are 8 bytes each"));
        }
        if body.is_empty() {
            return Ok(None);
        }
        let entries: Vec<Entry> = body
            .chunks_exact(8)
            .map(|e| Entry {
                tag: u16::from_le_bytes([e[0], e[1]]),
                perm: u16::from_le_bytes([e[2], e[3]]),
                id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            })
            .map(|mut e| {
                if !matches!(e.tag, USER | GROUP) {
                    // Linux ignores the id of entries that name no one.
                    e.id = UNDEFINED_ID;
                }
                e
            })
            .collect();
        let acl = Acl { entries };
        acl.validate()?;
        Ok(Some(acl))
    }

    /// Linux's `posix_acl_valid`: order, uniqueness, required entries, mask when needed.
    fn validate(&self) -> FsResult<()> {
        // Position of each tag in the required order.
        let rank = |tag| match tag {
            USER_OBJ => Some(0),
            USER => Some(1),
            GROUP_OBJ => Some(2),
            GROUP => Some(3),
            MASK => Some(4),
            OTHER => Some(5),
            _ => None,
        };
        let mut prev: Option<(u8, u32)> = None;
        let (mut owner, mut group, mut other, mut mask, mut named) = (0, 0, 0, 0, 0);
        for e in &self.entries {
            let r = rank(e.tag).ok_or_else(|| einval(format!("unknown POSIX ACL tag {:#x}", e.tag)))?;
            if e.perm & !7 != 0 {
                return Err(einval(format!("POSIX ACL permissions {:#o} are not rwx bits", e.perm)));
            }
            let named_entry = matches!(e.tag, USER | GROUP);
            if named_entry && e.id == UNDEFINED_ID {
                return Err(einval("a named POSIX ACL entry needs a valid id"));
            }
            if let Some((pr, pid)) = prev {
                let ordered = r > pr || (r == pr && named_entry && e.id > pid);
                if !ordered {
                    return Err(einval("POSIX ACL entries are out of order or repeated"));
                }
            }
            prev = Some((r, e.id));
            match e.tag {
                USER_OBJ => owner += 1,
                GROUP_OBJ => group += 1,
                OTHER => other += 1,
                MASK => mask += 1,
                _ => named += 1,
            }
        }
        if owner != 1 || group != 1 || other != 1 {
            return Err(einval("a POSIX ACL needs exactly one owner, owning-group and other entry"));
        }
        if named > 0 && mask == 0 {
            return Err(einval("a POSIX ACL with named entries needs a mask entry"));
        }
        Ok(())
    }

    /// The xattr value (ids of unnamed entries written as [`UNDEFINED_ID`], as Linux does).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * self.entries.len());
        out.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.entries {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Whether the permission bits can say all of it (no named entries; a mask becomes the
    /// group bits): such an access ACL is not stored (`posix_acl_equiv_mode`).
    pub fn is_minimal(&self) -> bool {
        self.entries.iter().all(|e| !matches!(e.tag, USER | GROUP))
    }

    fn perm_of(&self, tag: u16) -> Option<u32> {
        self.entries.iter().find(|e| e.tag == tag).map(|e| e.perm as u32)
    }

    /// The permission bits (`0o777`) this access ACL implies: owner, mask (or owning group
    /// without a mask), other.
    pub fn mode_bits(&self) -> u32 {
        let group = self.perm_of(MASK).or_else(|| self.perm_of(GROUP_OBJ)).unwrap_or(0);
        (self.perm_of(USER_OBJ).unwrap_or(0) << 6) | (group << 3) | self.perm_of(OTHER).unwrap_or(0)
    }

    /// chmod of an inode with this access ACL (`posix_acl_chmod`): owner, mask (or owning
    /// group) and other entries take the new permission bits; named entries stay.
    pub fn chmod(&mut self, perm: u32) {
        let has_mask = self.perm_of(MASK).is_some();
        for e in &mut self.entries {
            match e.tag {
                USER_OBJ => e.perm = ((perm >> 6) & 7) as u16,
                MASK => e.perm = ((perm >> 3) & 7) as u16,
                GROUP_OBJ if !has_mask => e.perm = ((perm >> 3) & 7) as u16,
                OTHER => e.perm = (perm & 7) as u16,
                _ => {}
            }
        }
    }

    /// A new inode's access ACL from its directory's default ACL (`posix_acl_create_masq`):
    /// the ACL's owner, mask (or owning group) and other entries are limited by the create mode
    /// `perm`, and `perm`'s rwx bits by them. Returns the new permission bits (special bits kept)
    /// and whether the ACL says more than they do (named entries or a mask): only then is it
    /// stored.
    pub fn create_masq(&mut self, perm: u32) -> (u32, bool) {
        let mut mode = perm;
        let has_mask = self.perm_of(MASK).is_some();
        for e in &mut self.entries {
            let shift = match e.tag {
                USER_OBJ => 6,
                MASK => 3,
                GROUP_OBJ if !has_mask => 3,
                OTHER => 0,
                _ => continue,
            };
            e.perm &= ((mode >> shift) & 7) as u16;
            mode &= !(0o7 << shift) | ((e.perm as u32) << shift);
        }
        (mode, !self.is_minimal() || has_mask)
    }

    /// The POSIX.1e access check (`posix_acl_permission`) for a caller who is not root: the
    /// owner entry for the owner; else a named user entry, limited by the mask; else the
    /// owning group and named groups: granted if a matching one grants `want` within the mask,
    /// denied if some matched and none does; else other.
    pub fn permits(&self, a: &Attr, c: &Caller, want: u32) -> bool {
        let mask = self.perm_of(MASK).unwrap_or(7);
        let grants = |perm: u32| perm & want == want;
        if c.uid == a.uid {
            return grants(self.perm_of(USER_OBJ).unwrap_or(0));
        }
        if let Some(e) = self.entries.iter().find(|e| e.tag == USER && e.id == c.uid) {
            return grants(e.perm as u32 & mask);
        }
        let mut matched = false;
        for e in &self.entries {
            let member = match e.tag {
                GROUP_OBJ => c.in_group(a.gid),
                GROUP => c.in_group(e.id),
                _ => false,
            };
            if member {
                matched = true;
                if grants(e.perm as u32) {
                    return grants(e.perm as u32 & mask);
                }
            }
        }
        !matched && grants(self.perm_of(OTHER).unwrap_or(0))
    }
}
