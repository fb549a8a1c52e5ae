//! The command line's grammar: every command and option of `volumefs`, with the help text that
//! `--help` shows (clap derive). What the commands do is in the parent module.

use super::fields::Fields;
use crate::engine::parse_size;
use clap::{Args, Parser, Subcommand, ValueEnum};
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

    /// Creates, lists, inspects and deletes volumes
    #[command(subcommand)]
    Volume(VolumeCommand),

    /// Reads and writes files of a volume through the server
    #[command(subcommand)]
    File(FileCommand),

    /// Registers sandboxes, boots them as microVMs, runs commands in them, manages their lifecycle
    #[command(subcommand)]
    Sandbox(SandboxCommand),

    /// Attaches a volume to a sandbox at a mount path (mounted at once if its agent runs)
    Attach(AttachArgs),

    /// Detaches the volume mounted at a path of a sandbox
    Detach(DetachArgs),

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
        /// Capacity, like 2GiB or 512MiB (B, KiB, MiB, GiB, TiB, KB, MB, GB, TB); no auto-grow
        #[arg(long, value_name = "SIZE", default_value = "2GiB", value_parser = parse_size)]
        cap: u64,
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

    /// Deletes a volume and everything in it
    Delete {
        /// The volume
        name: String,
        /// Detaches it from every sandbox first (refused while attached without it)
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Args)]
pub struct FieldsArg {
    /// Only these fields, in this order (comma-separated: name, cap, used, free, inodes, created)
    #[arg(long, value_name = "FIELD,...", value_parser = Fields::parse)]
    pub fields: Option<Fields>,
}

#[derive(Debug, Subcommand)]
pub enum FileCommand {
    /// Writes a file's contents to stdout
    Read {
        /// The volume
        volume: String,
        /// The file's path in the volume
        path: String,
    },

    /// Replaces a file with stdin, atomically (parent directories are created)
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
