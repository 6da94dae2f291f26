//! Runs every decoding entry point of `turn_proto::codec` over one byte string. Shared, through
//! `#[path]`, by `tests/proptest.rs` and the `decode` / `channel_data` fuzz targets: whatever
//! the bytes, nothing here may panic, and the few things that must hold of anything that does
//! decode are asserted.

use turn_proto::codec::{
    frame_len, AdditionalAddressFamily, AddressErrorCode, AlternateDomain, AlternateServer,
    Attribute, ChannelData, ChannelNumber, Data, DontFragment, ErrorCodeAttr, EvenPort,
    Fingerprint, FrameLen, Icmp, Lifetime, MappedAddress, Message, MessageIntegrity,
    MessageIntegritySha256, Nonce, PasswordAlgorithm, PasswordAlgorithms, Realm,
    RequestedAddressFamily, RequestedTransport, ReservationToken, Software, UnknownAttributes,
    UserHash, Username, XorMappedAddress, XorPeerAddress, XorRelayedAddress, HEADER_LEN,
};

/// Keys tried against whatever integrity a message carries: empty, short, MD5-sized, long.
const KEYS: [&[u8]; 4] = [b"", b"key", &[0x55; 16], &[0xaa; 80]];

fn get_all<'a, A: Attribute<'a> + std::fmt::Debug>(m: &Message<'a>) {
    let first = m.get::<A>();
    let mut all = m.get_all::<A>();
    // `get` is the first of `get_all`.
    match (first, all.next()) {
        (Ok(None), None) => {}
        (Ok(Some(_)), Some(Ok(_))) | (Err(_), Some(Err(_))) => {}
        (a, b) => panic!("get {a:?} disagrees with the first of get_all {b:?}"),
    }
    for a in all {
        let _ = a;
    }
}

/// Decodes `bytes` as a STUN message and reads everything a server could read from it.
pub(crate) fn stun(bytes: &[u8]) {
    let Ok(m) = Message::decode(bytes) else {
        return;
    };
    assert_eq!(m.as_bytes().len(), bytes.len());
    assert!(bytes.len() >= HEADER_LEN && bytes.len() % 4 == 0);
    let _ = (m.typ(), m.transaction_id(), m.typ().method.name());
    for a in m.attributes() {
        assert!(a.offset >= HEADER_LEN && a.offset + 4 + a.value.len() <= bytes.len());
        let _ = (
            a.typ.name(),
            a.typ.is_known(),
            a.typ.is_comprehension_required(),
        );
    }
    let _ = m.unknown_comprehension_required().count();
    get_all::<MappedAddress>(&m);
    get_all::<XorMappedAddress>(&m);
    get_all::<XorPeerAddress>(&m);
    get_all::<XorRelayedAddress>(&m);
    get_all::<AlternateServer>(&m);
    get_all::<Username<'_>>(&m);
    get_all::<Realm<'_>>(&m);
    get_all::<Nonce<'_>>(&m);
    get_all::<Software<'_>>(&m);
    get_all::<AlternateDomain<'_>>(&m);
    get_all::<UserHash<'_>>(&m);
    get_all::<Data<'_>>(&m);
    get_all::<MessageIntegrity<'_>>(&m);
    get_all::<MessageIntegritySha256<'_>>(&m);
    get_all::<Fingerprint>(&m);
    get_all::<ErrorCodeAttr<'_>>(&m);
    get_all::<UnknownAttributes>(&m);
    get_all::<AddressErrorCode<'_>>(&m);
    get_all::<ChannelNumber>(&m);
    get_all::<Lifetime>(&m);
    get_all::<RequestedAddressFamily>(&m);
    get_all::<AdditionalAddressFamily>(&m);
    get_all::<EvenPort>(&m);
    get_all::<RequestedTransport>(&m);
    get_all::<DontFragment>(&m);
    get_all::<ReservationToken>(&m);
    get_all::<Icmp>(&m);
    get_all::<PasswordAlgorithm<'_>>(&m);
    get_all::<PasswordAlgorithms<'_>>(&m);
    if let Ok(Some(list)) = m.get::<PasswordAlgorithms<'_>>() {
        for alg in list.iter() {
            let _ = alg;
        }
    }
    if let Ok(Some(e)) = m.get::<ErrorCodeAttr<'_>>() {
        assert!((300..700).contains(&e.code.0), "ERROR-CODE {:?}", e.code);
    }
    if let Ok(Some(c)) = m.get::<ChannelNumber>() {
        assert!((ChannelNumber::MIN..=ChannelNumber::MAX_RFC5766).contains(&c.get()));
    }
    for key in KEYS {
        let mi = m.verify_integrity(key);
        let sha = m.verify_integrity_sha256(key);
        assert!(!mi || m.has_integrity());
        assert!(!sha || m.has_integrity_sha256());
    }
    let fp = m.verify_fingerprint();
    assert!(!fp || m.has_fingerprint());
}

/// Decodes `bytes` as one ChannelData message.
pub(crate) fn channel_data(bytes: &[u8]) {
    if let Ok(cd) = ChannelData::decode(bytes) {
        let n = cd.channel.get();
        assert!((ChannelNumber::MIN..=ChannelNumber::MAX_RFC5766).contains(&n));
        let end = ChannelData::HEADER_LEN + cd.data.len();
        assert!(bytes.len() == end || bytes.len() == (end + 3) & !3);
        assert_eq!(cd.data, &bytes[4..end]);
    }
}

/// Cuts `buf` into frames with `frame_len` as a TCP reader would, decoding each frame.
/// Returns how many whole frames were found.
pub(crate) fn stream(mut buf: &[u8]) -> usize {
    let mut frames = 0;
    loop {
        match frame_len(buf) {
            Ok(FrameLen::Complete(n)) => {
                assert!(
                    n >= 4 && n <= buf.len(),
                    "Complete({n}) of {} bytes",
                    buf.len()
                );
                let (frame, rest) = buf.split_at(n);
                stun(frame);
                channel_data(frame);
                frames += 1;
                buf = rest;
            }
            Ok(FrameLen::NeedMore(n)) => {
                assert!(
                    n > buf.len(),
                    "NeedMore({n}) with {} bytes buffered",
                    buf.len()
                );
                return frames;
            }
            Err(_) => return frames,
        }
    }
}

/// Everything at once: one datagram as STUN, as ChannelData, and as a stream buffer.
pub(crate) fn all(bytes: &[u8]) {
    stun(bytes);
    channel_data(bytes);
    stream(bytes);
}
