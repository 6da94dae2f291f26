//! Writes the seed corpora in `seeds/<target>/` (run from `turnd/proto/fuzz`:
//! `cargo run --example gen_seeds`). The `rfc5769-*` and `rfc8489-*` seeds are the byte arrays
//! of `tests/vectors.rs`, copied as they are (and, for the `server` target, wrapped in a Raw
//! op); this program adds TURN traffic: requests built with the codec, and every datagram a
//! `Server` sends during a scenario that allocates, binds a channel and relays both ways. For
//! the `server` target the seeds are scenarios in the byte format of
//! `common/driver.rs::parse_ops`.

#[allow(dead_code)]
#[path = "../common/driver.rs"]
mod driver;

use std::fs;
use std::path::Path;

use turn_proto::auth::long_term_key_md5;
use turn_proto::codec::*;
use turn_proto::server::Destination;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("seeds").join(target);
    fs::create_dir_all(&dir).expect("mkdir");
    fs::write(dir.join(name), bytes).expect("write seed");
}

fn request(method: Method, body: impl FnOnce(&mut MessageBuilder<'_>)) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(
        &mut out,
        MessageType::new(method, Class::Request),
        TransactionId([7; 12]),
    );
    body(&mut b);
    b.add(&Username("alice"))
        .add(&Realm(driver::REALM))
        .add(&Nonce(
            "obMatJos2AAABAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ));
    b.add_message_integrity(&long_term_key_md5("alice", driver::REALM, "wonderland"));
    b.add_fingerprint();
    b.finish();
    out
}

fn main() {
    let peer: std::net::SocketAddr = "192.0.2.44:9000".parse().expect("addr");
    let allocate = request(Method::ALLOCATE, |b| {
        b.add(&RequestedTransport::UDP)
            .add(&AdditionalAddressFamily(AddressFamily::IPV6))
            .add(&EvenPort { reserve: true })
            .add(&Lifetime(600))
            .add(&DontFragment);
    });
    let bind = request(Method::CHANNEL_BIND, |b| {
        b.add(&ChannelNumber::new(0x4001).expect("channel"))
            .add(&XorPeerAddress(peer));
    });
    let permit = request(Method::CREATE_PERMISSION, |b| {
        b.add(&XorPeerAddress(peer)).add(&XorPeerAddress(
            "[2001:db8::44]:9000".parse().expect("addr"),
        ));
    });
    let refresh = request(Method::REFRESH, |b| {
        b.add(&Lifetime(0));
    });
    let mut send = Vec::new();
    let mut b = MessageBuilder::new(
        &mut send,
        MessageType::new(Method::SEND, Class::Indication),
        TransactionId([8; 12]),
    );
    b.add(&XorPeerAddress(peer)).add(&Data(b"hello peer"));
    b.finish();
    let mut cd = Vec::new();
    ChannelData {
        channel: ChannelNumber::new(0x4001).expect("channel"),
        data: b"hello channel",
    }
    .encode(true, &mut cd);
    let mut cd_unpadded = Vec::new();
    ChannelData {
        channel: ChannelNumber::new(0x4fff).expect("channel"),
        data: b"odd",
    }
    .encode(false, &mut cd_unpadded);

    for (name, bytes) in [
        ("turn-allocate", &allocate),
        ("turn-channel-bind", &bind),
        ("turn-create-permission", &permit),
        ("turn-refresh", &refresh),
        ("turn-send-indication", &send),
    ] {
        write("decode", name, bytes);
    }
    write("channel_data", "turn-channel-data-padded", &cd);
    write("channel_data", "turn-channel-data-unpadded", &cd_unpadded);
    // A TCP stream: Allocate, ChannelData, Send indication back to back.
    let stream = [allocate.as_slice(), &cd, &send].concat();
    write("channel_data", "turn-stream", &stream);

    // Scenario seeds for the `server` target (format: see `driver::parse_ops`).
    // setup: both relay families, no quotas, 8 permissions.
    let setup = [0x05u8, 0x70];
    // Request op (tag 0): tuple, cred, kind, kind fields, tid, fingerprint, corrupt flag.
    let alloc_op = [0u8, 0, 1, 1, 1, 17, 0, 1, 2, 1, 1, 0, 0, 0, 1, 1, 0];
    let perm_op = [0u8, 0, 1, 3, 2, 0, 2, 2, 1, 0];
    let bind_op = [0u8, 0, 1, 4, 0, 1, 0, 3, 0, 0];
    let refresh_op = [0u8, 0, 1, 2, 1, 1, 0, 4, 1, 0];
    let send_op = [4u8, 0, 0, 0, 5, b'h', b'e', b'l', b'l', b'o'];
    let cd_op = [5u8, 0, 0, 1, 4, b'd', b'a', b't', b'a'];
    let peer_op = [7u8, 0, 0, 4, b'b', b'a', b'c', b'k'];
    let advance_op = [8u8, 0, 0x09, 0x27, 0xc0]; // 600 s
    let scenario = [
        &setup[..],
        &alloc_op,
        &perm_op,
        &bind_op,
        &send_op,
        &cd_op,
        &peer_op,
        &advance_op,
        &refresh_op,
    ]
    .concat();
    write("server", "scenario-allocate-bind-relay-refresh", &scenario);
    // Same, with relay requests held (RelayMode 8), a TCP close and a late answer (op 10).
    let tcp_alloc = {
        let mut a = alloc_op;
        a[1] = 2;
        a
    };
    let late = [&setup[..], &[9, 8], &tcp_alloc, &[11, 2], &[9, 1], &[10]].concat();
    write("server", "scenario-late-relay-answer", &late);
    // The operations API (op 12): drain with an alternate, an Allocate redirected, a reload
    // into no-STUN mode, the sessions listed, alice's allocations ended by the admin.
    let second_alloc = {
        let mut a = alloc_op;
        a[1] = 3;
        a
    };
    let operations = [
        &setup[..],
        &alloc_op,
        &[12, 0x48],
        &second_alloc,
        &[12, 1],
        &[12, 0x12],
        &[12, 5],
        &[12, 3],
        &refresh_op,
    ]
    .concat();
    write("server", "scenario-drain-reload-admin", &operations);

    // Run the first scenario and keep what the server sent: real responses, Data
    // indications and ChannelData.
    let (s, ops) = driver::parse_ops(&scenario);
    let mut d = driver::Driver::new(s);
    let mut n = 0;
    for op in &ops {
        d.step(op);
        for (dst, payload) in std::mem::take(&mut d.sent) {
            if matches!(dst, Destination::Client(_)) {
                n += 1;
                let target = if payload[0] & 0xc0 == 0x40 {
                    "channel_data"
                } else {
                    "decode"
                };
                write(target, &format!("server-reply-{n}"), &payload);
            }
        }
    }
    d.finish();
    // Raw client datagrams as Raw ops (tag 6) so the server target starts from real messages.
    for (i, m) in [&allocate, &bind, &send, &cd].into_iter().enumerate() {
        let mut raw = setup.to_vec();
        raw.extend_from_slice(&[6, 0, u8::try_from(m.len()).expect("short")]);
        raw.extend_from_slice(m);
        write("server", &format!("raw-{i}"), &raw);
    }
    println!("{n} server replies written");
}
