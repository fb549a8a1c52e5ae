//! The command line's grammar, without a server: what parses into what, help, typo
//! suggestions, exit codes, completions. (`cargo test --lib cli`)

use super::args::*;
use super::fields::Fields;
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("volumefs").chain(args.iter().copied()))
}

fn ok(args: &[&str]) -> Cli {
    parse(args).unwrap_or_else(|e| panic!("`volumefs {}` does not parse:\n{e}", args.join(" ")))
}

fn err(args: &[&str]) -> clap::Error {
    match parse(args) {
        Ok(cli) => panic!("`volumefs {}` parsed as {cli:?}", args.join(" ")),
        Err(e) => e,
    }
}

#[test]
fn the_grammar_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn every_command_has_help_that_exits_0() {
    for args in [
        &["--help"][..],
        &["help"],
        &["volume", "--help"],
        &["volume", "create", "--help"],
        &["file", "write", "--help"],
        &["sandbox", "--help"],
        &["sandbox", "exec", "--help"],
        &["sandbox", "run", "-h"],
        &["attach", "--help"],
        &["detach", "--help"],
        &["server", "--help"],
        &["completions", "--help"],
        &["help", "volume", "list"],
    ] {
        let e = err(args);
        assert_eq!(e.kind(), ErrorKind::DisplayHelp, "volumefs {}", args.join(" "));
        assert_eq!(e.exit_code(), 0, "volumefs {}", args.join(" "));
    }
    let help = err(&["volume", "--help"]).to_string();
    for sub in ["create", "list", "inspect", "delete"] {
        assert!(help.contains(sub), "`volume --help` does not mention {sub}:\n{help}");
    }
    let help = err(&["sandbox", "--help"]).to_string();
    for sub in ["create", "list", "delete", "attachments", "reset-connections", "hibernate", "resume", "fork", "run", "stop", "exec"] {
        assert!(help.contains(sub), "`sandbox --help` does not mention {sub}:\n{help}");
    }
    assert_eq!(err(&["--version"]).exit_code(), 0);
}

#[test]
fn a_mistyped_command_is_a_usage_error_with_a_suggestion() {
    let e = err(&["volme", "list"]);
    assert_eq!(e.kind(), ErrorKind::InvalidSubcommand);
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("'volume'"), "{e}");
    let e = err(&["sandbox", "hibernat", "sb"]);
    assert!(e.to_string().contains("'hibernate'"), "{e}");
    let e = err(&["volume", "list", "--jsno"]);
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("--json"), "{e}");
}

#[test]
fn no_command_shows_help_as_a_usage_error() {
    let e = err(&[]);
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("volume"), "{e}");
}

#[test]
fn server_and_token_are_global_options_with_env_fallbacks() {
    // The environment itself is tried on the binary (fuse-tests/volumes.rs): changing it here
    // would race with the other tests' parsing.
    let cmd = Cli::command();
    let arg = |id: &str| cmd.get_arguments().find(|a| a.get_id() == id).unwrap_or_else(|| panic!("no --{id}"));
    let server = arg("server");
    assert!(server.is_global_set());
    assert_eq!(server.get_env(), Some(std::ffi::OsStr::new("VOLUMEFS_SERVER")));
    assert_eq!(server.get_default_values(), ["http://127.0.0.1:7070"]);
    let token = arg("token");
    assert!(token.is_global_set() && token.is_hide_env_values_set());
    assert_eq!(token.get_env(), Some(std::ffi::OsStr::new("VOLUMEFS_TOKEN")));
    // Before or after the subcommand, with a space or `=`; an option wins over the environment.
    let cli = ok(&["volume", "list", "--server", "http://10.0.0.1:1", "--token", "t1"]);
    assert_eq!((cli.server.as_str(), cli.token.as_deref()), ("http://10.0.0.1:1", Some("t1")));
    let cli = ok(&["--server=http://h:2", "--token=t2", "sandbox", "list"]);
    assert_eq!((cli.server.as_str(), cli.token.as_deref()), ("http://h:2", Some("t2")));
    let cli = ok(&["sandbox", "--token", "t3", "attachments", "sb"]);
    assert_eq!(cli.token.as_deref(), Some("t3"));
}

