//! The OpenAPI 3.1 document of the HTTP API, served at `/openapi.json` (no token needed; no UI,
//! nothing fetched at build time). It is built with utoipa's builders from one table of routes,
//! [`ROUTES`], which a test checks against the live router (every listed route answers).

use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::{ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, PathsBuilder, Required, ResponseBuilder, ResponsesBuilder};

/// One route: method, path (axum syntax `{v}`, `{*path}` written `{path}`), tag, summary,
/// query parameters, request body content type, success status and content type.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub query: &'static [(&'static str, &'static str)],
    pub body: Option<&'static str>,
    pub ok: (u16, &'static str),
}

const JSON: &str = "application/json";
const BYTES: &str = "application/octet-stream";

macro_rules! r {
    ($m:literal $p:literal $t:literal $s:literal, q: [$(($qn:literal, $qd:literal)),*], body: $b:expr, ok: $st:literal $ct:expr) => {
        Route { method: $m, path: $p, tag: $t, summary: $s, query: &[$(($qn, $qd)),*], body: $b, ok: ($st, $ct) }
    };
}

pub const ROUTES: &[Route] = &[
    r!("GET" "/v1/volumes" "volumes" "List volumes", q: [("fields", "comma-separated fields to return")], body: None, ok: 200 JSON),
    r!("POST" "/v1/volumes" "volumes" "Create a volume {name, cap?} (default cap 2 GiB or the tenant's; no auto-grow)", q: [], body: Some(JSON), ok: 201 JSON),
    r!("GET" "/v1/volumes/{v}" "volumes" "Inspect a volume: id, name, cap_bytes, used_bytes, free_bytes, files, created_at, attachments", q: [("fields", "comma-separated fields to return")], body: None, ok: 200 JSON),
    r!("PATCH" "/v1/volumes/{v}" "volumes" "Refused: a volume's cap is fixed (no resize)", q: [], body: Some(JSON), ok: 400 JSON),
    r!("DELETE" "/v1/volumes/{v}" "volumes" "Delete a volume (refused while attached unless force)", q: [("force", "detach everywhere first")], body: None, ok: 200 JSON),
    r!("POST" "/v1/volumes/{v}/clone" "volumes" "Copy a volume at once {name, cap?}: blocks shared, each copy its own cap and usage (needs a block store)", q: [], body: Some(JSON), ok: 201 JSON),
    r!("GET" "/v1/volumes/{v}/fsck" "volumes" "Check a volume: names, link counts, inode count, blocks; problems listed", q: [], body: None, ok: 200 JSON),
    r!("POST" "/v1/gc" "volumes" "Delete blocks no volume refers to, older than the grace period (operator only)", q: [("grace", "seconds an unreferenced block is kept (default 3600)")], body: None, ok: 200 JSON),
    r!("GET" "/v1/volumes/{v}/files/{path}" "files" "Read a file (Range supported), or an archive of a file or directory with ?archive", q: [("archive", "tar, tar.gz or zip")], body: None, ok: 200 BYTES),
    r!("HEAD" "/v1/volumes/{v}/files/{path}" "files" "Whether a path exists (404 if not), with its size and kind in headers", q: [], body: None, ok: 200 BYTES),
    r!("PUT" "/v1/volumes/{v}/files/{path}" "files" "Write a file (streamed; atomic replace)", q: [("parents", "make missing parent directories")], body: Some(BYTES), ok: 200 JSON),
    r!("POST" "/v1/volumes/{v}/files/{path}" "files" "Append to a file in one atomic write (?append)", q: [("append", "required")], body: Some(BYTES), ok: 200 JSON),
    r!("DELETE" "/v1/volumes/{v}/files/{path}" "files" "Remove a file, symlink or empty directory", q: [("recursive", "remove a directory and everything in it")], body: None, ok: 200 JSON),
    r!("GET" "/v1/volumes/{v}/archive" "files" "Download a path (the root by default) as an archive", q: [("path", "volume path"), ("format", "tar, tar.gz or zip")], body: None, ok: 200 BYTES),
    r!("GET" "/v1/volumes/{v}/stat" "files" "Attributes of a path (symlinks not followed)", q: [("path", "volume path")], body: None, ok: 200 JSON),
    r!("GET" "/v1/volumes/{v}/list" "files" "List a directory", q: [("path", "volume path"), ("recursive", "everything below"), ("limit", "most entries")], body: None, ok: 200 JSON),
    r!("POST" "/v1/volumes/{v}/mkdir" "files" "Make a directory {path, parents?}", q: [], body: Some(JSON), ok: 200 JSON),
    r!("POST" "/v1/volumes/{v}/move" "files" "Move {from, to}", q: [], body: Some(JSON), ok: 200 JSON),
    r!("POST" "/v1/volumes/{v}/remove" "files" "Remove {path, recursive?}", q: [], body: Some(JSON), ok: 200 JSON),
    r!("POST" "/v1/volumes/{v}/edit" "files" "Replace exactly one occurrence {path, find, replace}", q: [], body: Some(JSON), ok: 200 JSON),
    r!("GET" "/v1/volumes/{v}/search" "files" "Search by name glob and/or content regex", q: [("path", "where to search"), ("name", "glob on names"), ("content", "regex on lines"), ("limit", "most matches")], body: None, ok: 200 JSON),
    r!("POST" "/v1/volumes/{v}/replace" "files" "Regex replace across files {path, find, replace, name?}", q: [], body: Some(JSON), ok: 200 JSON),
    r!("POST" "/v1/volumes/{v}/batch" "files" "Write many files all or nothing: a tar stream, or JSON {files: [{path, content}]}", q: [("path", "destination directory")], body: Some("application/x-tar"), ok: 200 JSON),
    r!("POST" "/v1/volumes/{v}/signed-url" "files" "A URL that fetches one file or archive without a token until it expires {path, archive?, expires_secs}", q: [], body: Some(JSON), ok: 200 JSON),
    r!("GET" "/v1/volumes/{v}/watch" "files" "Changes under a path as Server-Sent Events (resume with Last-Event-ID)", q: [("path", "volume path"), ("after", "resume after this event id")], body: None, ok: 200 "text/event-stream"),
    r!("GET" "/v1/signed/{v}" "files" "A signed download (no token)", q: [("path", "volume path"), ("archive", "tar, tar.gz or zip"), ("expires", "unix seconds"), ("sig", "signature")], body: None, ok: 200 BYTES),
    r!("POST" "/v1/volumes/{v}/uploads" "uploads" "tus 1.0: create a resumable upload (Upload-Length; Upload-Metadata: path, parents)", q: [], body: None, ok: 201 JSON),
    r!("OPTIONS" "/v1/volumes/{v}/uploads" "uploads" "tus 1.0: capabilities", q: [], body: None, ok: 204 JSON),
    r!("HEAD" "/v1/volumes/{v}/uploads/{id}" "uploads" "tus 1.0: the upload's offset", q: [], body: None, ok: 200 JSON),
    r!("PATCH" "/v1/volumes/{v}/uploads/{id}" "uploads" "tus 1.0: add bytes at Upload-Offset", q: [], body: Some("application/offset+octet-stream"), ok: 204 JSON),
    r!("DELETE" "/v1/volumes/{v}/uploads/{id}" "uploads" "tus 1.0: terminate an upload", q: [], body: None, ok: 204 JSON),
    r!("GET" "/v1/tenants" "tenants" "List tenants (operator only)", q: [], body: None, ok: 200 JSON),
    r!("POST" "/v1/tenants" "tenants" "Create a tenant {name, default_cap?}; returns its token once (operator only)", q: [], body: Some(JSON), ok: 201 JSON),
    r!("GET" "/v1/sandboxes" "sandboxes" "List sandboxes", q: [], body: None, ok: 200 JSON),
    r!("POST" "/v1/sandboxes" "sandboxes" "Register a sandbox {name}; returns its guest socket", q: [], body: Some(JSON), ok: 201 JSON),
    r!("GET" "/v1/sandboxes/{s}" "sandboxes" "Inspect a sandbox and its attachments", q: [], body: None, ok: 200 JSON),
    r!("DELETE" "/v1/sandboxes/{s}" "sandboxes" "Delete a sandbox", q: [], body: None, ok: 200 JSON),
    r!("GET" "/v1/sandboxes/{s}/attachments" "sandboxes" "List a sandbox's attachments and their states", q: [], body: None, ok: 200 JSON),
    r!("POST" "/v1/sandboxes/{s}/attachments" "sandboxes" "Attach a volume {volume, path, read_only?, subpath?} (mounted now if the agent runs; the same one again at a path whose mount is gone remounts it)", q: [], body: Some(JSON), ok: 201 JSON),
    r!("DELETE" "/v1/sandboxes/{s}/attachments" "sandboxes" "Detach the volume at ?path", q: [("path", "mount path"), ("force", "even with files open")], body: None, ok: 200 JSON),
    r!("POST" "/v1/sandboxes/{s}/run" "sandboxes" "Boot a microVM with volumes {volumes: [{volume, path, read_only?, subpath?}], memory?}", q: [], body: Some(JSON), ok: 200 JSON),
    r!("POST" "/v1/sandboxes/{s}/stop" "sandboxes" "Stop the sandbox's microVM", q: [], body: None, ok: 200 JSON),
    r!("POST" "/v1/sandboxes/{s}/hibernate" "sandboxes" "Flush and release every lease", q: [], body: None, ok: 200 JSON),
    r!("POST" "/v1/sandboxes/{s}/resume" "sandboxes" "Take the leases again", q: [], body: None, ok: 200 JSON),
    r!("POST" "/v1/sandboxes/{s}/fork" "sandboxes" "Fork into a new sandbox {name} with the same attachments", q: [], body: Some(JSON), ok: 201 JSON),
    r!("POST" "/v1/sandboxes/{s}/exec" "sandboxes" "Run a command in the sandbox {argv, stdin?, timeout_ms?}", q: [], body: Some(JSON), ok: 200 JSON),
    r!("POST" "/v1/sandboxes/{s}/reset-connections" "sandboxes" "Close the sandbox's connections (what a snapshot restore does)", q: [], body: None, ok: 200 JSON),
];

