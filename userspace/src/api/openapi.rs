//! The OpenAPI 3.0 document of `/v1`, written out here (checked by a validator and against
//! the live routes in tests/tests/api.rs, and against the request bodies' fields below).

use serde_json::{Value, json};

/// Every route: method, path (OpenAPI template syntax), summary.
pub const ROUTES: &[(&str, &str, &str)] = &[
    (
        "get",
        "/v1/cts",
        "List every CT (the CT objects of `berth list -a --json`)",
    ),
    (
        "post",
        "/v1/cts",
        "Create a CT (the fields of `berth create`)",
    ),
    (
        "get",
        "/v1/cts/{ct}",
        "One CT (the object of `berth status --json`)",
    ),
    (
        "patch",
        "/v1/cts/{ct}",
        "Change settings as `berth set`: live when running, saved unless save=false",
    ),
    ("delete", "/v1/cts/{ct}", "Destroy a stopped CT"),
    (
        "post",
        "/v1/cts/{ct}/start",
        "Start a CT (a running CT: unchanged, 200)",
    ),
    (
        "post",
        "/v1/cts/{ct}/stop",
        "Stop a CT (a stopped CT: unchanged, 200)",
    ),
    ("post", "/v1/cts/{ct}/restart", "Restart a CT"),
    ("post", "/v1/cts/{ct}/suspend", "Freeze a running CT"),
    ("post", "/v1/cts/{ct}/resume", "Thaw a suspended CT"),
    (
        "get",
        "/v1/cts/{ct}/usage",
        "The CT's traffic and billing totals of a period, from the ledger",
    ),
    ("get", "/v1/templates", "Installed OS templates"),
    (
        "get",
        "/v1/billing/report",
        "Billing period totals of one or every CT, from the ledger",
    ),
    (
        "get",
        "/v1/billing/slots",
        "The ledger's 5-minute slots after a sequence number",
    ),
    (
        "get",
        "/v1/operations/{id}",
        "A long operation; ?wait=1 waits up to 60 s for its end",
    ),
    (
        "get",
        "/v1/events",
        "Server-sent events of CT state changes",
    ),
    ("get", "/v1/openapi.json", "This document"),
];

/// Fields of `POST /v1/cts` with their JSON types.
pub const CREATE_FIELDS: &[(&str, &str)] = &[
    ("ctid", "integer"),
    ("template", "string"),
    ("hostname", "string"),
    ("name", "string"),
    ("privileged", "boolean"),
    ("copy", "boolean"),
    ("ipadd", "array"),
    ("billing_day", "string"),
    ("tz", "string"),
    ("commit", "string"),
    ("classes", "string"),
];

/// Fields of `PATCH /v1/cts/{ct}`.
pub const PATCH_FIELDS: &[(&str, &str)] = &[
    ("hostname", "string"),
    ("name", "string"),
    ("memory", "string"),
    ("swap", "string"),
    ("cpuunits", "integer"),
    ("cpulimit", "integer"),
    ("cpus", "integer"),
    ("numproc", "string"),
    ("ioweight", "integer"),
    ("diskspace", "string"),
    ("ipadd", "array"),
    ("ipdel", "array"),
    ("netif_add", "array"),
    ("netif_del", "string"),
    ("nameserver", "array"),
    ("searchdomain", "array"),
    ("rate_in", "string"),
    ("rate_out", "string"),
    ("burst", "string"),
    ("class_rate", "array"),
    ("pps_in", "string"),
    ("pps_out", "string"),
    ("onboot", "boolean"),
    ("userpasswd", "array"),
    ("billing_day", "string"),
    ("tz", "string"),
    ("commit", "string"),
    ("classes", "string"),
    ("save", "boolean"),
];

fn props(fields: &[(&str, &str)]) -> Value {
    let mut m = serde_json::Map::new();
    for (name, ty) in fields {
        let v = if *ty == "array" {
            json!({"type": "array", "items": {"type": "string"}})
        } else {
            json!({ "type": ty })
        };
        m.insert((*name).to_owned(), v);
    }
    Value::Object(m)
}

