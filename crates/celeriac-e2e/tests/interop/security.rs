//! Signed messages (Celery's `auth` serializer) across languages: Celery 5.7 with
//! `setup_security()` and cryptography on one side, celeriac with `serializer = "auth"` on the
//! other, each trusting the other's certificate.
//!
//! Keys and certificates are made by each test with the openssl crate (RSA 2048, an issuer of
//! two attributes, a serial number), so no key is committed.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use celeriac::security::unpack;
use celeriac::{App, Config, ContentType};
use celeriac_examples::{add, echo, fail, mul, sleep, xsum};
use celeriac_test::python::{PythonPool, PythonWorker};
use celeriac_test::services::test_dir;
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use openssl::x509::{X509, X509NameBuilder};
use serde_json::Value;

use crate::support::{Interop, OurWorker, T, python, raw_list, setup};

/// One party's key and certificate files, and its signer id.
struct Party {
    key: PathBuf,
    cert: PathBuf,
    id: String,
}

/// Makes an RSA 2048 key and a self-signed certificate issued by `CN=<cn>, O=Acme` with
/// `serial`, valid for a day, in `dir`.
fn party(dir: &Path, name: &str, cn: &str, serial: u32) -> Party {
    let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut n = X509NameBuilder::new().unwrap();
    n.append_entry_by_nid(Nid::COMMONNAME, cn).unwrap();
    n.append_entry_by_nid(Nid::ORGANIZATIONNAME, "Acme")
        .unwrap();
    let n = n.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&Asn1Integer::from_bn(&BigNum::from_u32(serial).unwrap()).unwrap())
        .unwrap();
    b.set_subject_name(&n).unwrap();
    b.set_issuer_name(&n).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    let p = Party {
        key: dir.join(format!("{name}.key")),
        cert: dir.join(format!("{name}.pem")),
        id: format!("{cn} Acme {serial}"),
    };
    std::fs::write(&p.key, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    std::fs::write(&p.cert, b.build().to_pem().unwrap()).unwrap();
    p
}

/// Python's party (`py`), ours (`rs`), Mallory (trusted by nobody), and a store trusting the
/// first two.
struct Pki {
    py: Party,
    rs: Party,
    mallory: Party,
    store: PathBuf,
}

fn pki(name: &str) -> Pki {
    let dir = test_dir().join(format!(
        "security-{name}-{}",
        &celeriac::core::protocol::new_id()[..8]
    ));
    std::fs::create_dir_all(dir.join("store")).unwrap();
    let py = party(&dir, "py", "Python CA", 1001);
    let rs = party(&dir, "rs", "Rust CA", 2002);
    let mallory = party(&dir, "mallory", "Mallory CA", 666);
    std::fs::copy(&py.cert, dir.join("store/py.pem")).unwrap();
    std::fs::copy(&rs.cert, dir.join("store/rs.pem")).unwrap();
    Pki {
        py,
        rs,
        mallory,
        store: dir.join("store"),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The environment under which `tasks.py` sets up security as `party`.
fn python_security<'a>(party: &'a Party, store: &'a Path) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CELERY_SECURITY_KEY", s(&party.key)),
        ("CELERY_SECURITY_CERTIFICATE", s(&party.cert)),
        ("CELERY_SECURITY_CERT_STORE", s(store)),
    ]
}

/// Our app on `env`'s Redis, signing as `rs` and trusting the store, set up through the
/// configuration keys a Celery user knows.
async fn signed_app(env: &Interop, pki: &Pki) -> App {
    let mut config = Config::default();
    config.serializer = ContentType::Auth;
    config.security_key = Some(s(&pki.rs.key).to_owned());
    config.security_certificate = Some(s(&pki.rs.cert).to_owned());
    config.security_cert_store = Some(s(&pki.store).to_owned());
    App::builder()
        .config(config)
        .broker_url(&env.url)
        .result_backend(&env.url)
        .task::<add>()
        .task::<mul>()
        .task::<xsum>()
        .task::<echo>()
        .task::<fail>()
        .task::<sleep>()
        .build()
        .await
        .expect("a signed app")
}

