//! Headers written by a real HAProxy decode to exactly what HAProxy was told: v1,
//! and v2 with every TLV option it has (crc32c, unique-id, authority, ssl) behind a
//! TLS frontend, captured raw on the host and fed to mmproxy's decoder.
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Stdio;
use std::sync::mpsc::{channel, Receiver};
use std::thread;

use anyhow::{bail, Context, Result};
use mmproxy::addr::ClientAddr;
use mmproxy::proxy_protocol::{decode, DecodeOptions, Decoded, Endpoints, Tlv, Version};
use mmproxy_tests::client::connect_from;
use mmproxy_tests::haproxy::{Frontend, Haproxy, TempDir};
use mmproxy_tests::netns::{sh, KillOnDrop, Netns};
use mmproxy_tests::topology::*;
use mmproxy_tests::{require_root, WAIT};

const SNI: &str = "service.example";

/// Accepts on `addr` in `ns` and hands over each connection's complete header bytes.
fn capture(ns: &Netns, addr: &str) -> Result<Receiver<Vec<u8>>> {
    let addr: SocketAddr = addr.parse()?;
    let listener = ns.enter(move || TcpListener::bind(addr))??;
    let (tx, rx) = channel();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(WAIT));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                match decode(&buf, &DecodeOptions::stream()) {
                    Ok(Decoded::Complete { len, .. }) => {
                        buf.truncate(len);
                        break;
                    }
                    Ok(Decoded::NeedMore { .. }) => {}
                    Err(_) => break,
                }
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let _ = tx.send(buf);
        }
    });
    Ok(rx)
}

fn self_signed_pem(dir: &TempDir) -> Result<String> {
    let key = dir.0.join("key.pem");
    let cert = dir.0.join("cert.pem");
    sh(std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", &format!("/CN={SNI}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert))?;
    let pem = dir.0.join("haproxy.pem");
    std::fs::write(&pem, [std::fs::read(&cert)?, std::fs::read(&key)?].concat())?;
    Ok(pem.to_string_lossy().into_owned())
}

#[test]
fn real_haproxy_headers_decode_with_every_tlv_option() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let headers = capture(&t.host, "192.0.2.2:8443")?;
    let dir = TempDir::new("tls")?;
    let pem = self_signed_pem(&dir)?;
    let server = "192.0.2.2:8443".to_string();
    let _h = Haproxy::start(
        &t.lb,
        &[
            Frontend {
                bind: format!("{FRONT_V4}:8081"),
                server: server.clone(),
                options: "send-proxy".into(),
                source: None,
            },
            Frontend {
                bind: format!("[{FRONT_V6}]:8082"),
                server: server.clone(),
                options: "send-proxy-v2 proxy-v2-options crc32c,unique-id".into(),
                source: None,
            },
            Frontend {
                bind: format!("{FRONT_V4}:8083 ssl crt {pem}"),
                server,
                options: "send-proxy-v2 proxy-v2-options crc32c,unique-id,authority,ssl".into(),
                source: None,
            },
        ],
    )?;

    // v1 from an IPv4 client.
    let mut c = connect_from(&t.client, None, &format!("{FRONT_V4}:8081"), WAIT)??;
    c.write_all(b"x")?;
    let raw = headers.recv_timeout(WAIT).context("no v1 header")?;
    let header = complete(&raw)?;
    assert_eq!(header.0, Version::V1);
    assert_eq!(header.1, Some(ClientAddr(c.local_addr()?)));

    // v2 with crc32c and unique-id from an IPv6 client.
    let mut c = connect_from(&t.client, None, &format!("[{FRONT_V6}]:8082"), WAIT)??;
    c.write_all(b"x")?;
    let raw = headers.recv_timeout(WAIT).context("no v2 header")?;
    let Ok(Decoded::Complete { header, len }) = decode(&raw, &DecodeOptions::stream()) else {
        bail!("HAProxy's v2 header did not decode: {raw:02x?}");
    };
    assert_eq!(len, raw.len());
    assert_eq!(header.version, Version::V2);
    assert!(
        matches!(header.endpoints(), Endpoints::Proxied { client, .. } if client.0 == c.local_addr()?)
    );
    let tlvs: Vec<Tlv> = header.tlvs.iter().collect();
    assert!(
        tlvs.iter().any(|t| matches!(t, Tlv::Crc32c(_))),
        "no CRC32C: {tlvs:?}"
    );
    assert!(
        header.tlvs.unique_id().is_some_and(|id| !id.is_empty()),
        "{tlvs:?}"
    );

    // v2 with authority and ssl behind TLS: openssl's client speaks TLS with SNI.
    let mut tls = KillOnDrop(
        t.client
            .command("openssl")
            .args([
                "s_client",
                "-quiet",
                "-connect",
                &format!("{FRONT_V4}:8083"),
            ])
            .args(["-servername", SNI])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting openssl s_client")?,
    );
    if let Some(stdin) = tls.0.stdin.as_mut() {
        stdin.write_all(b"x\n")?;
    }
    let raw = headers.recv_timeout(WAIT).context("no header behind TLS")?;
    let Ok(Decoded::Complete { header, .. }) = decode(&raw, &DecodeOptions::stream()) else {
        bail!("HAProxy's TLS-frontend header did not decode: {raw:02x?}");
    };
    match header.endpoints() {
        Endpoints::Proxied { client, .. } => assert_eq!(client.0.ip().to_string(), CLIENT_V4),
        Endpoints::Local => bail!("a TLS client came out as LOCAL"),
    }
    assert_eq!(header.tlvs.authority(), Some(SNI));
    let ssl = header.tlvs.ssl().context("no SSL TLV")?;
    assert_ne!(ssl.client & 0x01, 0, "the SSL flag is not set");
    assert!(
        ssl.version().is_some_and(|v| v.starts_with("TLSv1")),
        "{:?}",
        ssl.version()
    );
    assert!(header.tlvs.iter().any(|t| matches!(t, Tlv::Crc32c(_))));
    Ok(())
}

/// Decodes a whole captured header: (version, client when proxied).
fn complete(raw: &[u8]) -> Result<(Version, Option<ClientAddr>)> {
    match decode(raw, &DecodeOptions::stream()) {
        Ok(Decoded::Complete { header, len }) if len == raw.len() => Ok((
            header.version,
            match header.endpoints() {
                Endpoints::Proxied { client, .. } => Some(client),
                Endpoints::Local => None,
            },
        )),
        other => bail!("captured header {raw:02x?} decoded as {other:?}"),
    }
}