fn err(desc: &str) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn ok(desc: &str, schema: &str) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn param(name: &str, inn: &str, desc: &str, ty: &str, required: bool) -> Value {
    json!({"name": name, "in": inn, "description": desc, "required": required, "schema": {"type": ty}})
}

fn operation(method: &str, path: &str, summary: &str) -> Value {
    let mut params = Vec::new();
    if path.contains("{ct}") {
        params.push(param("ct", "path", "CTID or name", "string", true));
    }
    if path.contains("{id}") {
        params.push(param("id", "path", "operation id", "string", true));
    }
    let changes = method != "get";
    if changes {
        params.push(param(
            "wait",
            "query",
            "wait for the result (default true); false answers 202 with the operation",
            "boolean",
            false,
        ));
    }
    if path.ends_with("/stop") {
        params.push(param(
            "fast",
            "query",
            "kill without the graceful stop signal",
            "boolean",
            false,
        ));
    }
    if path.ends_with("/usage") {
        params.push(param(
            "period",
            "query",
            "billing period YYYY-MM (default: the current one)",
            "string",
            false,
        ));
        params.push(param(
            "mode",
            "query",
            "95th percentile mode (max, in, out, sum)",
            "string",
            false,
        ));
    }
    if path == "/v1/billing/report" {
        params.push(param("ct", "query", "CTID, UUID or all", "string", false));
        params.push(param(
            "period",
            "query",
            "billing period YYYY-MM",
            "string",
            false,
        ));
        params.push(param(
            "mode",
            "query",
            "95th percentile mode",
            "string",
            false,
        ));
    }
    if path == "/v1/billing/slots" {
        params.push(param(
            "after_seq",
            "query",
            "slots after this sequence number",
            "integer",
            false,
        ));
        params.push(param(
            "limit",
            "query",
            "at most this many slots",
            "integer",
            false,
        ));
    }
    if path.starts_with("/v1/operations/") {
        params.push(param(
            "wait",
            "query",
            "wait up to 60 s for the operation's end",
            "boolean",
            false,
        ));
    }
    let mut responses = serde_json::Map::new();
    let good = match (method, path) {
        ("post", "/v1/cts") => (
            "201",
            ok("created; the result with the new CT object", "Result"),
        ),
        ("get", "/v1/events") => (
            "200",
            json!({"description": "an event stream; each event's data is an Event", "content": {"text/event-stream": {"schema": {"type": "string"}}}}),
        ),
        ("get", "/v1/cts") => ("200", ok("the CTs", "CtList")),
        ("get", "/v1/cts/{ct}") => ("200", ok("the CT", "CtDoc")),
        ("get", "/v1/operations/{id}") => ("200", ok("the operation", "OperationDoc")),
        ("get", _) => (
            "200",
            json!({"description": "the answer", "content": {"application/json": {"schema": {"type": "object"}}}}),
        ),
        _ => ("200", ok("the result (with the CT object)", "Result")),
    };
    responses.insert(good.0.into(), good.1);
    if changes {
        responses.insert(
            "202".into(),
            ok("accepted (wait=false): the operation", "OperationDoc"),
        );
        responses.insert(
            "409".into(),
            err("the CT's state does not allow it (code says which)"),
        );
    }
    responses.insert("400".into(), err("a bad query or body"));
    responses.insert(
        "401".into(),
        err("TCP: no valid token or client certificate"),
    );
    if path.contains('{') {
        responses.insert("404".into(), err("no such CT or operation"));
    }
    responses.insert("429".into(), err("TCP: rate limited"));
    responses.insert("500".into(), err("the host failed"));
    let mut op = json!({
        "summary": summary,
        "operationId": format!("{method}{}", path.replace(['/', '{', '}', '.'], "_")),
        "parameters": params,
        "responses": responses,
    });
    let body = match (method, path) {
        ("post", "/v1/cts") => Some("CreateBody"),
        ("patch", _) => Some("PatchBody"),
        _ => None,
    };
    if let Some(b) = body {
        op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{b}")}}}});
    }
    op
}

