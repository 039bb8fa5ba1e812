//! Unit tests of the KV-event feeds: sequence numbers, and topics attributed to endpoints.

use super::*;

#[test]
fn sequence_numbers() {
    assert_eq!(classify(None, 7), Seq::First);
    assert_eq!(classify(Some(7), 7), Seq::Next);
    assert_eq!(classify(Some(7), 9), Seq::Gap { from: 7 });
    assert_eq!(classify(Some(7), 0), Seq::Restarted);
    assert_eq!(seq_of(&[0, 0, 0, 0, 0, 0, 1, 2, 9, 9]), Some(258));
    assert_eq!(seq_of(&[1]), None);
}

#[test]
fn topics_name_endpoints() {
    let t = |addr: &str, rank| FeedTarget {
        id: EndpointId::new(rank),
        label: addr.into(),
        addr: addr.parse().expect("addr"),
        rank,
        status: Arc::default(),
    };
    let targets = [t("10.0.0.1:8000", 0), t("10.0.0.1:8000", 1), t("10.0.0.2:8000", 0)];
    let who = |topic: &str, rank| attribute(&targets, topic.as_bytes(), rank).map(|t| (t.addr.to_string(), t.rank));
    assert_eq!(who("kv@10.0.0.1:8000@m", Some(1)), Some(("10.0.0.1:8000".into(), 1)));
    assert_eq!(who("kv@10.0.0.1:8000@m", None), Some(("10.0.0.1:8000".into(), 0)));
    assert_eq!(who("kv@10.0.0.2@m", None), Some(("10.0.0.2:8000".into(), 0)), "older charts: the IP alone");
    assert_eq!(who("kv@10.0.0.3:8000@m", None), None);
    assert_eq!(who("other", None), None);
    assert_eq!(offset_endpoint("10.0.0.1".parse().expect("ip"), 5557, 2).as_deref(), Some("tcp://10.0.0.1:5559"));
    assert_eq!(offset_endpoint("10.0.0.1".parse().expect("ip"), 65535, 1), None);
}