/// Sends a signed call, one altered in transit, one signed by Mallory and one unsigned, and
/// prints how each ended as Celery's AsyncResult reads it.
const FROM_PYTHON: &str = r#"
import base64, json, os
import tasks
from kombu.serialization import registry
from celery.security.certificate import Certificate, FSCertStore
from celery.security.key import PrivateKey
from celery.security.serialization import SecureSerializer

app = tasks.app
q = os.environ["QUEUE"]
T = 30
SEP = b"\x00\x01"
out = {}

r = app.send_task("tasks.add", (2, 3), queue=q)
out["signed"] = {"value": r.get(timeout=T), "state": r.state}

# The signed body of a real call with its first argument changed after signing.
auth = registry._encoders["auth"].encoder
def altered(data):
    raw = base64.b64decode(auth(data))
    head, body = raw.rsplit(SEP, 1)
    assert body.startswith(b"[[2, 3]"), body
    return base64.b64encode(head + SEP + body.replace(b"[[2, 3]", b"[[2, 9]", 1)).decode()
registry.register("auth-altered", altered, None, "application/data", "utf-8")

# A well-formed signature by a key whose certificate nobody trusts.
with open(os.environ["MALLORY_KEY"]) as k, open(os.environ["MALLORY_CERT"]) as c:
    mallory = SecureSerializer(PrivateKey(k.read()), Certificate(c.read()),
                               FSCertStore(os.environ["MALLORY_STORE"]), "sha256")
registry.register("auth-mallory", mallory.serialize, None, "application/data", "utf-8")

def refused(serializer):
    r = app.send_task("tasks.add", (2, 3), queue=q, serializer=serializer)
    got = r.get(timeout=T, propagate=False)
    return {"id": r.id, "state": r.state, "type": type(got).__name__,
            "module": type(got).__module__, "text": str(got)}

out["altered"] = refused("auth-altered")
out["mallory"] = refused("auth-mallory")
out["unsigned"] = refused("json")
# Remote control, signed both ways: a ping and a rate limit change.
node = os.environ["NODE"]
out["ping"] = app.control.ping(destination=[node], timeout=3)
out["rate_limit"] = app.control.rate_limit("tasks.add", "50/s", destination=[node], reply=True,
                                           timeout=3)