/// The document served at `/v1/openapi.json`.
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary) in ROUTES {
        let entry = paths.entry((*path).to_owned()).or_insert_with(|| json!({}));
        entry[*method] = operation(method, path, summary);
    }
    let mut create = json!({"type": "object", "additionalProperties": false, "required": ["ctid"], "properties": props(CREATE_FIELDS)});
    create["properties"]["template"]["default"] = json!("busybox");
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "berthd panel API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "CTs, templates, operations, events and billing of one berth host. On the unix socket access is the socket's permissions; over TCP (TLS only) every request needs a bearer token or a client certificate."
        },
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "code", "schema_version"],
                    "properties": {
                        "schema_version": {"type": "integer"},
                        "error": {"type": "string"},
                        "code": {"type": "string"},
                        "exit_code": {"type": "integer", "nullable": true}
                    }
                },
                "CreateBody": create,
                "PatchBody": {"type": "object", "additionalProperties": false, "properties": props(PATCH_FIELDS)},
                "Ct": {"type": "object", "description": "the CT object of berth's JSON contract (README: JSON)", "additionalProperties": true},
                "CtList": {"type": "object", "properties": {"schema_version": {"type": "integer"}, "cts": {"type": "array", "items": {"$ref": "#/components/schemas/Ct"}}}},
                "CtDoc": {"type": "object", "properties": {"schema_version": {"type": "integer"}, "ct": {"$ref": "#/components/schemas/Ct"}}},
                "Result": {"type": "object", "properties": {"schema_version": {"type": "integer"}, "ctid": {"type": "integer"}, "operation": {"type": "string"}, "ct": {"$ref": "#/components/schemas/Ct"}}, "additionalProperties": true},
                "Operation": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "kind": {"type": "string"},
                        "ctid": {"type": "integer", "nullable": true},
                        "status": {"type": "string", "enum": ["running", "succeeded", "failed"]},
                        "created": {"type": "integer"},
                        "finished": {"type": "integer", "nullable": true},
                        "result": {"type": "object", "nullable": true},
                        "error": {"allOf": [{"$ref": "#/components/schemas/Error"}], "nullable": true}
                    }
                },
                "OperationDoc": {"type": "object", "properties": {"schema_version": {"type": "integer"}, "operation": {"$ref": "#/components/schemas/Operation"}}},
                "Event": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string"},
                        "ctid": {"type": "integer"},
                        "status": {"type": "string", "nullable": true},
                        "source": {"type": "string", "enum": ["api", "host"]},
                        "operation": {"type": "string", "nullable": true},
                        "time": {"type": "integer"}
                    }
                }
            }
        },
        "security": [{}, {"bearer": []}],
        "paths": paths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::body::{CreateBody, PatchBody};

    /// The documented body fields are exactly the structs' (each set once to a value of the
    /// documented type, the struct must accept it; a field the doc lacks would be refused).
    #[test]
    fn bodies_match_the_structs() {
        let sample = |ty: &str| match ty {
            "integer" => json!(101),
            "boolean" => json!(true),
            "array" => json!([]),
            _ => json!("x"),
        };
        for (name, ty) in CREATE_FIELDS {
            let mut b = json!({"ctid": 101});
            b[*name] = sample(ty);
            serde_json::from_value::<CreateBody>(b).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for (name, ty) in PATCH_FIELDS {
            let mut b = json!({});
            b[*name] = sample(ty);
            serde_json::from_value::<PatchBody>(b).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let create = serde_json::to_value(CreateBody::default()).unwrap();
        assert_eq!(create.as_object().unwrap().len(), CREATE_FIELDS.len());
        let patch = serde_json::to_value(PatchBody::default()).unwrap();
        assert_eq!(patch.as_object().unwrap().len(), PATCH_FIELDS.len());
    }

    #[test]
    fn every_route_is_documented_once() {
        let d = document();
        for (m, p, _) in ROUTES {
            assert!(d["paths"][*p][*m].is_object(), "{m} {p}");
        }
    }
}