#[test]
fn volume_create_parses_the_cap_with_the_engines_parser() {
    match ok(&["volume", "create", "data", "--cap", "1GiB", "--json"]).command {
        Command::Volume(VolumeCommand::Create { name, cap, json }) => assert_eq!((name.as_str(), cap, json), ("data", Some(1 << 30), true)),
        other => panic!("{other:?}"),
    }
    match ok(&["volume", "create", "data"]).command {
        Command::Volume(VolumeCommand::Create { cap, json, .. }) => assert_eq!((cap, json), (None, false)), // the server picks the default (a tenant's, or 2 GiB)
        other => panic!("{other:?}"),
    }
    let e = err(&["volume", "create", "bad", "--cap", "12parsecs"]);
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("unknown unit"), "{e}");
    // A repeated option: the last one counts, as before.
    match ok(&["volume", "create", "data", "--cap", "1GiB", "--cap=2MiB"]).command {
        Command::Volume(VolumeCommand::Create { cap, .. }) => assert_eq!(cap, Some(2 << 20)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn fields_are_checked_when_parsing() {
    match ok(&["volume", "list", "--fields", "used_bytes,name", "--json"]).command {
        Command::Volume(VolumeCommand::List { json, fields }) => {
            assert!(json);
            assert_eq!(fields.fields, Some(Fields(vec!["used_bytes".into(), "name".into()])));
        }
        other => panic!("{other:?}"),
    }
    match ok(&["volume", "inspect", "v", "--fields=cap_bytes"]).command {
        Command::Volume(VolumeCommand::Inspect { name, fields, .. }) => {
            assert_eq!(name, "v");
            assert_eq!(fields.fields.unwrap().names(), ["cap_bytes"]);
        }
        other => panic!("{other:?}"),
    }
    let e = err(&["volume", "list", "--fields", "name,size"]);
    assert_eq!(e.exit_code(), 2);
    let msg = e.to_string();
    assert!(msg.contains("valid fields: id, name, cap_bytes, used_bytes, free_bytes, files, created_at, attachments"), "{msg}");
}

#[test]
fn attach_detach_and_file_options() {
    match ok(&["attach", "sb", "vol", "--at", "/mnt/x", "--read-only", "--subpath", "/docs", "--json"]).command {
        Command::Attach(a) => {
            assert_eq!((a.sb.as_str(), a.volume.as_str(), a.at.as_str(), a.subpath.as_str()), ("sb", "vol", "/mnt/x", "/docs"));
            assert!(a.read_only && a.json);
        }
        other => panic!("{other:?}"),
    }
    match ok(&["attach", "sb", "vol", "--at", "/mnt/x"]).command {
        Command::Attach(a) => assert!(a.subpath == "/" && !a.read_only && !a.json),
        other => panic!("{other:?}"),
    }
    assert_eq!(err(&["attach", "sb", "vol"]).kind(), ErrorKind::MissingRequiredArgument);
    match ok(&["detach", "sb", "--at", "/mnt/x", "--force"]).command {
        Command::Detach(a) => assert!(a.sb == "sb" && a.at == "/mnt/x" && a.force),
        other => panic!("{other:?}"),
    }
    match ok(&["file", "write", "vol", "/log", "--append"]).command {
        Command::File(FileCommand::Write { volume, path, append }) => assert!(volume == "vol" && path == "/log" && append),
        other => panic!("{other:?}"),
    }
    assert_eq!(err(&["file", "read", "vol"]).exit_code(), 2);
    assert_eq!(err(&["volume", "delete", "v", "--json"]).kind(), ErrorKind::UnknownArgument);
}

#[test]
fn sandbox_exec_takes_the_command_after_the_double_dash() {
    match ok(&["sandbox", "exec", "sb", "--", "sh", "-c", "echo --json; exit 3"]).command {
        Command::Sandbox(SandboxCommand::Exec(a)) => {
            assert_eq!(a.sb, "sb");
            assert_eq!(a.cmd, ["sh", "-c", "echo --json; exit 3"]);
            assert!(!a.stdin);
        }
        other => panic!("{other:?}"),
    }
    match ok(&["--token", "t", "sandbox", "exec", "sb", "--stdin", "--timeout", "5", "--", "cat"]).command {
        Command::Sandbox(SandboxCommand::Exec(a)) => assert!(a.stdin && a.cmd == ["cat"]),
        other => panic!("{other:?}"),
    }
    assert_eq!(err(&["sandbox", "exec", "sb", "--"]).kind(), ErrorKind::MissingRequiredArgument);
    assert_eq!(err(&["sandbox", "exec", "sb"]).kind(), ErrorKind::MissingRequiredArgument);
}

#[test]
fn sandbox_run_volumes_and_memory() {
    match ok(&["sandbox", "run", "sb", "--volume", "a:/mnt/a", "--volume", "b:/mnt/b:ro:subpath=/d", "--memory", "512M"]).command {
        Command::Sandbox(SandboxCommand::Run(a)) => {
            assert_eq!(a.memory, "512M");
            let v: Vec<serde_json::Value> = a.volumes.into_iter().map(|s| s.0).collect();
            assert_eq!(
                v,
                [
                    serde_json::json!({"volume": "a", "path": "/mnt/a", "read_only": false, "subpath": "/"}),
                    serde_json::json!({"volume": "b", "path": "/mnt/b", "read_only": true, "subpath": "/d"}),
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    match ok(&["sandbox", "run", "sb"]).command {
        Command::Sandbox(SandboxCommand::Run(a)) => assert!(a.volumes.is_empty() && a.memory == "256M" && !a.json),
        other => panic!("{other:?}"),
    }
    let e = err(&["sandbox", "run", "sb", "--volume", "a:/mnt/a:rx"]);
    assert_eq!(e.exit_code(), 2);
    assert!(e.to_string().contains("unknown option \"rx\""), "{e}");
    assert!(err(&["sandbox", "run", "sb", "--volume", "a:mnt"]).to_string().contains("expected VOLUME:/mnt/path"));
}

#[test]
fn server_options() {
    match ok(&["server"]).command {
        Command::Server(a) => {
            assert_eq!(a.data, std::path::PathBuf::from("volumefs-data"));
            assert_eq!(a.http, "127.0.0.1:7070");
            assert_eq!(a.lease_ttl, 30);
            assert_eq!(a.images, None);
            assert_eq!(a.log_format, LogFormat::Text);
        }
        other => panic!("{other:?}"),
    }
    match ok(&["server", "--data", "/d", "--http", "127.0.0.1:0", "--lease-ttl", "5", "--images", "/i", "--log-format", "json"]).command {
        Command::Server(a) => {
            assert_eq!((a.data.to_str(), a.http.as_str(), a.lease_ttl), (Some("/d"), "127.0.0.1:0", 5));
            assert_eq!(a.images.as_deref().and_then(|p| p.to_str()), Some("/i"));
            assert_eq!(crate::logging::Format::from(a.log_format), crate::logging::Format::Json);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err(&["server", "--log-format", "xml"]).kind(), ErrorKind::InvalidValue);
    assert_eq!(err(&["server", "--lease-ttl", "soon"]).kind(), ErrorKind::ValueValidation);
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    for shell in ["bash", "zsh", "fish"] {
        let Command::Completions { shell: sh } = ok(&["completions", shell]).command else { panic!("completions {shell}") };
        let mut out = Vec::new();
        clap_complete::generate(sh, &mut Cli::command(), "volumefs", &mut out);
        let script = String::from_utf8(out).unwrap();
        assert!(script.contains("volumefs") && script.contains("reset-connections"), "{shell} script:\n{script}");
    }
    assert_eq!(err(&["completions", "tcsh"]).exit_code(), 2);
}

const FILE_VERBS: [&str; 15] =
    ["read", "write", "batch-write", "mv", "rm", "mkdir", "edit", "ls", "stat", "exists", "search", "replace", "upload", "download", "url"];

#[test]
fn every_file_verb_has_help_and_file_is_a_hidden_alias() {
    let help = err(&["volume", "--help"]).to_string();
    for verb in FILE_VERBS {
        assert!(help.contains(verb), "`volume --help` does not mention {verb}:\n{help}");
        let e = err(&["volume", verb, "--help"]);
        assert_eq!(e.exit_code(), 0, "volume {verb} --help");
        assert!(e.to_string().contains("Usage: volumefs volume"), "volume {verb} --help:\n{e}");
    }
    // `file read|write` still parse, but `--help` no longer shows them.
    assert!(!err(&["--help"]).to_string().contains("\n  file "));
    assert!(matches!(ok(&["file", "read", "v", "/p"]).command, Command::File(FileCommand::Read { .. })));
}

#[test]
fn ranges_and_durations() {
    assert_eq!(parse_range("0-99"), Ok(ByteRange("bytes=0-99".into())));
    assert_eq!(parse_range("100-"), Ok(ByteRange("bytes=100-".into())));
    assert_eq!(parse_range("-5"), Ok(ByteRange("bytes=-5".into())));
    for bad in ["", "-", "5", "9-3", "-0", "a-b", "1-2-3", "+1-2"] {
        assert!(parse_range(bad).is_err(), "{bad:?} parsed");
    }
    // A range that starts with `-` is a value, not an option.
    match ok(&["volume", "read", "v", "/f", "--range", "-3"]).command {
        Command::Volume(VolumeCommand::Files(FileVerb::Read { range, .. })) => assert_eq!(range, Some(ByteRange("bytes=-3".into()))),
        other => panic!("{other:?}"),
    }
    assert_eq!(parse_duration("30s"), Ok(30));
    assert_eq!(parse_duration("15m"), Ok(900));
    assert_eq!(parse_duration("2h"), Ok(7200));
    assert_eq!(parse_duration("7d"), Ok(604_800));
    assert_eq!(parse_duration("45"), Ok(45));
    for bad in ["", "m", "0s", "3x", "1.5h", "-1s", "99999999999999999999d"] {
        assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
    }
    match ok(&["volume", "url", "v", "/d", "--archive", "tar.gz"]).command {
        Command::Volume(VolumeCommand::Files(FileVerb::Url { expires, archive, json, .. })) => {
            assert_eq!((expires, archive, json), (900, Some(ArchiveFormat::TarGz), false))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn file_verb_options() {
    match ok(&["volume", "write", "v", "/a/b", "--from", "f.bin", "-p", "-q"]).command {
        Command::Volume(VolumeCommand::Files(FileVerb::Write { from, parents, append, quiet, .. })) => {
            assert_eq!(from.as_deref(), Some(std::path::Path::new("f.bin")));
            assert!(parents && !append && quiet.quiet);
        }
        other => panic!("{other:?}"),
    }
    match ok(&["volume", "batch-write", "v", "--json", "-"]).command {
        Command::Volume(VolumeCommand::Files(FileVerb::BatchWrite { to, tar, json_input, .. })) => {
            assert_eq!((to.as_str(), tar, json_input.as_deref()), ("/", None, Some("-")))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err(&["volume", "batch-write", "v"]).kind(), ErrorKind::MissingRequiredArgument);
    assert_eq!(err(&["volume", "batch-write", "v", "--tar", "a", "--json", "b"]).kind(), ErrorKind::ArgumentConflict);
    match ok(&["volume", "ls", "v", "-r", "--json"]).command {
        Command::Volume(VolumeCommand::Files(FileVerb::Ls { path, recursive, json, .. })) => assert!(path == "/" && recursive && json),
        other => panic!("{other:?}"),
    }
    match ok(&["volume", "rm", "v", "/d", "-r"]).command {
        Command::Volume(VolumeCommand::Files(FileVerb::Rm { recursive, .. })) => assert!(recursive),
        other => panic!("{other:?}"),
    }
    match ok(&["volume", "search", "v", "--name", "*.rs", "--content", "fn main", "--limit", "3"]).command {
        Command::Volume(VolumeCommand::Files(FileVerb::Search { path, name, content, limit, .. })) => {
            assert_eq!((path.as_str(), name.as_deref(), content.as_deref(), limit), ("/", Some("*.rs"), Some("fn main"), Some(3)))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err(&["volume", "edit", "v", "/f", "--find", "a"]).kind(), ErrorKind::MissingRequiredArgument);
    assert_eq!(err(&["volume", "download", "v", "/d", "out", "--archive", "rar"]).kind(), ErrorKind::InvalidValue);
    match ok(&["volume", "upload", "-", "v", "/f", "-p"]).command {
        Command::Volume(VolumeCommand::Files(FileVerb::Upload { local, parents, .. })) => assert!(local.as_os_str() == "-" && parents),
        other => panic!("{other:?}"),
    }
}
