//! The command line's grammar: every command and option of `volumefs`, with the help text that
//! `--help` shows (clap derive). What the commands do is in the parent module.

use super::fields::Fields;
use crate::engine::parse_size;
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use std::path::PathBuf;

/// Durable volumes for microVM sandboxes
///
/// `volumefs server` runs the storage server; every other command is a client of its HTTP API,
/// found through --server and authorised by --token.
#[derive(Debug, Parser)]
#[command(name = "volumefs", version, args_override_self = true, arg_required_else_help = true)]
pub struct Cli {
    /// The server's HTTP API
    #[arg(
        long,
        global = true,
        value_name = "URL",
        env = "VOLUMEFS_SERVER",
        hide_env_values = true,
        default_value = "http://127.0.0.1:7070",
        help_heading = "Client options"
    )]
    pub server: String,

    /// The API token (the server writes it to DATA/api-token)
    #[arg(long, global = true, value_name = "TOKEN", env = "VOLUMEFS_TOKEN", hide_env_values = true, help_heading = "Client options")]
    pub token: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the storage server in the foreground
    ///
    /// The API token is created in DIR/api-token, and the address the API listens on is written
    /// to DIR/http-addr once it listens. Logs go to stderr, filtered by RUST_LOG (default info).
    Server(ServerArgs),

    /// Volumes (create, list, inspect, delete) and the files in them (read, write, ls, upload, …)
    #[command(subcommand)]
    Volume(VolumeCommand),

    /// The old names of `volume read` and `volume write`, kept for scripts
    #[command(subcommand, hide = true)]
    File(FileCommand),

    /// Registers sandboxes, boots them as microVMs, runs commands in them, manages their lifecycle
    #[command(subcommand)]
    Sandbox(SandboxCommand),

    /// Attaches a volume to a sandbox at a mount path (mounted at once if its agent runs)
    ///
    /// The same volume, mode and subpath at a path whose mount is gone (unmounted in the guest,
    /// lease expired, mount failed) is attached again under its record; anything else at a path
    /// in use is refused (detach it first).
    Attach(AttachArgs),

    /// Detaches the volume mounted at a path of a sandbox
    Detach(DetachArgs),

    /// Tenants: their own tokens, namespaces and default caps (operator only)
    #[command(subcommand)]
    Tenant(TenantCommand),

    /// Deletes blocks no volume refers to (operator only; the server also runs it hourly)
    ///
    /// Only blocks older than the grace period go: a younger one may belong to a write whose
    /// metadata has not committed yet. The embedded store has nothing to collect.
    Gc {
        /// Seconds an unreferenced block is kept
        #[arg(long, value_name = "SECS", default_value_t = 3600)]
        grace: u64,
        /// Prints the report as JSON
        #[arg(long)]
        json: bool,
    },

    /// Prints a shell completion script
    ///
    /// For example: `volumefs completions bash > /etc/bash_completion.d/volumefs`,
    /// `volumefs completions zsh > ~/.zfunc/_volumefs` (with ~/.zfunc in fpath), or
    /// `volumefs completions fish > ~/.config/fish/completions/volumefs.fish`.
    Completions {
        /// The shell to complete for
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Data directory: metadata, file contents, api-token, http-addr
    #[arg(long, value_name = "DIR", default_value = "volumefs-data")]
    pub data: PathBuf,

    /// Keep metadata in this PostgreSQL database (postgres://user@host:port/db[?schema=NAME])
    /// instead of SQLite in DIR; file contents stay in DIR
    #[arg(long, value_name = "URL", env = "VOLUMEFS_META")]
    pub meta: Option<String>,

    /// Keep file contents as immutable blocks in this object store (file:///DIR, or
    /// s3://BUCKET?endpoint=URL[&region=R] with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) instead
    /// of files in DIR; servers sharing one --meta and one --blocks serve the same volumes
    #[arg(long, value_name = "URL", env = "VOLUMEFS_BLOCKS")]
    pub blocks: Option<String>,

    /// With an S3 --blocks: how much of the blocks read to keep on local disk, in DIR/block-cache
    /// (least recently used out first; 0: no disk cache)
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = crate::engine::parse_size)]
    pub block_cache: u64,

    /// Address the HTTP API listens on (port 0: any free port, see DIR/http-addr)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
    pub http: String,

    /// Seconds a guest may go without renewing its lease before its attachments fail
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub lease_ttl: u64,

    /// Seconds a resumable upload may sit untouched before it is removed
    #[arg(long, value_name = "SECS", default_value_t = 86_400)]
    pub upload_expiry: u64,

    /// Where the guest image for `sandbox run` is (found automatically when not given)
    #[arg(long, value_name = "DIR")]
    pub images: Option<PathBuf>,

    /// How log lines on stderr are written
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Lines for people
    Text,
    /// One JSON object per line
    Json,
}