# The same ping from an app that does not sign: our worker must not obey it.
from celery import Celery
plain = Celery("plain", broker=app.conf.broker_url)
plain.conf.update(task_serializer="json", accept_content=["json"])
out["plain_ping"] = plain.control.ping(destination=[node], timeout=1.5)
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_signed_calls_run_on_our_worker_and_forgeries_are_refused() {
    let Some(env) = setup(2, "sec-py").await else {
        return;
    };
    let pki = pki("from-python");
    let app = signed_app(&env, &pki).await;
    let mut o = app.worker_options();
    o.queues = vec![env.queue.clone()];
    o.concurrency = 2;
    o.hostname = format!("rss-{}@localhost", &celeriac::core::protocol::new_id()[..8]);
    let node = o.hostname.clone();
    let worker = tokio::spawn(app.worker(o).run());

    let mut vars = python_security(&pki.py, &pki.store);
    let mallory_store = pki.mallory.cert.parent().unwrap().join("mallory-store");
    std::fs::create_dir_all(&mallory_store).unwrap();
    std::fs::copy(&pki.mallory.cert, mallory_store.join("m.pem")).unwrap();
    vars.extend([
        ("MALLORY_KEY", s(&pki.mallory.key)),
        ("MALLORY_CERT", s(&pki.mallory.cert)),
        ("MALLORY_STORE", s(&mallory_store)),
        ("NODE", &node),
    ]);
    let out = python(FROM_PYTHON, &env, &vars).await;
    worker.abort();

    assert_eq!(out["signed"]["value"], 5, "{out:#}");
    assert_eq!(out["signed"]["state"], "SUCCESS", "{out:#}");
    // Celery's signed control reaches our worker, and its signed replies reach Celery.
    assert_eq!(
        out["ping"],
        serde_json::json!([{ (node.clone()): {"ok": "pong"} }]),
        "{out:#}"
    );
    let set = out["rate_limit"][0][&node]["ok"]
        .as_str()
        .unwrap_or_default();
    assert!(set.contains("rate limit"), "{out:#}");
    assert_eq!(out["plain_ping"], serde_json::json!([]), "{out:#}");
    for (case, why) in [
        ("altered", "does not match the body"),
        ("mallory", "unknown certificate \"Mallory CA Acme 666\""),
        ("unsigned", "unsigned message refused"),
    ] {
        let r = &out[case];
        assert_eq!(r["state"], "FAILURE", "{case}: {out:#}");
        assert_eq!(r["type"], "SecurityError", "{case}: {out:#}");
        assert_eq!(r["module"], "celery.exceptions", "{case}: {out:#}");
        let text = r["text"].as_str().unwrap_or_default();
        assert!(text.contains(why), "{case}: {text}");
    }

    // The three refused messages wait in the dead letters as they were sent.
    let dead = raw_list(&env, &format!("{}.dead", env.queue)).await;
    let by_id = |case: &str| -> &Value {
        let id = out[case]["id"].as_str().unwrap();
        dead.iter()
            .find(|m| m["headers"]["id"] == id)
            .unwrap_or_else(|| panic!("{case} ({id}) is not among the dead letters: {dead:#?}"))
    };
    let body = |m: &Value| B64.decode(m["body"].as_str().unwrap()).unwrap();
    let altered = by_id("altered");
    assert_eq!(altered["content-type"], "application/data");
    let packed = unpack(&body(altered)).unwrap();
    assert_eq!(packed.signer, pki.py.id);
    assert!(packed.body.starts_with(b"[[2, 9]"), "{packed:?}");
    let forged = unpack(&body(by_id("mallory"))).unwrap();
    assert_eq!(forged.signer, pki.mallory.id);
    assert!(forged.body.starts_with(b"[[2, 3]"), "{forged:?}");
    let unsigned = by_id("unsigned");
    assert_eq!(unsigned["content-type"], "application/json");
    assert!(body(unsigned).starts_with(b"[[2, 3]"));
    assert_eq!(dead.len(), 3, "{dead:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_signed_calls_run_on_a_python_worker_and_unsigned_ones_do_not() {
    let Some(env) = setup(3, "sec-rs").await else {
        return;
    };
    let pki = pki("from-rust");
    let py = PythonWorker::start_with_env(
        &env.url,
        &env.url,
        &[&env.queue],
        PythonPool::Threads(2),
        &[],
        &python_security(&pki.py, &pki.store),
    )
    .await;
    let app = signed_app(&env, &pki).await;
    let q = env.queue.as_str();
    let sum = add::s(2, 3).queue(q).apply_async(&app).await.unwrap();
    assert_eq!(
        sum.get_timeout(T).await.unwrap(),
        5,
        "python worker's log:\n{}",
        py.log()
    );
    let chained = echo::s(serde_json::json!({"k": ["v", 1]}))
        .queue(q)
        .apply_async(&app)
        .await
        .unwrap();
    assert_eq!(
        chained.get_timeout(T).await.unwrap(),
        serde_json::json!({"k": ["v", 1]})
    );
    // Our signed control reaches Celery's worker, its signed reply reaches us; an app that
    // does not sign gets no answer (Celery's worker accepts only auth on its mailbox).
    let node = py.node_name().to_owned();
    let asked = |app: App| {
        let node = node.clone();
        async move {
            app.control()
                .destination([node])
                .timeout(std::time::Duration::from_secs(3))
                .inspect()
                .ping()
                .await
                .unwrap()
        }
    };
    let pongs = asked(app.clone()).await;
    assert_eq!(
        pongs.get(py.node_name()),
        Some(&serde_json::json!({"ok": "pong"})),
        "{pongs:?}\n{}",
        py.log()
    );
    assert!(asked(env.app.clone()).await.is_empty());
    // The same call from an app that does not sign: Celery refuses its content type.
    let mut py = py;
    add::s(1, 1).queue(q).apply_async(&env.app).await.unwrap();
    py.wait_for_log("Refusing to deserialize", T).await;
}

/// Sends one signed call and one unsigned one; prints how each ended.
const SIGNED_AND_NOT: &str = r#"
import json, os
import tasks
app = tasks.app
q = os.environ["QUEUE"]
r = app.send_task("tasks.mul", (6, 7), queue=q)
out = {"signed": r.get(timeout=30), "worker": r.worker}
r = app.send_task("tasks.mul", (6, 7), queue=q, serializer="json")
got = r.get(timeout=30, propagate=False)
out["unsigned"] = {"state": r.state, "type": type(got).__name__, "text": str(got)}
out["ping"] = app.control.ping(destination=[os.environ["NODE"]], timeout=3)
print(json.dumps(out))
"#;

/// Our worker binary set up by Celery's setting names in `CELERIAC_*` variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_worker_binary_takes_its_keys_from_the_environment() {
    let Some(env) = setup(2, "sec-cli").await else {
        return;
    };
    let pki = pki("cli");
    let worker = OurWorker::start_env(
        &env.url,
        &env.url,
        &[&env.queue],
        &[],
        &[
            ("CELERIAC_SERIALIZER", "auth"),
            ("CELERIAC_SECURITY_KEY", s(&pki.rs.key)),
            ("CELERIAC_SECURITY_CERTIFICATE", s(&pki.rs.cert)),
            ("CELERIAC_SECURITY_CERT_STORE", s(&pki.store)),
        ],
    )
    .await;
    let mut vars = python_security(&pki.py, &pki.store);
    let node = worker.node_name().to_owned();
    vars.push(("NODE", &node));
    let out = python(SIGNED_AND_NOT, &env, &vars).await;
    let log = worker.log();
    assert_eq!(out["signed"], 42, "{out:#}\n{log}");
    assert_eq!(out["worker"], worker.node_name(), "{out:#}");
    assert_eq!(out["unsigned"]["state"], "FAILURE", "{out:#}");
    assert_eq!(out["unsigned"]["type"], "SecurityError", "{out:#}");
    assert!(log.contains("unsigned message refused"), "{log}");
    assert_eq!(
        out["ping"],
        serde_json::json!([{ (node.clone()): {"ok": "pong"} }]),
        "{out:#}\n{log}"
    );
    assert!(!log.contains("BEGIN"), "no key material in the log: {log}");
}

