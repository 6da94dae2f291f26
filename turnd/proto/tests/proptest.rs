//! Property tests of the codec and the server (issue 2, "How it must be shown"):
//! every attribute round-trips through `MessageBuilder` and `Message::decode`; the decoders
//! never panic on arbitrary bytes; MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and FINGERPRINT
//! verify after signing and fail after any single flipped bit; ChannelData and stream framing
//! round-trip; a `Server` fed arbitrary scenarios never panics, keeps answering Binding
//! requests and leaks nothing once every lifetime has run out.
//!
//! The scenario driver and the decode exerciser live in `fuzz/common/` and are shared with the
//! cargo-fuzz targets, so a fuzz crash and a failing property run the same code.

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
#[path = "../fuzz/common/driver.rs"]
mod driver;
#[allow(dead_code)]
#[path = "../fuzz/common/exercise.rs"]
mod exercise;

use std::net::{IpAddr, SocketAddr};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::Config;
use turn_proto::codec::*;

use driver::{Driver, Op, ReqKind, Setup};

/// Default case count; no failure files are written (the test tree is shared).
fn config() -> Config {
    Config {
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    (any::<IpAddr>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

/// UTF-8 text of at most `max` bytes, often exactly at the limit.
fn text(max: usize) -> impl Strategy<Value = String> {
    let fill = move |chars: Vec<char>| {
        let mut s = String::new();
        for c in chars {
            if s.len() + c.len_utf8() > max {
                break;
            }
            s.push(c);
        }
        s
    };
    prop_oneof![
        vec(any::<char>(), 0..=64).prop_map(fill),
        vec(any::<char>(), 0..=max).prop_map(fill),
        // ASCII right up to the limit.
        Just("x".repeat(max)),
    ]
}

fn tid() -> impl Strategy<Value = TransactionId> {
    any::<[u8; 12]>().prop_map(TransactionId)
}

fn class() -> impl Strategy<Value = Class> {
    prop_oneof![
        Just(Class::Request),
        Just(Class::Indication),
        Just(Class::Success),
        Just(Class::Error),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    (300u16..700).prop_map(ErrorCode)
}

/// Encodes one attribute into a message that starts after `prefix` in the lent buffer, with
/// `pad` as the padding byte, and checks the framing the builder produced.
fn encode_one<'x, A: Attribute<'x>>(
    attr: &A,
    tid: TransactionId,
    prefix: &[u8],
    pad: u8,
) -> Vec<u8> {
    let mut out = prefix.to_vec();
    let mut b = MessageBuilder::new(
        &mut out,
        MessageType::new(Method::BINDING, Class::Indication),
        tid,
    )
    .padding(pad);
    b.add(attr);
    let len = b.finish();
    assert_eq!(
        &out[..prefix.len()],
        prefix,
        "the builder touched the prefix"
    );
    let msg = out.split_off(prefix.len());
    assert_eq!(msg.len(), len);
    let vlen = usize::from(u16::from_be_bytes([msg[22], msg[23]]));
    assert_eq!(msg.len(), HEADER_LEN + 4 + ((vlen + 3) & !3));
    assert_eq!(u16::from_be_bytes([msg[20], msg[21]]), A::TYPE.0);
    assert!(msg[HEADER_LEN + 4 + vlen..].iter().all(|&b| b == pad));
    msg
}

/// Round-trips `$attr` (of type `$ty`) through the builder and the decoder.
macro_rules! round_trip {
    ($ty:ty, $attr:expr, $tid:expr, $prefix:expr, $pad:expr) => {{
        let attr: $ty = $attr;
        let bytes = encode_one(&attr, $tid, $prefix, $pad);
        let m = Message::decode(&bytes).expect("decode");
        prop_assert_eq!(m.transaction_id(), $tid);
        prop_assert_eq!(m.get::<$ty>(), Ok(Some(attr)));
        prop_assert_eq!(m.attributes().count(), 1);
        prop_assert_eq!(m.unknown_comprehension_required().count(), 0);
    }};
}

/// A message made of a header and arbitrary TLVs whose lengths add up: far more of these
/// decode than of uniformly random bytes, so the attribute getters get exercised.
fn stun_shaped() -> impl Strategy<Value = Vec<u8>> {
    let typ = prop_oneof![
        (0u16..0x30),
        (0x8000u16..0x8030),
        any::<u16>(),
        Just(0x0008u16),
        Just(0x001c),
        Just(0x8028),
    ];
    let value = prop_oneof![
        vec(any::<u8>(), 0..40),
        vec(any::<u8>(), 0..4),
        vec(any::<u8>(), 20..=20),
        vec(any::<u8>(), 32..=32),
    ];
    (
        any::<u16>(),
        tid(),
        vec((typ, value, any::<u8>()), 0..12),
        prop::option::of((any::<prop::sample::Index>(), any::<u8>())),
    )
        .prop_map(|(typ, tid, attrs, mutate)| {
            let mut out = Vec::new();
            let mut b = MessageBuilder::new(&mut out, MessageType::from_u16(typ & 0x3fff), tid);
            for (t, v, pad) in &attrs {
                let _ = pad;
                b.add_raw(AttrType(*t), v);
            }
            b.finish();
            if let Some((i, x)) = mutate {
                let i = i.index(out.len());
                out[i] ^= x;
            }
            out
        })
}

// ---------------------------------------------------------------------------------------------
// Attributes

proptest! {
    #![proptest_config(config())]

    #[test]
    fn address_attributes_round_trip_v4_and_v6(
        addr in socket_addr(),
        tid in tid(),
        prefix in vec(any::<u8>(), 0..8),
        pad in any::<u8>(),
    ) {
        round_trip!(MappedAddress, MappedAddress(addr), tid, &prefix, pad);
        round_trip!(XorMappedAddress, XorMappedAddress(addr), tid, &prefix, pad);
        round_trip!(XorPeerAddress, XorPeerAddress(addr), tid, &prefix, pad);
        round_trip!(XorRelayedAddress, XorRelayedAddress(addr), tid, &prefix, pad);
        round_trip!(AlternateServer, AlternateServer(addr), tid, &prefix, pad);
    }

    #[test]
    fn xor_addresses_are_not_sent_in_the_clear(addr in socket_addr(), tid in tid()) {
        // RFC 8489 §14.2: the port is XORed with the cookie's top half, so it never appears
        // as is.
        let bytes = encode_one(&XorMappedAddress(addr), tid, &[], 0);
        let port = u16::from_be_bytes([bytes[26], bytes[27]]);
        prop_assert_eq!(port ^ 0x2112, addr.port());
        let plain = encode_one(&MappedAddress(addr), tid, &[], 0);
        prop_assert_eq!(u16::from_be_bytes([plain[26], plain[27]]), addr.port());
    }

    #[test]
    fn text_attributes_round_trip_within_their_max_lengths(
        user in text(509),
        realm in text(763),
        nonce in text(763),
        software in text(763),
        domain in text(255),
        tid in tid(),
        pad in any::<u8>(),
    ) {
        round_trip!(Username<'_>, Username(&user), tid, &[], pad);
        round_trip!(Realm<'_>, Realm(&realm), tid, &[], pad);
        round_trip!(Nonce<'_>, Nonce(&nonce), tid, &[], pad);
        round_trip!(Software<'_>, Software(&software), tid, &[], pad);
        round_trip!(AlternateDomain<'_>, AlternateDomain(&domain), tid, &[], pad);
    }

    #[test]
    fn text_attributes_over_their_max_length_or_not_utf8_are_refused(
        extra in 1usize..64,
        bad_at in any::<prop::sample::Index>(),
        tid in tid(),
    ) {
        let long = |max: usize| "y".repeat(max + extra);
        let refused = |bytes: &[u8]| -> bool {
            let m = Message::decode(bytes).unwrap();
            m.get::<Username<'_>>().is_err()
                && m.get::<Realm<'_>>().is_err()
                && m.get::<Nonce<'_>>().is_err()
                && m.get::<Software<'_>>().is_err()
                && m.get::<AlternateDomain<'_>>().is_err()
        };
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(Method::BINDING, Class::Request),
            tid,
        );
        b.add_raw(AttrType::USERNAME, long(509).as_bytes())
            .add_raw(AttrType::REALM, long(763).as_bytes())
            .add_raw(AttrType::NONCE, long(763).as_bytes())
            .add_raw(AttrType::SOFTWARE, long(763).as_bytes())
            .add_raw(AttrType::ALTERNATE_DOMAIN, long(255).as_bytes());
        b.finish();
        prop_assert!(refused(&out));

        // A byte that is never valid UTF-8, within the length limit.
        let mut v = b"abcdefgh".to_vec();
        let at = bad_at.index(v.len());
        v[at] = 0xff;
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(Method::BINDING, Class::Request),
            tid,
        );
        for t in [
            AttrType::USERNAME,
            AttrType::REALM,
            AttrType::NONCE,
            AttrType::SOFTWARE,
            AttrType::ALTERNATE_DOMAIN,
        ] {
            b.add_raw(t, &v);
        }
        b.finish();
        prop_assert!(refused(&out));
    }

    #[test]
    fn opaque_attributes_round_trip(
        hash in any::<[u8; 32]>(),
        data in vec(any::<u8>(), 0..1200),
        mi in any::<[u8; 20]>(),
        sha_len in 4usize..=8,
        sha in any::<[u8; 32]>(),
        fp in any::<u32>(),
        token in any::<[u8; 8]>(),
        tid in tid(),
        pad in any::<u8>(),
    ) {
        round_trip!(UserHash<'_>, UserHash(&hash), tid, &[], pad);
        round_trip!(Data<'_>, Data(&data), tid, &[], pad);
        round_trip!(MessageIntegrity<'_>, MessageIntegrity(&mi), tid, &[], pad);
        round_trip!(
            MessageIntegritySha256<'_>,
            MessageIntegritySha256(&sha[..sha_len * 4]),
            tid,
            &[],
            pad
        );
        round_trip!(Fingerprint, Fingerprint(fp), tid, &[], pad);
        round_trip!(ReservationToken, ReservationToken(token), tid, &[], pad);
        round_trip!(DontFragment, DontFragment, tid, &[], pad);
    }

    #[test]
    fn error_attributes_round_trip(
        code in error_code(),
        reason in text(763),
        family in any::<u8>(),
        types in vec(any::<u16>(), 0..=UnknownAttributes::MAX),
        tid in tid(),
    ) {
        round_trip!(ErrorCodeAttr<'_>, ErrorCodeAttr { code, reason: &reason }, tid, &[], 0);
        round_trip!(
            AddressErrorCode<'_>,
            AddressErrorCode { family: AddressFamily(family), code, reason: &reason },
            tid,
            &[],
            0
        );
        let unknown = UnknownAttributes::from_types(types.iter().map(|&t| AttrType(t)));
        prop_assert_eq!(unknown.types().len(), types.len());
        round_trip!(UnknownAttributes, unknown, tid, &[], 0);
    }

    #[test]
    fn error_codes_outside_300_to_699_are_refused(
        class in 0u8..8,
        number in 0u8..=255,
        tid in tid(),
    ) {
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(Method::BINDING, Class::Error),
            tid,
        );
        b.add_raw(AttrType::ERROR_CODE, &[0, 0, class, number]);
        b.finish();
        let m = Message::decode(&out).unwrap();
        let valid = (3..=6).contains(&class) && number <= 99;
        let got = m.get::<ErrorCodeAttr<'_>>();
        prop_assert_eq!(got.is_ok(), valid, "{:?}", got);
        if let Ok(Some(e)) = got {
            prop_assert_eq!(e.code.0, u16::from(class) * 100 + u16::from(number));
        }
    }

    #[test]
    fn turn_scalar_attributes_round_trip(
        channel in ChannelNumber::MIN..=ChannelNumber::MAX,
        old_channel in ChannelNumber::MAX + 1..=ChannelNumber::MAX_RFC5766,
        lifetime in any::<u32>(),
        family in any::<u8>(),
        additional in any::<u8>(),
        reserve in any::<bool>(),
        protocol in any::<u8>(),
        icmp in any::<(u8, u8, u32)>(),
        tid in tid(),
    ) {
        round_trip!(ChannelNumber, ChannelNumber::new(channel).unwrap(), tid, &[], 0);
        round_trip!(ChannelNumber, ChannelNumber::new(old_channel).unwrap(), tid, &[], 0);
        round_trip!(Lifetime, Lifetime(lifetime), tid, &[], 0);
        round_trip!(
            RequestedAddressFamily,
            RequestedAddressFamily(AddressFamily(family)),
            tid,
            &[],
            0
        );
        round_trip!(
            AdditionalAddressFamily,
            AdditionalAddressFamily(AddressFamily(additional)),
            tid,
            &[],
            0
        );
        round_trip!(EvenPort, EvenPort { reserve }, tid, &[], 0);
        round_trip!(RequestedTransport, RequestedTransport(protocol), tid, &[], 0);
        round_trip!(
            Icmp,
            Icmp { icmp_type: icmp.0, code: icmp.1, error_data: icmp.2 },
            tid,
            &[],
            0
        );
    }

    #[test]
    fn channel_numbers_outside_0x4000_to_0x7fff_are_refused_and_rfc8656_is_0x4fff(
        n in any::<u16>(),
        tid in tid(),
    ) {
        // The codec takes RFC 5766's range; whether 0x5000-0x7FFF is served is the server's
        // policy (`rfc5766_channel_numbers`).
        let valid = (0x4000..=0x7fff).contains(&n);
        let ch = ChannelNumber::new(n);
        prop_assert_eq!(ch.is_ok(), valid);
        if let Ok(c) = ch {
            prop_assert_eq!(c.is_rfc8656(), n <= 0x4fff);
        }
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(Method::CHANNEL_BIND, Class::Request),
            tid,
        );
        let [hi, lo] = n.to_be_bytes();
        b.add_raw(AttrType::CHANNEL_NUMBER, &[hi, lo, 0, 0]);
        b.finish();
        let got = Message::decode(&out).unwrap().get::<ChannelNumber>();
        prop_assert_eq!(got.is_ok(), valid);
        if let Ok(Some(c)) = got {
            prop_assert_eq!(c.get(), n);
        }
        // ChannelData on such a number decodes exactly when the number is valid.
        let datagram = [hi, lo, 0, 1, 0xab];
        prop_assert_eq!(ChannelData::decode(&datagram).is_ok(), valid);
    }

    #[test]
    fn password_algorithm_attributes_round_trip(
        algorithm in any::<u16>(),
        params in vec(any::<u8>(), 0..64),
        list in vec((any::<u16>(), vec(any::<u8>(), 0..12)), 1..6),
        tid in tid(),
    ) {
        round_trip!(
            PasswordAlgorithm<'_>,
            PasswordAlgorithm { algorithm: PasswordAlgorithmId(algorithm), params: &params },
            tid,
            &[],
            0
        );
        // PASSWORD-ALGORITHMS has no builder of its own: write the RFC 8489 §14.11 layout
        // (each entry's parameters padded to 4) and read it back.
        let mut raw = Vec::new();
        for (alg, p) in &list {
            raw.extend_from_slice(&alg.to_be_bytes());
            raw.extend_from_slice(&u16::try_from(p.len()).unwrap().to_be_bytes());
            raw.extend_from_slice(p);
            raw.resize((raw.len() + 3) & !3, 0);
        }
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(Method::ALLOCATE, Class::Error),
            tid,
        );
        b.add_raw(AttrType::PASSWORD_ALGORITHMS, &raw);
        b.finish();
        let m = Message::decode(&out).unwrap();
        let got = m.get::<PasswordAlgorithms<'_>>().unwrap().unwrap();
        let entries: Vec<(u16, Vec<u8>)> =
            got.iter().map(|a| (a.algorithm.0, a.params.to_vec())).collect();
        prop_assert_eq!(entries, list);
        // And it re-encodes to the same value.
        round_trip!(PasswordAlgorithms<'_>, got, tid, &[], 0);
    }

    #[test]
    fn every_attribute_in_one_message_round_trips_in_order(
        addr in socket_addr(),
        user in text(64),
        data in vec(any::<u8>(), 0..64),
        code in error_code(),
        channel in ChannelNumber::MIN..=ChannelNumber::MAX,
        lifetime in any::<u32>(),
        token in any::<[u8; 8]>(),
        key in vec(any::<u8>(), 0..40),
        tid in tid(),
    ) {
        let ch = ChannelNumber::new(channel).unwrap();
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(
            &mut out,
            MessageType::new(Method::ALLOCATE, Class::Success),
            tid,
        );
        b.add(&XorRelayedAddress(addr))
            .add(&XorMappedAddress(addr))
            .add(&MappedAddress(addr))
            .add(&Username(&user))
            .add(&Data(&data))
            .add(&ErrorCodeAttr { code, reason: &user })
            .add(&ch)
            .add(&Lifetime(lifetime))
            .add(&ReservationToken(token))
            .add(&EvenPort { reserve: true })
            .add(&DontFragment)
            .add(&Software(&user))
            .add_message_integrity(&key)
            .add_message_integrity_sha256(&key)
            .add_fingerprint();
        b.finish();
        let m = Message::decode(&out).unwrap();
        prop_assert_eq!(m.get::<XorRelayedAddress>(), Ok(Some(XorRelayedAddress(addr))));
        prop_assert_eq!(m.get::<XorMappedAddress>(), Ok(Some(XorMappedAddress(addr))));
        prop_assert_eq!(m.get::<MappedAddress>(), Ok(Some(MappedAddress(addr))));
        prop_assert_eq!(m.get::<Username<'_>>(), Ok(Some(Username(&user))));
        prop_assert_eq!(m.get::<Data<'_>>(), Ok(Some(Data(&data))));
        prop_assert_eq!(
            m.get::<ErrorCodeAttr<'_>>(),
            Ok(Some(ErrorCodeAttr { code, reason: &user }))
        );
        prop_assert_eq!(m.get::<ChannelNumber>(), Ok(Some(ch)));
        prop_assert_eq!(m.get::<Lifetime>(), Ok(Some(Lifetime(lifetime))));
        prop_assert_eq!(m.get::<ReservationToken>(), Ok(Some(ReservationToken(token))));
        prop_assert_eq!(m.get::<EvenPort>(), Ok(Some(EvenPort { reserve: true })));
        prop_assert_eq!(m.get::<DontFragment>(), Ok(Some(DontFragment)));
        prop_assert_eq!(m.get::<Software<'_>>(), Ok(Some(Software(&user))));
        let order: Vec<AttrType> = m.attributes().map(|a| a.typ).collect();
        prop_assert_eq!(
            order,
            vec![
                AttrType::XOR_RELAYED_ADDRESS,
                AttrType::XOR_MAPPED_ADDRESS,
                AttrType::MAPPED_ADDRESS,
                AttrType::USERNAME,
                AttrType::DATA,
                AttrType::ERROR_CODE,
                AttrType::CHANNEL_NUMBER,
                AttrType::LIFETIME,
                AttrType::RESERVATION_TOKEN,
                AttrType::EVEN_PORT,
                AttrType::DONT_FRAGMENT,
                AttrType::SOFTWARE,
                AttrType::MESSAGE_INTEGRITY,
                AttrType::MESSAGE_INTEGRITY_SHA256,
                AttrType::FINGERPRINT,
            ]
        );
        prop_assert!(m.verify_integrity(&key));
        prop_assert!(m.verify_integrity_sha256(&key));
        prop_assert!(m.verify_fingerprint());
    }

    // -----------------------------------------------------------------------------------------
    // Message type

    #[test]
    fn message_type_method_and_class_round_trip(
        method in 0u16..0x1000,
        class in class(),
        tid in tid(),
    ) {
        let t = MessageType::new(Method(method), class);
        let v = t.to_u16();
        prop_assert_eq!(v & 0xc000, 0);
        prop_assert_eq!(MessageType::from_u16(v), t);
        let mut out = Vec::new();
        let b = MessageBuilder::new(&mut out, t, tid);
        prop_assert_eq!(b.transaction_id(), tid);
        prop_assert_eq!(b.finish(), HEADER_LEN);
        let m = Message::decode(&out).unwrap();
        prop_assert_eq!(m.typ(), t);
        prop_assert_eq!(m.transaction_id(), tid);
        prop_assert_eq!(m.attributes().count(), 0);
    }

    #[test]
    fn every_14_bit_message_type_unpacks_and_packs_back(v in 0u16..0x4000) {
        prop_assert_eq!(MessageType::from_u16(v).to_u16(), v);
    }

    // -----------------------------------------------------------------------------------------
    // Decoders never panic

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..600)) {
        exercise::all(&bytes);
    }

    #[test]
    fn decoders_never_panic_on_stun_shaped_bytes(bytes in stun_shaped()) {
        exercise::all(&bytes);
    }

    #[test]
    fn decoders_never_panic_on_bytes_after_a_valid_header(
        typ in 0u16..0x4000,
        tid in tid(),
        body in vec(any::<u8>(), 0..200),
    ) {
        // A header whose length covers exactly the random body (rounded down to 4).
        let body = &body[..body.len() & !3];
        let mut out = Vec::new();
        MessageBuilder::new(&mut out, MessageType::from_u16(typ), tid).finish();
        out[2..4].copy_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        out.extend_from_slice(body);
        exercise::all(&out);
    }

    // -----------------------------------------------------------------------------------------
    // Integrity and fingerprint

    #[test]
    fn sign_then_verify_holds_and_any_flipped_bit_fails(
        key in vec(any::<u8>(), 0..100),
        other in vec(any::<u8>(), 0..100),
        user in text(24),
        data in vec(any::<u8>(), 0..40),
        typ in 0u16..0x4000,
        tid in tid(),
        which in 0u8..5,
        flips in vec(any::<prop::sample::Index>(), 64),
    ) {
        // which: 0 MESSAGE-INTEGRITY, 1 MESSAGE-INTEGRITY-SHA256, 2 both, 3 FINGERPRINT only,
        // 4 MESSAGE-INTEGRITY and FINGERPRINT.
        let mi = matches!(which, 0 | 2 | 4);
        let sha = matches!(which, 1 | 2);
        let fp = matches!(which, 3 | 4);
        let mut out = Vec::new();
        let mut b = MessageBuilder::new(&mut out, MessageType::from_u16(typ), tid);
        b.add(&Username(&user)).add(&Data(&data));
        if mi {
            b.add_message_integrity(&key);
        }
        if sha {
            b.add_message_integrity_sha256(&key);
        }
        if fp {
            b.add_fingerprint();
        }
        b.finish();

        let verifies = |bytes: &[u8], key: &[u8]| -> bool {
            let Ok(m) = Message::decode(bytes) else { return false };
            (!mi || m.verify_integrity(key))
                && (!sha || m.verify_integrity_sha256(key))
                && (!fp || m.verify_fingerprint())
        };
        let m = Message::decode(&out).unwrap();
        prop_assert_eq!(m.has_integrity(), mi);
        prop_assert_eq!(m.has_integrity_sha256(), sha);
        prop_assert_eq!(m.has_fingerprint(), fp);
        prop_assert!(verifies(&out, &key));
        if key != other && (mi || sha) {
            prop_assert!(!verifies(&out, &other), "verified under another key");
        }
        // Every header bit, and a fresh sample of the others each case (every bit of the
        // RFC 5769 long-term vector is flipped exhaustively in tests/vectors.rs).
        let body_bits = flips.iter().map(|i| HEADER_LEN * 8 + i.index(out.len() * 8 - HEADER_LEN * 8));
        for bit in (0..HEADER_LEN * 8).chain(body_bits) {
            let mut flipped = out.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(
                !verifies(&flipped, &key),
                "bit {} of {} flipped and the message still verifies",
                bit,
                out.len() * 8
            );
        }
    }

    // -----------------------------------------------------------------------------------------
    // ChannelData and stream framing

    #[test]
    fn channel_data_round_trips_with_and_without_padding(
        channel in ChannelNumber::MIN..=ChannelNumber::MAX,
        data in vec(any::<u8>(), 0..300),
        pad in any::<bool>(),
        prefix in vec(any::<u8>(), 0..6),
    ) {
        let cd = ChannelData { channel: ChannelNumber::new(channel).unwrap(), data: &data };
        let mut out = prefix.clone();
        cd.encode(pad, &mut out);
        prop_assert_eq!(&out[..prefix.len()], &prefix[..]);
        let out = &out[prefix.len()..];
        let unpadded = 4 + data.len();
        let padded = (unpadded + 3) & !3;
        prop_assert_eq!(out.len(), if pad { padded } else { unpadded });
        prop_assert_eq!(ChannelData::decode(out), Ok(cd));
        prop_assert_eq!(Demux::classify(out[0]), Demux::ChannelData);
        // The relay fast path writes the same header.
        let mut hdr = [0u8; 4];
        ChannelData::write_header(cd.channel, u16::try_from(data.len()).unwrap(), &mut hdr);
        prop_assert_eq!(&hdr[..], &out[..4]);
        // Streams need the padding: frame_len counts it.
        let expect = if pad || padded == unpadded {
            FrameLen::Complete(padded)
        } else {
            FrameLen::NeedMore(padded)
        };
        prop_assert_eq!(frame_len(out), Ok(expect));
        // One more byte than the padding allows is refused.
        let mut long = out.to_vec();
        long.resize(padded + 1, 0);
        prop_assert!(ChannelData::decode(&long).is_err());
        // As is anything shorter than the data.
        if !data.is_empty() {
            prop_assert!(ChannelData::decode(&out[..unpadded - 1]).is_err());
        }
    }

    #[test]
    fn frame_len_cuts_a_stream_into_the_frames_written(
        frames in vec((any::<bool>(), ChannelNumber::MIN..=ChannelNumber::MAX,
                       vec(any::<u8>(), 0..50), tid()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut stream = Vec::new();
        let mut lens = Vec::new();
        for (is_stun, ch, data, tid) in &frames {
            let before = stream.len();
            if *is_stun {
                let mut b = MessageBuilder::new(
                    &mut stream,
                    MessageType::new(Method::SEND, Class::Indication),
                    *tid,
                );
                b.add(&Data(data));
                b.finish();
            } else {
                ChannelData { channel: ChannelNumber::new(*ch).unwrap(), data }
                    .encode(true, &mut stream);
            }
            lens.push(stream.len() - before);
        }
        let mut rest = &stream[..];
        for (len, (is_stun, ch, data, tid)) in lens.iter().zip(&frames) {
            prop_assert_eq!(frame_len(rest), Ok(FrameLen::Complete(*len)));
            let (frame, tail) = rest.split_at(*len);
            if *is_stun {
                let m = Message::decode(frame).unwrap();
                prop_assert_eq!(m.transaction_id(), *tid);
                prop_assert_eq!(m.get::<Data<'_>>(), Ok(Some(Data(data))));
            } else {
                let cd = ChannelData::decode(frame).unwrap();
                prop_assert_eq!(cd.channel.get(), *ch);
                prop_assert_eq!(cd.data, &data[..]);
            }
            rest = tail;
        }
        prop_assert_eq!(frame_len(rest), Ok(FrameLen::NeedMore(4)));
        // A stream cut short inside the first frame asks for more, never for less.
        let n = cut.index(lens[0]);
        match frame_len(&stream[..n]) {
            Ok(FrameLen::NeedMore(need)) => prop_assert!(need > n && need <= lens[0].max(20)),
            other => prop_assert!(false, "cut at {} of {}: {:?}", n, lens[0], other),
        }
        prop_assert_eq!(exercise::stream(&stream), frames.len());
    }
}

// ---------------------------------------------------------------------------------------------
// The server

fn setup() -> impl Strategy<Value = Setup> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0u32..3),
        prop::option::of(0u32..4),
        1usize..6,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(v4, v6, per_user, total, max_permissions, software, rfc5766_channels)| Setup {
                relay_ipv4: v4,
                relay_ipv6: v6,
                per_user_quota: per_user,
                total_quota: total,
                max_permissions,
                software,
                rfc5766_channels,
            },
        )
}

fn req_kind() -> impl Strategy<Value = ReqKind> {
    let family = || prop::option::of(prop_oneof![Just(1u8), Just(2u8), any::<u8>()]);
    let lifetime =
        || prop::option::of(prop_oneof![Just(0u32), Just(600), Just(3600), any::<u32>()]);
    prop_oneof![
        1 => Just(ReqKind::Binding),
        3 => (
            prop::option::of(prop_oneof![4 => Just(17u8), 1 => any::<u8>()]),
            family(),
            family(),
            prop::option::of(any::<bool>()),
            prop::option::of(any::<u8>()),
            lifetime(),
            any::<bool>(),
        )
            .prop_map(|(transport, requested_family, additional_family, even_port, token,
                        lifetime, dont_fragment)| ReqKind::Allocate {
                transport,
                requested_family,
                additional_family,
                even_port,
                token,
                lifetime,
                dont_fragment,
            }),
        1 => (lifetime(), family())
            .prop_map(|(lifetime, requested_family)| ReqKind::Refresh { lifetime, requested_family }),
        2 => vec(any::<u8>(), 0..20).prop_map(|peers| ReqKind::CreatePermission { peers }),
        2 => (any::<u16>(), any::<u8>())
            .prop_map(|(channel, peer)| ReqKind::ChannelBind { channel, peer }),
        1 => (any::<u16>(), any::<u16>()).prop_map(|(method, attr)| ReqKind::Odd { method, attr }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (
            any::<u8>(),
            prop_oneof![3 => Just(1u8), 1 => any::<u8>()],
            req_kind(),
            0u8..6,
            any::<bool>(),
            prop::option::weighted(0.1, any::<(u16, u8)>()),
        )
            .prop_map(|(tuple, cred, kind, tid, fingerprint, corrupt)| Op::Request {
                tuple,
                cred,
                kind,
                tid,
                fingerprint,
                corrupt,
            }),
        2 => (any::<u8>(), any::<u8>(), vec(any::<u8>(), 0..40), any::<bool>())
            .prop_map(|(tuple, peer, data, dont_fragment)| Op::Send {
                tuple,
                peer,
                data,
                dont_fragment,
            }),
        2 => (any::<u8>(), any::<u16>(), vec(any::<u8>(), 0..40))
            .prop_map(|(tuple, channel, data)| Op::ChannelData { tuple, channel, data }),
        1 => (any::<u8>(), prop_oneof![vec(any::<u8>(), 0..80), stun_shaped()])
            .prop_map(|(tuple, bytes)| Op::Raw { tuple, bytes }),
        2 => (any::<u8>(), any::<u8>(), vec(any::<u8>(), 0..40))
            .prop_map(|(relay, peer, data)| Op::Peer { relay, peer, data }),
        2 => prop_oneof![0u32..2_000, 0u32..700_000, 0..driver::MAX_STEP_MS]
            .prop_map(|millis| Op::Advance { millis }),
        1 => any::<u8>().prop_map(Op::RelayMode),
        1 => Just(Op::Answer),
        1 => any::<u8>().prop_map(|tuple| Op::Close { tuple }),
        1 => any::<u8>().prop_map(Op::Operate),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn server_survives_arbitrary_scenarios_and_keeps_answering_binding(
        setup in setup(),
        ops in vec(op(), 0..40),
    ) {
        let mut d = Driver::new(setup);
        d.run(&ops);
        d.finish();
    }

    #[test]
    fn server_survives_scenarios_parsed_from_arbitrary_bytes(bytes in vec(any::<u8>(), 0..400)) {
        let (setup, ops) = driver::parse_ops(&bytes);
        let mut d = Driver::new(setup);
        d.run(&ops);
        d.finish();
    }
}

/// The driver reaches the interesting states: without this a bug in the driver (a bad
/// signature, say) would leave every property above trivially true.
#[test]
fn driver_reaches_allocations_permissions_channels_and_relaying() {
    let alloc = |tuple: u8, tid: u8| Op::Request {
        tuple,
        cred: 1,
        kind: ReqKind::Allocate {
            transport: Some(17),
            requested_family: None,
            additional_family: Some(2),
            even_port: None,
            token: None,
            lifetime: None,
            dont_fragment: false,
        },
        tid,
        fingerprint: true,
        corrupt: None,
    };
    let mut d = Driver::new(Setup::default());
    d.run(&[
        alloc(0, 1),
        Op::Request {
            tuple: 0,
            cred: 1,
            kind: ReqKind::ChannelBind {
                channel: 1,
                peer: 0,
            },
            tid: 2,
            fingerprint: false,
            corrupt: None,
        },
        Op::Request {
            tuple: 0,
            cred: 2,
            kind: ReqKind::CreatePermission { peers: vec![1, 2] },
            tid: 3,
            fingerprint: false,
            corrupt: None,
        },
    ]);
    assert_eq!(d.server.allocation_count(), 1);
    assert_eq!(d.server.permission_and_channel_count(), (3, 1));
    assert_eq!(d.bound.len(), 2, "an IPv4 and an IPv6 relay socket");
    d.sent.clear();
    d.run(&[
        Op::ChannelData {
            tuple: 0,
            channel: 1,
            data: b"hello".to_vec(),
        },
        Op::Send {
            tuple: 0,
            peer: 2,
            data: b"v6".to_vec(),
            dont_fragment: true,
        },
    ]);
    let to_peers: Vec<_> = d
        .sent
        .iter()
        .filter_map(|(dst, p)| match dst {
            turn_proto::server::Destination::Peer { peer, .. } => Some((*peer, p.clone())),
            turn_proto::server::Destination::Client(_) => None,
        })
        .collect();
    let peers = driver::peers();
    assert_eq!(
        to_peers,
        vec![(peers[0], b"hello".to_vec()), (peers[2], b"v6".to_vec())]
    );
    let relay4 = *d.bound.iter().find(|a| a.is_ipv4()).unwrap();
    d.sent.clear();
    d.run(&[Op::Peer {
        relay: 0,
        peer: 0,
        data: b"back".to_vec(),
    }]);
    assert!(
        d.sent.iter().any(
            |(dst, p)| matches!(dst, turn_proto::server::Destination::Client(_))
                && ChannelData::decode(p).is_ok_and(|c| c.data == b"back")
        ),
        "peer datagram on {relay4} not relayed as ChannelData: {:?}",
        d.sent
    );
    d.finish();
}

// ---------------------------------------------------------------------------------------------
// Bugs the scenario properties found, pinned as plain tests (minimal inputs).

fn allocate_op(tuple: u8, additional: bool, even_port: Option<bool>, token: Option<u8>) -> Op {
    Op::Request {
        tuple,
        cred: 1,
        kind: ReqKind::Allocate {
            transport: Some(17),
            requested_family: None,
            additional_family: additional.then_some(2),
            even_port,
            token,
            lifetime: None,
            dont_fragment: false,
        },
        tid: 1,
        fingerprint: false,
        corrupt: None,
    }
}

/// RFC 8656 §7.2 dual allocation: the IO layer bound the IPv6 socket but not the IPv4 one.
/// The Allocate fails with 508, and the IPv6 socket must be given back like `reserved_next`
/// is; `handle_relay_bound` forgets it.
#[test]
fn additional_relay_socket_is_released_when_the_primary_bind_fails() {
    let mut d = Driver::new(Setup::default());
    d.run(&[
        Op::RelayMode(8), // hold the relay request
        allocate_op(0, true, None, None),
        Op::RelayMode(1), // then fail the IPv4 bind, bind IPv6
        Op::Answer,
    ]);
    assert_eq!(d.server.allocation_count(), 0);
    assert!(d.bound.is_empty(), "leaked relay sockets: {:?}", d.bound);
}

/// An Allocate with a valid RESERVATION-TOKEN that is then refused by the allocation quota
/// (486) must not lose the reserved port.
#[test]
fn reserved_port_is_released_when_its_allocate_hits_the_quota() {
    let mut d = Driver::new(Setup {
        per_user_quota: Some(1),
        ..Setup::default()
    });
    d.run(&[
        allocate_op(0, false, Some(true), None), // EVEN-PORT R: holds port + 1
        allocate_op(3, false, None, Some(0)),    // alice again, with the token: 486
        Op::Advance { millis: 60_000 },          // the reservation's 30 s run out
    ]);
    assert_eq!(d.server.allocation_count(), 1);
    assert_eq!(d.bound.len(), 1, "held relay sockets: {:?}", d.bound);
}