impl From<LogFormat> for crate::logging::Format {
    fn from(f: LogFormat) -> Self {
        match f {
            LogFormat::Text => crate::logging::Format::Text,
            LogFormat::Json => crate::logging::Format::Json,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Creates a volume
    Create {
        /// The new volume's name
        name: String,
        /// Capacity, like 2GiB or 512MiB (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB); no auto-grow.
        /// Default 2GiB, or a tenant's default cap (only the operator sets caps)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        cap: Option<u64>,
        /// Prints the new volume as JSON
        #[arg(long)]
        json: bool,
    },

    /// Lists volumes: name, capacity, bytes used, inodes
    List {
        /// Prints JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        fields: FieldsArg,
    },

    /// Prints a volume as JSON
    Inspect {
        /// The volume
        name: String,
        /// Prints JSON (as without it)
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        fields: FieldsArg,
    },

    /// Makes a writable copy of a volume at once, sharing its blocks (needs a block store)
    ///
    /// The copy is every file as it is at one instant; it takes time proportional to the
    /// number of files, not their size. Each copy has its own cap and usage from then on.
    Clone {
        /// The volume to copy
        source: String,
        /// The new volume's name
        name: String,
        /// The copy's capacity (default: the source's; only the operator sets caps)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        cap: Option<u64>,
        /// Prints the new volume as JSON
        #[arg(long)]
        json: bool,
    },

    /// Checks a volume's consistency: names, link counts, inode count, blocks (exit 1 on problems)
    Fsck {
        /// The volume
        name: String,
        /// Prints the report as JSON
        #[arg(long)]
        json: bool,
    },

    /// Deletes a volume and everything in it
    Delete {
        /// The volume
        name: String,
        /// Detaches it from every sandbox first (refused while attached without it)
        #[arg(long)]
        force: bool,
    },

    #[command(flatten)]
    Files(FileVerb),
}

/// The file verbs of `volume`: paths are volume paths (`/a/b.txt`, from the volume's root).
#[derive(Debug, Subcommand)]
pub enum FileVerb {
    /// Writes a file's contents, or a byte range of them, to stdout (streamed)
    Read {
        /// The volume
        volume: String,
        /// The file's path in the volume
        path: String,
        /// Only these bytes: START-END (both included), START- (to the end) or -N (the last N)
        #[arg(long, value_name = "RANGE", value_parser = parse_range, allow_hyphen_values = true)]
        range: Option<ByteRange>,
        #[command(flatten)]
        quiet: Quiet,
    },

    /// Replaces a file with stdin or --from FILE, atomically (streamed)
    ///
    /// Readers see the old or the new contents, and a write that fails (the volume full, the
    /// connection dropped) changes nothing. An existing file keeps its mode.
    Write {
        /// The volume
        volume: String,
        /// The file's path in the volume
        path: String,
        /// Reads the contents from FILE instead of stdin
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
        /// Creates missing parent directories
        #[arg(short, long)]
        parents: bool,
        /// Adds the contents at the file's end, as one write, instead (atomic against every
        /// other appender; the file and its parents are created when missing; at most 64 MiB)
        #[arg(long)]
        append: bool,
        #[command(flatten)]
        quiet: Quiet,
        /// Prints the server's answer as JSON
        #[arg(long)]
        json: bool,
    },

    /// Writes many files in one request, all or nothing
    ///
    /// From a tar stream (modes, symlinks and modification times kept) or from JSON
    /// `{"files": [{"path": "a.txt", "content": "text"}]}`. Nothing is left behind when any
    /// entry fails (a `..` name, the volume full).
    #[command(group(ArgGroup::new("input").required(true).args(["tar", "json_input"])))]
    BatchWrite {
        /// The volume
        volume: String,
        /// The directory the paths are relative to (made with its parents when missing)
        #[arg(long, value_name = "DIR", default_value = "/")]
        to: String,
        /// A tar archive, or - for stdin
        #[arg(long, value_name = "FILE|-")]
        tar: Option<String>,
        /// A JSON document {"files": [{"path": "a.txt", "content": "text"}]}, or - for stdin
        #[arg(long = "json", value_name = "FILE|-")]
        json_input: Option<String>,
        #[command(flatten)]
        quiet: Quiet,
    },

    /// Moves or renames a file or directory
    ///
    /// A file at TO is replaced; TO's parent directory must exist.
    Mv {
        /// The volume
        volume: String,
        /// The path to move
        from: String,
        /// Its new path
        to: String,
        /// Prints the server's answer as JSON
        #[arg(long)]
        json: bool,
    },

    /// Removes a file, symlink or empty directory
    Rm {
        /// The volume
        volume: String,
        /// The path to remove
        path: String,
        /// Removes a directory and everything in it
        #[arg(short, long)]
        recursive: bool,
        /// Prints the server's answer as JSON
        #[arg(long)]
        json: bool,
    },

    /// Makes a directory
    Mkdir {
        /// The volume
        volume: String,
        /// The new directory's path
        path: String,
        /// Makes missing parents too; an existing directory is not an error
        #[arg(short, long)]
        parents: bool,
        /// Prints the server's answer as JSON
        #[arg(long)]
        json: bool,
    },

    /// Replaces the one occurrence of a text in a file
    ///
    /// None or several occurrences are an error that says how many, and nothing changes.
    Edit {
        /// The volume
        volume: String,
        /// The file's path in the volume
        path: String,
        /// The exact text to find (not a pattern)
        #[arg(long, value_name = "OLD")]
        find: String,
        /// What to put in its place
        #[arg(long, value_name = "NEW")]
        replace: String,
        /// Prints the server's answer as JSON
        #[arg(long)]
        json: bool,
    },

    /// Lists a directory: mode, size, modification time (UTC), path
    Ls {
        /// The volume
        volume: String,
        /// The directory (or file) to list
        #[arg(default_value = "/")]
        path: String,
        /// Lists everything below the directory too
        #[arg(short, long)]
        recursive: bool,
        /// Prints JSON: {"entries": [{path, name, kind, size, mode, uid, gid, nlink, ino, mtime, atime, ctime, target?}], "truncated"}
        #[arg(long)]
        json: bool,
    },

    /// Shows a path's attributes (a symlink's own)
    Stat {
        /// The volume
        volume: String,
        /// The path
        path: String,
        /// Prints JSON: {path, name, kind, size, mode, uid, gid, nlink, ino, mtime, atime, ctime, target?}
        #[arg(long)]
        json: bool,
    },

    /// Exits with 0 when a path exists, 1 when it does not, 2 on errors
    ///
    /// Nothing is printed for 0 and 1; an error (no such volume, a path with `..`) is printed
    /// on stderr.
    Exists {
        /// The volume
        volume: String,
        /// The path
        path: String,
    },

    /// Finds files by name (a glob) and lines by content (a regular expression)
    ///
    /// Prints `path:line:text` for each matching line (as grep does) with --content, and the
    /// matching paths without it. Files that are not UTF-8 text or larger than 64 MiB are skipped
    /// by --content.
    Search {
        /// The volume
        volume: String,
        /// Where to search
        #[arg(default_value = "/")]
        path: String,
        /// Only files whose name (last component) matches this glob, like `*.rs`
        #[arg(long, value_name = "GLOB")]
        name: Option<String>,
        /// Only lines that match this regular expression
        #[arg(long, value_name = "REGEX")]
        content: Option<String>,
        /// At most N matches (the server's default: 1000)
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// Prints JSON: {"matches": [{path, line?, text?}], "truncated"}
        #[arg(long)]
        json: bool,
    },

    /// Replaces every match of a regular expression in the text files below a path
    ///
    /// Prints each changed file with its number of replacements. Files that are not UTF-8 text
    /// or larger than 64 MiB are left alone.
    Replace {
        /// The volume
        volume: String,
        /// The file or directory to work on
        path: String,
        /// The regular expression to find
        #[arg(long, value_name = "REGEX")]
        find: String,
        /// What to put in its place (`$1`, `${name}` name groups of the expression)
        #[arg(long, value_name = "NEW")]
        replace: String,
        /// Only files whose name matches this glob, like `*.md`
        #[arg(long, value_name = "GLOB")]
        name: Option<String>,
        /// Prints JSON: {"changed": [{path, replacements}]}
        #[arg(long)]
        json: bool,
    },

    /// Uploads a local file, directory tree or stdin (-) to PATH (streamed)
    ///
    /// A file or stdin replaces the file at PATH atomically. A directory's contents go below
    /// PATH, all or nothing, sent as a tar stream made on the fly: modes, symlinks (not
    /// followed) and modification times are kept.
    Upload {
        /// A local file or directory, or - for stdin
        local: PathBuf,
        /// The volume
        volume: String,
        /// The path in the volume
        path: String,
        /// Creates missing parent directories (a directory's destination always is)
        #[arg(short, long)]
        parents: bool,
        #[command(flatten)]
        quiet: Quiet,
        /// Prints the server's answer as JSON
        #[arg(long)]
        json: bool,
    },

    /// Downloads a file or directory tree to LOCAL (streamed)
    ///
    /// A file is written to LOCAL (into it, when it is a directory; - for stdout). A directory is
    /// unpacked into LOCAL (made when missing), with modes, symlinks and modification times.
    /// With --archive, the archive itself is written to LOCAL (or stdout).
    Download {
        /// The volume
        volume: String,
        /// The path in the volume
        path: String,
        /// Where to put it, or - for stdout
        local: PathBuf,
        /// Downloads an archive of the path in this format instead
        #[arg(long, value_name = "FORMAT", value_enum)]
        archive: Option<ArchiveFormat>,
        #[command(flatten)]
        quiet: Quiet,
    },

    /// Prints the changes under PATH as they happen (from sandboxes and the API alike)
    ///
    /// One line per change: KIND PATH (moves: move FROM -> TO). Reconnects by itself after a
    /// dropped connection, resuming after the last change seen. With --json, one JSON object per
    /// line. Runs until interrupted, or until --count changes were printed.
    Watch {
        /// The volume
        volume: String,
        /// Only changes under this path
        #[arg(default_value = "/")]
        path: String,
        /// Stops after this many changes
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },

    /// Prints a URL that downloads PATH without a token until it expires
    Url {
        /// The volume
        volume: String,
        /// The file (or, with --archive, file or directory) to share
        path: String,
        /// The URL downloads an archive of the path in this format
        #[arg(long, value_name = "FORMAT", value_enum)]
        archive: Option<ArchiveFormat>,
        /// How long the URL works: 30s, 15m, 2h, 7d (at most 7 days)
        #[arg(long, value_name = "DURATION", default_value = "15m", value_parser = parse_duration)]
        expires: u64,
        /// Prints JSON: {url, expires_at, path}
        #[arg(long)]
        json: bool,
    },
}

/// `-q`: no progress bar.
#[derive(Debug, Args)]
pub struct Quiet {
    /// Shows no progress (progress is drawn only on a terminal, for transfers that take a while)
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArchiveFormat {
    Tar,
    #[value(name = "tar.gz")]
    TarGz,
    Zip,
}

impl ArchiveFormat {
    /// The name the API knows it by.
    pub fn name(self) -> &'static str {
        match self {
            ArchiveFormat::Tar => "tar",
            ArchiveFormat::TarGz => "tar.gz",
            ArchiveFormat::Zip => "zip",
        }
    }
}

/// A `--range`: the value of its `Range` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByteRange(pub String);

/// `START-END`, `START-` or `-N` → `bytes=…`.
pub fn parse_range(s: &str) -> Result<ByteRange, String> {
    let bad = || format!("invalid range {s:?}: expected START-END, START- or -N (byte offsets, END included)");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let num = |t: &str| if t.bytes().all(|c| c.is_ascii_digit()) { t.parse::<u64>().map_err(|_| bad()) } else { Err(bad()) };
    match (a.trim(), b.trim()) {
        ("", "") => Err(bad()),
        ("", n) if num(n)? == 0 => Err(format!("invalid range {s:?}: the last 0 bytes are nothing")),
        ("", n) => Ok(ByteRange(format!("bytes=-{}", num(n)?))),
        (a, "") => Ok(ByteRange(format!("bytes={}-", num(a)?))),
        (a, b) => {
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err(format!("invalid range {s:?}: START is past END"));
            }
            Ok(ByteRange(format!("bytes={a}-{b}")))
        }
    }
}

/// `30s`, `15m`, `2h`, `7d` or plain seconds → seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("invalid duration {s:?}: expected a number and a unit, like 30s, 15m, 2h or 7d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("invalid duration {s:?}: unknown unit {unit:?} (s, m, h, d)")),
    };
    match n.checked_mul(scale) {
        Some(0) => Err(format!("invalid duration {s:?}: must be more than 0")),
        Some(secs) => Ok(secs),
        None => Err(format!("invalid duration {s:?}: too long")),
    }
}