fn method(m: &str) -> HttpMethod {
    match m {
        "GET" => HttpMethod::Get,
        "POST" => HttpMethod::Post,
        "PUT" => HttpMethod::Put,
        "DELETE" => HttpMethod::Delete,
        "OPTIONS" => HttpMethod::Options,
        "HEAD" => HttpMethod::Head,
        "PATCH" => HttpMethod::Patch,
        other => unreachable!("no HTTP method {other} in the route table"),
    }
}

/// The document.
pub fn document() -> OpenApi {
    let mut paths = PathsBuilder::new();
    for r in ROUTES {
        let mut op = OperationBuilder::new().tag(r.tag).summary(Some(r.summary));
        for name in r.path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')) {
            op = op.parameter(ParameterBuilder::new().name(name).parameter_in(ParameterIn::Path).required(Required::True));
        }
        for (name, desc) in r.query {
            op = op.parameter(ParameterBuilder::new().name(*name).parameter_in(ParameterIn::Query).description(Some(*desc)));
        }
        if let Some(ct) = r.body {
            op = op.request_body(Some(RequestBodyBuilder::new().content(ct, ContentBuilder::new().build()).build()));
        }
        let ok = ResponseBuilder::new().description("success").content(r.ok.1, ContentBuilder::new().build()).build();
        let err = ResponseBuilder::new().description("error: {code, message, errno}").content(JSON, ContentBuilder::new().build()).build();
        op = op.responses(ResponsesBuilder::new().response(r.ok.0.to_string(), ok).response("default", err).build());
        paths = paths.path(r.path, PathItem::new(method(r.method), op.build()));
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("volumefs")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some("Durable volumes for microVM sandboxes. Authenticate with `Authorization: Bearer <token>`."))
                .build(),
        )
        .paths(paths.build())
        .build()
}