/// Pings our worker with and without signing; prints the answers.
const PING: &str = r#"
import json, os
import tasks
from celery import Celery
node = os.environ["NODE"]
out = {"signed": tasks.app.control.ping(destination=[node], timeout=3)}
plain = Celery("plain", broker=os.environ["CELERY_BROKER_URL"])
plain.conf.update(task_serializer="json", accept_content=["json"])
out["plain"] = plain.control.ping(destination=[node], timeout=1.5)
print(json.dumps(out))
"#;

/// Signed control over RabbitMQ, where the pidbox is a fanout exchange and the signed body
/// travels as AMQP content of type `application/data` (on Redis it sits in kombu's JSON
/// envelope): Celery's signed ping is answered, its unsigned one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_control_over_rabbitmq() {
    const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672//";
    let Some(env) = setup(7, "sec-amqp").await else {
        return;
    };
    if !celeriac_test::services::require_service("rabbitmq", "127.0.0.1:5672") {
        return;
    }
    let pki = pki("amqp");
    let worker = OurWorker::start_env(
        AMQP,
        &env.url,
        &[&env.queue],
        &[],
        &[
            ("CELERIAC_SERIALIZER", "auth"),
            ("CELERIAC_SECURITY_KEY", s(&pki.rs.key)),
            ("CELERIAC_SECURITY_CERTIFICATE", s(&pki.rs.cert)),
            ("CELERIAC_SECURITY_CERT_STORE", s(&pki.store)),
        ],
    )
    .await;
    let node = worker.node_name().to_owned();
    let place = crate::support::Amqp {
        url: AMQP.into(),
        backend: env.url.clone(),
        queue: env.queue.clone(),
    };
    let mut vars = python_security(&pki.py, &pki.store);
    vars.push(("NODE", &node));
    let out = python(PING, &place, &vars).await;
    let log = worker.log();
    assert_eq!(
        out["signed"],
        serde_json::json!([{ (node.clone()): {"ok": "pong"} }]),
        "{out:#}\n{log}"
    );
    assert_eq!(out["plain"], serde_json::json!([]), "{out:#}");
    assert!(log.contains("control request dropped"), "{log}");
}
