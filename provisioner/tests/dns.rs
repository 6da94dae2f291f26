//! `provisioner dns`: the Cloudflare v4 client against a loopback fake of the DNS endpoints.
//!
//! The fake (tests/fixtures/acme_support/fake_cloudflare.rs) is the one mock here: Cloudflare
//! itself cannot be reached from the test machine.

#[path = "fixtures/acme_support/fake_cloudflare.rs"]
mod fake_cloudflare;

use fake_cloudflare::FakeCloudflare;
use provisioner::dns::{
    plan_sync, render_table, AddOutcome, CloudflareClient, DnsError, NewRecord, RecordFilter,
};

#[tokio::test]
async fn list_reads_every_page() {
    let cf = FakeCloudflare::start(None).await;
    for i in 0..7 {
        cf.insert("A", &format!("h{i}.example.com"), &format!("192.0.2.{i}"));
    }
    let client = cf.client().with_per_page(3);
    let all = client.list(&RecordFilter::default()).await.expect("list");
    assert_eq!(all.len(), 7);
    let pages: Vec<String> = cf
        .log()
        .into_iter()
        .filter(|l| l.starts_with("GET"))
        .collect();
    assert_eq!(pages.len(), 3, "three pages of three: {pages:?}");
    assert!(pages[2].contains("page=3"), "{pages:?}");
    let table = render_table(&all);
    assert!(table.starts_with("ID "), "{table}");
    assert_eq!(table.lines().count(), 8);
}

#[tokio::test]
async fn add_is_idempotent_for_same_type_name_and_content() {
    let cf = FakeCloudflare::start(None).await;
    let client = cf.client();
    let rec = NewRecord::new("A", "turn.example.com", "192.0.2.10");
    let first = client.add(&rec).await.expect("add");
    assert!(matches!(first, AddOutcome::Created(_)), "{first:?}");
    let posts_before = cf.log().iter().filter(|l| l.starts_with("POST")).count();
    let second = client.add(&rec).await.expect("add again");
    assert!(matches!(second, AddOutcome::Unchanged(_)), "{second:?}");
    assert_eq!(second.record().id, first.record().id);
    let posts_after = cf.log().iter().filter(|l| l.starts_with("POST")).count();
    assert_eq!(posts_before, posts_after, "the second add sends nothing");
    // A different content on the same name is a second record (round-robin A).
    let other = client
        .add(&NewRecord::new("A", "turn.example.com", "192.0.2.11"))
        .await
        .expect("add other");
    assert!(matches!(other, AddOutcome::Created(_)));
    assert_eq!(cf.records().len(), 2);
}

#[tokio::test]
async fn update_and_delete_by_id() {
    let cf = FakeCloudflare::start(None).await;
    let id = cf.insert("A", "turn.example.com", "192.0.2.1");
    let keep = cf.insert("A", "www.example.com", "192.0.2.2");
    let client = cf.client();
    let updated = client
        .update(&id, &NewRecord::new("A", "turn.example.com", "192.0.2.99"))
        .await
        .expect("update");
    assert_eq!(updated.content, "192.0.2.99");
    assert_eq!(updated.id, id);
    client.delete(&id).await.expect("delete");
    let left = cf.records();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, keep);
    // Deleting again: Cloudflare's error comes through with its code.
    let err = client.delete(&id).await.expect_err("gone");
    assert!(
        err.to_string()
            .contains("code 81044: Record does not exist."),
        "{err}"
    );
}

