//! Downloads through an HTTP proxy named by HTTPS_PROXY (NO_PROXY
//! honoured), as the Python tools use one: a CONNECT proxy on 127.0.0.1
//! that alone knows the Hub's host name, so a download that did not go
//! through it could not resolve the endpoint at all.

use crate::hub_cli::Sandbox;
use crate::hub_tree::{MODEL_ID, model_repo};
use crate::mock_hub::MockHub;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// A CONNECT proxy that sends every tunnel to `127.0.0.1:target_port`
/// whatever host was asked for, and records the `CONNECT` targets.
struct ConnectProxy {
    port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl ConnectProxy {
    fn start(target_port: u16) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || tunnel(client, target_port, &log));
            }
        });
        ConnectProxy { port, seen }
    }
}

fn tunnel(client: TcpStream, target_port: u16, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    // The rest of the request head.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).map(|n| n == 0).unwrap_or(true) || h == "\r\n" {
            break;
        }
    }
    if !line.starts_with("CONNECT ") {
        let _ = (&client).write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n");
        return;
    }
    log.lock().unwrap().push(target);
    let Ok(upstream) = TcpStream::connect(("127.0.0.1", target_port)) else { return };
    let _ = (&client).write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
    // Bytes the reader buffered past the head belong to the tunnel.
    let buffered = reader.buffer().to_vec();
    let _ = (&upstream).write_all(&buffered);
    let (mut c_in, mut u_out) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_in, &mut u_out);
        let _ = u_out.shutdown(std::net::Shutdown::Write);
    });
    let (mut u_in, mut c_out) = (upstream, client);
    let _ = std::io::copy(&mut u_in, &mut c_out);
    let _ = c_out.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

#[test]
fn downloads_go_through_the_https_proxy_and_skip_it_for_no_proxy_hosts() {
    let hub = MockHub::start(vec![model_repo()]);
    let proxy = ConnectProxy::start(hub.port());
    // A host name only the proxy can reach.
    let sb = Sandbox::new(&format!("http://hub.test:{}", hub.port()));
    let mut c = sb.cmd(&["download", MODEL_ID]);
    c.env("HTTPS_PROXY", format!("http://127.0.0.1:{}", proxy.port));
    let r = crate::hub_cli::run(c);
    let snap = r.snapshot();
    assert!(snap.join("config.json").is_file() && snap.join("model.safetensors").is_file());
    let seen = proxy.seen.lock().unwrap().clone();
    assert!(!seen.is_empty() && seen.iter().all(|t| *t == format!("hub.test:{}", hub.port())), "{seen:?}");
    // The LFS bytes come from 127.0.0.1 (the mock's storage host), which
    // NO_PROXY lists: fetched directly, not through the proxy.
    let cdn: Vec<_> = hub.requests().into_iter().filter(|r| r.target.starts_with("/cdn/")).collect();
    assert!(!cdn.is_empty());
    assert!(cdn.iter().all(|r| r.header("host").is_some_and(|h| h.starts_with("127.0.0.1"))), "{cdn:?}");
}