#[derive(Debug, Args)]
pub struct FieldsArg {
    /// Only these fields, in this order (comma-separated: name, cap, used, free, inodes, created)
    #[arg(long, value_name = "FIELD,...", value_parser = Fields::parse)]
    pub fields: Option<Fields>,
}

/// `volumefs file read|write`: what `volume read` and `volume write -p` do now.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Creates a tenant and prints its API token (shown once; only its hash is kept)
    Create {
        /// The tenant's name
        name: String,
        /// The cap its volumes get (like 2GiB; default 2GiB)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        default_cap: Option<u64>,
        /// Prints JSON: {name, token, default_cap_bytes}
        #[arg(long)]
        json: bool,
    },
    /// Lists tenants
    List {
        /// Prints JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum FileCommand {
    /// Writes a file's contents to stdout (now `volume read`)
    Read {
        /// The volume
        volume: String,
        /// The file's path in the volume
        path: String,
    },

    /// Replaces a file with stdin, atomically, parent directories created (now `volume write -p`)
    Write {
        /// The volume
        volume: String,
        /// The file's path in the volume
        path: String,
        /// Adds stdin at the file's end, as one write, instead (atomic against every other appender)
        #[arg(long)]
        append: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Registers a sandbox and prints its guest socket
    Create {
        /// The new sandbox's name
        sb: String,
        /// Prints the sandbox as JSON
        #[arg(long)]
        json: bool,
    },

    /// Lists sandboxes and their guest sockets
    List {
        /// Prints JSON
        #[arg(long)]
        json: bool,
    },

    /// Deletes a sandbox
    Delete {
        /// The sandbox
        sb: String,
    },

    /// Lists a sandbox's attachments: path, volume, mode, subpath, state, reason
    Attachments {
        /// The sandbox
        sb: String,
        /// Prints JSON
        #[arg(long)]
        json: bool,
    },

    /// Closes the sandbox's guest connections, as a snapshot restore does (nothing is lost)
    ResetConnections {
        /// The sandbox
        sb: String,
    },

    /// Flushes and releases the sandbox's leases; accesses in it wait until `resume`
    ///
    /// Run it before pausing or snapshotting the VM.
    Hibernate {
        /// The sandbox
        sb: String,
        /// Prints the attachments as JSON
        #[arg(long)]
        json: bool,
    },

    /// Takes the leases of a hibernated sandbox again; accesses continue
    Resume {
        /// The sandbox
        sb: String,
        /// Prints the attachments as JSON
        #[arg(long)]
        json: bool,
    },

    /// Registers NEW with the attachments of SB and its own identity; prints NEW's guest socket
    Fork {
        /// The sandbox to fork
        sb: String,
        /// The new sandbox's name
        new: String,
        /// Prints the new sandbox as JSON
        #[arg(long)]
        json: bool,
    },

    /// Boots a microVM (QEMU) for the sandbox with volumes attached
    Run(RunArgs),

    /// Stops the sandbox's microVM
    Stop {
        /// The sandbox
        sb: String,
    },

    /// Runs a command in the sandbox through its agent; exits with the command's exit code
    Exec(ExecArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The sandbox
    pub sb: String,

    /// A volume to attach at boot, as VOL:/mnt/path[:ro][:subpath=/dir] (repeatable)
    #[arg(long = "volume", value_name = "SPEC", value_parser = parse_volume_spec)]
    pub volumes: Vec<VolumeSpec>,

    /// Memory of the microVM
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    pub memory: String,

    /// Prints the attachments as JSON
    #[arg(long)]
    pub json: bool,
}

/// One `--volume` of `sandbox run`: the JSON of one boot attachment.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeSpec(pub Value);

/// `VOLUME:/mnt/path[:ro][:subpath=/dir]` → the JSON of one boot attachment.
pub fn parse_volume_spec(spec: &str) -> Result<VolumeSpec, String> {
    let mut parts = spec.split(':');
    let volume = parts.next().filter(|v| !v.is_empty());
    let path = parts.next().filter(|p| p.starts_with('/'));
    let (Some(volume), Some(path)) = (volume, path) else {
        return Err(format!("invalid --volume {spec:?}: expected VOLUME:/mnt/path[:ro][:subpath=/dir]"));
    };
    let mut read_only = false;
    let mut subpath = "/".to_string();
    for opt in parts {
        match opt {
            "ro" => read_only = true,
            "rw" => read_only = false,
            _ if opt.starts_with("subpath=") => subpath = opt["subpath=".len()..].to_string(),
            _ => return Err(format!("invalid --volume {spec:?}: unknown option {opt:?} (ro, rw, subpath=/dir)")),
        }
    }
    Ok(VolumeSpec(json!({"volume": volume, "path": path, "read_only": read_only, "subpath": subpath})))
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The sandbox
    pub sb: String,

    /// Sends our stdin to the command (read to its end first)
    #[arg(long)]
    pub stdin: bool,

    /// Accepted and ignored, as it always was (the server's default of 600 s applies)
    #[arg(long, value_name = "SECS", hide = true)]
    pub timeout: Option<String>,

    /// The command and its arguments, after `--`
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The sandbox
    pub sb: String,

    /// The volume
    pub volume: String,

    /// Mount path in the sandbox
    #[arg(long, value_name = "PATH")]
    pub at: String,

    /// Mounts it read-only
    #[arg(long)]
    pub read_only: bool,

    /// Attaches only this directory of the volume (it must exist)
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub subpath: String,

    /// Prints the attachment as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DetachArgs {
    /// The sandbox
    pub sb: String,

    /// Mount path in the sandbox
    #[arg(long, value_name = "PATH")]
    pub at: String,

    /// Detaches even while files are open on the mount
    #[arg(long)]
    pub force: bool,
}