#[tokio::test]
async fn api_errors_are_surfaced_with_status_code_and_message() {
    let cf = FakeCloudflare::start(None).await;
    cf.fail_next(
        "POST",
        429,
        971,
        "Please wait and consider throttling your request speed",
    );
    let err = cf
        .client()
        .create(&NewRecord::new("A", "x.example.com", "192.0.2.1"))
        .await
        .expect_err("throttled");
    match &err {
        DnsError::Api { status, errors, .. } => {
            assert_eq!(*status, 429);
            assert_eq!(errors[0].code, 971);
        }
        other => panic!("expected an API error, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "Cloudflare API create record refused (HTTP 429): code 971: Please wait and consider \
         throttling your request speed"
    );
    // A wrong token.
    let bad = CloudflareClient::new(
        &cf.base(),
        provisioner::dns::ApiToken::new("wrong"),
        fake_cloudflare::ZONE_ID,
    )
    .expect("client");
    let err = bad.list(&RecordFilter::default()).await.expect_err("auth");
    assert!(
        err.to_string()
            .contains("HTTP 403): code 10000: Authentication error"),
        "{err}"
    );
    // Nothing listening: a transport error that names the operation.
    let gone = CloudflareClient::new(
        "http://127.0.0.1:9/client/v4",
        provisioner::dns::ApiToken::new("t"),
        "z",
    )
    .expect("client");
    let err = gone
        .list(&RecordFilter::default())
        .await
        .expect_err("refused");
    assert!(
        err.to_string()
            .starts_with("Cloudflare API list records: request failed"),
        "{err}"
    );
}

#[tokio::test]
async fn sync_shows_plan_applies_it_then_plans_nothing() {
    let cf = FakeCloudflare::start(None).await;
    cf.insert("A", "turn.example.com", "192.0.2.200"); // stale
    cf.insert("A", "turn.example.com", "192.0.2.201"); // stale
    cf.insert("A", "turn.example.com", "192.0.2.202"); // stale
    cf.insert("MX", "example.com", "mail.example.com"); // not ours: never touched
    let client = cf.client();
    let inv = provisioner::inventory::Inventory::from_toml(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/cluster.example.toml"
        ))
        .expect("example inventory"),
    )
    .expect("parses");
    let mut inv = inv;
    inv.domain.zone = "example.com".into();
    inv.domain.turn = "turn.example.com".into();
    let extra = vec![NewRecord::new("A", "example.com", "192.0.2.50")];
    let desired = provisioner::dns::desired_records(&inv, &extra);
    assert_eq!(
        desired.len(),
        3,
        "two turnd public IPs and the apex: {desired:?}"
    );

    let current = client.list(&RecordFilter::default()).await.expect("list");
    let plan = plan_sync(&current, &desired);
    let shown = plan.render();
    assert!(shown.starts_with("dns: 4 change(s)"), "{shown}");
    assert!(
        shown.contains("+ create A example.com 192.0.2.50"),
        "{shown}"
    );
    assert!(
        shown.contains("- delete A turn.example.com 192.0.2.202"),
        "{shown}"
    );
    assert_eq!(client.apply(&plan).await.expect("apply"), 4);

    let current = client.list(&RecordFilter::default()).await.expect("list");
    let again = plan_sync(&current, &desired);
    assert!(again.is_empty(), "second plan: {}", again.render());
    assert_eq!(again.render(), "dns: up to date\n");
    assert!(cf.records().iter().any(|r| r.record_type == "MX"));
}

fn example_inventory() -> provisioner::inventory::Inventory {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/cluster.example.toml"
    ))
    .expect("example")
    .replace("example.net", "example.com");
    provisioner::inventory::Inventory::from_toml(&text).expect("parses")
}

#[tokio::test]
async fn add_takes_an_mx_priority_and_update_changes_only_the_fields_given() {
    use provisioner::dns::{run_command, DnsCommand};
    let cf = FakeCloudflare::start(None).await;
    let client = cf.client();
    let inv = example_inventory();

    let mx = |priority| DnsCommand::Add {
        record_type: "MX".into(),
        name: "@".into(),
        content: "mail.example.com".into(),
        ttl: 1,
        priority,
    };
    let err = run_command(&mx(None), &client, &inv, false)
        .await
        .expect_err("MX without a priority");
    assert_eq!(
        err.to_string(),
        "an MX record needs --priority (e.g. --priority 10)"
    );
    let out = run_command(&mx(Some(10)), &client, &inv, false)
        .await
        .expect("adds");
    assert!(
        out.starts_with("created MX example.com mail.example.com"),
        "{out}"
    );
    let stored = cf.records();
    assert_eq!(stored[0].priority, Some(10));

    // A record someone proxies in Cloudflare's dashboard: updating its content keeps it
    // proxied, and only the content is sent.
    let id = cf.insert("A", "www.example.com", "192.0.2.1");
    cf.set_proxied(&id);
    let update = DnsCommand::Update {
        id: id.clone(),
        name: None,
        content: Some("192.0.2.2".into()),
        ttl: None,
        priority: None,
        proxied: None,
    };
    let out = run_command(&update, &client, &inv, false)
        .await
        .expect("updates");
    assert_eq!(
        out,
        format!("updated A www.example.com 192.0.2.2 (id {id}, proxied)\n")
    );
    assert_eq!(cf.patches(), [serde_json::json!({"content": "192.0.2.2"})]);
    let r = cf.records().into_iter().find(|r| r.id == id).expect("kept");
    assert!(r.proxied && r.content == "192.0.2.2" && r.name == "www.example.com");

    let nothing = DnsCommand::Update {
        id,
        name: None,
        content: None,
        ttl: None,
        priority: None,
        proxied: None,
    };
    assert!(run_command(&nothing, &client, &inv, false)
        .await
        .expect_err("nothing to change")
        .to_string()
        .starts_with("nothing to change"));
}
